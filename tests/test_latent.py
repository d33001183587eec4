"""The autoencoders: pixel identity and the Stable Diffusion VAE (loaded from local files only)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from matten.latent import (
    SD_VAE_CONFIG,
    SD_VAE_SCALE_FACTOR,
    PixelAutoencoder,
    StableDiffusionVAE,
    build_autoencoder,
    load_vae_state_dict,
)

# The SD VAE's structure (4 down/up blocks -> 8x, 4 latent channels), with few channels for speed.
TINY = {
    "block_out_channels": [32, 32, 32, 32],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 32,
}


def random_video(b=2, f=3, h=16, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, f, h, w, generator=g) * 2 - 1


def write_diffusers_folder(folder, vae: StableDiffusionVAE, legacy_names=False):
    """A diffusers-layout VAE folder: config.json + diffusion_pytorch_model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in vae.vae.state_dict().items()}
    if legacy_names:  # the attention names of older diffusers checkpoints (as in SD v1-4)
        renames = {
            ".to_q.": ".query.",
            ".to_k.": ".key.",
            ".to_v.": ".value.",
            ".to_out.0.": ".proj_attn.",
        }
        renamed = {}
        for k, v in state.items():
            for new, old in renames.items():
                k = k.replace(new, old)
            renamed[k] = v
        state = renamed
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    config = {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.27.0",
        **{k: v for k, v in SD_VAE_CONFIG.items()},
        **TINY,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_pixel_autoencoder_is_identity():
    ae = build_autoencoder("pixel")
    assert isinstance(ae, PixelAutoencoder)
    assert ae.latent_channels == 3 and ae.downsample == 1
    x = random_video()
    assert torch.equal(ae.encode(x), x) and torch.equal(ae.decode(x), x)
    assert ae.latent_size(32) == (32, 32)
    with pytest.raises(ValueError, match=r"\(B, 3, F, H, W\)"):
        ae.encode(torch.zeros(2, 4, 3, 8, 8))
    with pytest.raises(ValueError, match="takes no weights"):
        build_autoencoder("pixel", path="x")


def test_sd_vae_architecture_is_stable_diffusion_v1_4():
    assert SD_VAE_CONFIG["block_out_channels"] == [128, 256, 512, 512]
    assert SD_VAE_CONFIG["latent_channels"] == 4 and SD_VAE_CONFIG["layers_per_block"] == 2
    assert SD_VAE_SCALE_FACTOR == 0.18215
    vae = StableDiffusionVAE(None)  # random weights, the full architecture
    assert vae.downsample == 8 and vae.latent_channels == 4
    assert vae.scale_factor == pytest.approx(0.18215)
    params = sum(p.numel() for p in vae.parameters())
    assert 83_000_000 < params < 84_000_000  # the SD v1-4 VAE has 83.65M parameters
    assert vae.latent_size(256) == (32, 32)
    with pytest.raises(ValueError, match="divisible"):
        vae.latent_size(260)


def test_sd_vae_loads_a_diffusers_folder_and_encodes_frame_by_frame(tmp_path):
    torch.manual_seed(0)
    original = StableDiffusionVAE(None, config=TINY, sample_posterior=False)
    folder = write_diffusers_folder(tmp_path / "sd-vae", original)

    loaded = build_autoencoder("sd-vae", path=folder, sample_posterior=False, frame_batch_size=2)
    for (k, a), (k2, b) in zip(
        original.vae.state_dict().items(), loaded.vae.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(a, b), k
    video = random_video(b=2, f=3, h=16, w=16)
    z = loaded.encode(video)
    assert z.shape == (2, 4, 3, 2, 2)
    # Frames are independent: the batch size of the VAE calls does not change the result, and
    # each frame's latent is the 2-D VAE applied to that frame, scaled by 0.18215.
    one_at_a_time = StableDiffusionVAE(folder, sample_posterior=False, frame_batch_size=1)
    assert torch.allclose(one_at_a_time.encode(video), z, atol=1e-5)
    with torch.no_grad():
        frame = original.vae.encode(video[1, :, 2][None]).latent_dist.mode()[0] * 0.18215
    assert torch.allclose(z[1, :, 2], frame, atol=1e-5)
    out = loaded.decode(z)
    assert out.shape == video.shape and out.min() >= -1 and out.max() <= 1
    # A pipeline folder with the VAE in vae/ works too.
    pipeline = tmp_path / "pipeline"
    write_diffusers_folder(pipeline / "vae", original)
    assert torch.allclose(
        StableDiffusionVAE(pipeline, sample_posterior=False).encode(video), z, atol=1e-5
    )


def test_sd_vae_single_file_and_legacy_attention_names(tmp_path):
    torch.manual_seed(1)
    original = StableDiffusionVAE(None, config=TINY, sample_posterior=False)
    folder = write_diffusers_folder(tmp_path / "legacy", original, legacy_names=True)
    single = folder / "diffusion_pytorch_model.safetensors"
    state = load_vae_state_dict(single)
    assert any(".to_q." in k for k in state) and not any(".query." in k for k in state)
    loaded = StableDiffusionVAE(single, config=TINY, sample_posterior=False)
    video = random_video(b=1, f=2)
    assert torch.allclose(loaded.encode(video), original.encode(video), atol=1e-6)
    # The wrong architecture is a clear error naming the file.
    with pytest.raises(ValueError, match="legacy"):
        StableDiffusionVAE(single, config={**TINY, "layers_per_block": 2})


def test_sd_vae_missing_weights_are_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="autoencoder.path") as info:
        build_autoencoder("sd-vae")
    assert "Hugging Face" in str(info.value)
    with pytest.raises(FileNotFoundError, match="not found") as info:
        build_autoencoder("sd-vae", path=tmp_path / "nowhere")
    assert "sd-vae-ft-ema" in str(info.value) and "never downloads" in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        build_autoencoder("sd-vae", path=tmp_path / "empty")
    (tmp_path / "vae.ckpt").write_bytes(b"x")
    with pytest.raises(ValueError, match=".safetensors"):
        build_autoencoder("sd-vae", path=tmp_path / "vae.ckpt")
    (tmp_path / "broken.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="broken.safetensors"):
        build_autoencoder("sd-vae", path=tmp_path / "broken.safetensors")
    with pytest.raises(ValueError, match="unknown autoencoder"):
        build_autoencoder("vqgan")
