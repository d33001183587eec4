"""Video I/O, clip transforms, the dataset layouts and the synthetic set, on tiny real files."""

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from matten.data import (
    MOTION_TYPES,
    FaceForensicsDataset,
    SkyTimelapseDataset,
    SyntheticVideoDataset,
    TaichiHDDataset,
    UCF101Dataset,
    VideoClipDataset,
    VideoDecodeError,
    VideoTransform,
    build_dataset,
    count_frames,
    make_grid,
    read_frame_folder,
    read_video,
    resize_center_crop,
    sample_clip_indices,
    save_grid_image,
    video_to_uint8,
    video_write,
    write_video,
)
from matten.data.transforms import frames_to_tensor, random_hflip

STEP = 10  # brightness step between consecutive source frames


def index_frames(t=20, h=32, w=32):
    """Uniform grey frames whose brightness encodes the frame index: 10, 20, 30, ..."""
    return np.stack([np.full((h, w, 3), STEP + STEP * i, np.uint8) for i in range(t)])


def write_frame_folder(folder, frames, ext=".jpg"):
    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"frame_{i + 1}{ext}", quality=95)
    return folder


def source_index(clip):
    """Per-frame source index recovered from the brightness of a (C, F, H, W) clip."""
    grey = (clip.mean(dim=(0, 2, 3)) + 1) * 127.5
    return (grey / STEP - 1).numpy()


def list_all(root):
    return sorted(p.relative_to(root).as_posix() for p in Path(root).rglob("*"))


# ----------------------------------------------------------------------------------------------
# fixture trees (built once per module)


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    frames = index_frames()
    # UCF101: two classes, .avi and .mp4, groups 1 (test in fold 1) and 8+ (train)
    ucf = base / "UCF-101"
    for cls, ext in (("Basketball", ".mp4"), ("ApplyEyeMakeup", ".avi")):
        for g in (1, 8, 9):
            write_video(ucf / cls / f"v_{cls}_g{g:02d}_c01{ext}", frames)
    # SkyTimelapse: root/sky_train/<video>/<clip>/*.jpg and a sky_test split
    sky = base / "sky_timelapse"
    for split, vids in (("sky_train", ("vidA", "vidB")), ("sky_test", ("vidC",))):
        for v in vids:
            for c in ("1", "2"):
                write_frame_folder(sky / split / v / c, frames[:14])
    # FaceForensics: non-square mp4 videos (48 x 64)
    ffs = base / "faceforensics"
    for i in range(3):
        write_video(ffs / f"{i:03d}.mp4", index_frames(16, 48, 64))
    # Taichi-HD: train/ holds a video and a frame folder named like a video; test/ a video
    taichi = base / "taichi"
    write_video(taichi / "train" / "a.mp4", frames)
    write_frame_folder(taichi / "train" / "b.mp4", frames, ext=".png")
    write_video(taichi / "test" / "c.mp4", frames)
    return {"ucf": ucf, "sky": sky, "ffs": ffs, "taichi": taichi, "base": base}


# ----------------------------------------------------------------------------------------------
# video I/O


@pytest.mark.parametrize("suffix,tol", [(".mp4", 6), (".avi", 8), (".gif", 12)])
def test_write_read_round_trip(tmp_path, suffix, tol):
    rng = np.random.default_rng(0)
    frames = np.full((10, 32, 48, 3), 30, np.uint8)
    for t in range(10):  # a coloured square moving right over a textured background
        frames[t, 8:20, 4 + 2 * t : 16 + 2 * t] = (220, 80, 40)
    frames[:, 24:, :] = rng.integers(60, 70, size=(1, 8, 48, 3), dtype=np.uint8)
    path = write_video(tmp_path / "deep" / "dir" / f"clip{suffix}", frames, fps=8)
    assert path.exists() and list_all(tmp_path / "deep" / "dir") == [f"clip{suffix}"]
    decoded = read_video(path)
    assert decoded.dtype == np.uint8 and decoded.shape == frames.shape
    assert count_frames(path) == 10
    assert np.abs(decoded.astype(int) - frames.astype(int)).mean() < tol
    assert np.array_equal(read_video(path, [4, 1]), decoded[[4, 1]])


def test_write_video_pads_odd_sizes(tmp_path):
    frames = np.random.default_rng(0).integers(0, 255, (4, 33, 47, 3), dtype=np.uint8)
    decoded = read_video(write_video(tmp_path / "odd.mp4", frames))
    assert decoded.shape == (4, 34, 48, 3)


def test_write_video_is_atomic_on_bad_frames(tmp_path):
    target = tmp_path / "keep.mp4"
    write_video(target, index_frames(5))
    before = target.read_bytes()
    for bad in (
        np.zeros((5, 32, 32, 3), np.float32),
        np.zeros((5, 32, 32, 4), np.uint8),
        np.zeros((0, 32, 32, 3), np.uint8),
    ):
        with pytest.raises(ValueError):
            write_video(target, bad)
    with pytest.raises(ValueError, match="unsupported suffix"):
        write_video(tmp_path / "clip.xyz", index_frames(5))
    assert target.read_bytes() == before
    assert list_all(tmp_path) == ["keep.mp4"]


def test_write_video_is_atomic_when_encoding_fails(tmp_path, monkeypatch):
    target = tmp_path / "keep.mp4"
    write_video(target, index_frames(5))
    before = target.read_bytes()

    real_encode = video_write.encode_frames

    def broken(container, stream, frames):  # some packets written, then the disk is full
        real_encode(container, stream, frames[:2])
        raise RuntimeError("disk full")

    monkeypatch.setattr(video_write, "encode_frames", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_video(target, index_frames(5))
    assert target.read_bytes() == before
    assert list_all(tmp_path) == ["keep.mp4"]


def test_save_grid_image(tmp_path):
    videos = np.stack([index_frames(4, 8, 10) for _ in range(3)])
    videos[1] = 255 - videos[1]
    path = save_grid_image(tmp_path / "grids" / "g.png", videos, padding=1)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (1 + 3 * 9, 1 + 4 * 11, 3)
    assert np.array_equal(grid[1:9, 1:11], videos[0, 0])  # row 0, column 0
    assert np.array_equal(grid[10:18, 1 + 2 * 11 : 11 + 2 * 11], videos[1, 2])  # row 1, column 2
    assert list_all(tmp_path / "grids") == ["g.png"]
    # a list of videos of different lengths: missing cells stay blank
    grid2 = make_grid([videos[0], videos[1][:2]], padding=0)
    assert grid2.shape == (16, 40, 3) and grid2[8:, 20:].max() == 0


def test_read_frame_folder_natural_order(tmp_path):
    folder = write_frame_folder(tmp_path / "clip", index_frames(12), ext=".png")
    frames = read_frame_folder(folder)
    assert frames.shape == (12, 32, 32, 3) and count_frames(folder) == 12
    assert list(frames[:, 0, 0, 0]) == [STEP + STEP * i for i in range(12)]  # 2 before 10
    assert np.array_equal(read_video(folder, [11, 0]), frames[[11, 0]])


def test_read_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(os.urandom(2000))
    for fn in (read_video, count_frames):
        with pytest.raises(VideoDecodeError, match="bad.mp4"):
            fn(bad)
    with pytest.raises(VideoDecodeError, match="does not exist"):
        read_video(tmp_path / "missing.mp4")


# ----------------------------------------------------------------------------------------------
# transforms


def test_sample_clip_indices():
    unseeded = sample_clip_indices(100)
    assert unseeded == sorted(unseeded) and len(unseeded) == 16
    idx = sample_clip_indices(100, 16, 3, generator=7)
    assert len(idx) == 16 and np.all(np.diff(idx) == 3) and 0 <= idx[0] and idx[-1] < 100
    assert idx == sample_clip_indices(100, 16, 3, generator=7)  # deterministic given a seed
    starts = {sample_clip_indices(100, 16, 3, generator=s)[0] for s in range(40)}
    assert len(starts) > 10 and max(starts) <= 100 - 46
    assert sample_clip_indices(46, 16, 3) == list(range(0, 46, 3))  # exactly one valid start
    assert sample_clip_indices(50, 4, 2, start="first") == [0, 2, 4, 6]
    with pytest.raises(ValueError, match="needs 46 frames"):
        sample_clip_indices(45, 16, 3)


def test_resize_center_crop_non_square():
    frame = np.full((48, 64, 3), 255, np.uint8)
    frame[:, :6] = 0
    frame[:, -6:] = 0  # dark bands at the left/right edges, outside the central 48 x 48
    video = frames_to_tensor(frame[None])
    square = resize_center_crop(video, 24)
    assert square.shape == (1, 3, 24, 24)
    assert square.min() > 250  # the centre crop removed the dark bands
    full = resize_center_crop(video, (24, 32))  # same aspect: resized, nothing cropped
    assert full.shape == (1, 3, 24, 32) and full[..., 0].max() < 60 and full[..., -1].max() < 60
    tall = resize_center_crop(video, (32, 16))
    assert tall.shape == (1, 3, 32, 16)


def test_transform_range_and_flip():
    frames = np.zeros((5, 32, 32, 3), np.uint8)
    frames[:, :, :16] = 255  # bright left half
    out = VideoTransform(16, hflip_p=0.0)(frames)
    assert out.shape == (3, 5, 16, 16) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    assert out[:, :, :, :8].mean() > 0.9 and out[:, :, :, 8:].mean() < -0.9
    flipped = VideoTransform(16, hflip_p=1.0)(frames)
    assert torch.equal(flipped, out.flip(-1))
    # p = 0.5: both outcomes happen, and a decision applies to every frame of the clip
    seen = set()
    for seed in range(20):
        v = random_hflip(out, 0.5, generator=seed)
        left = v[:, :, :, :8].mean(dim=(0, 2, 3))
        assert bool((left > 0).all()) or bool((left < 0).all())
        seen.add(bool(left[0] > 0))
    assert seen == {True, False}


# ----------------------------------------------------------------------------------------------
# datasets


def check_item(item, shape):
    assert set(item) == {"video", "label"}
    video, label = item["video"], item["label"]
    assert video.shape == shape and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1
    assert label.dtype == torch.int64 and label.ndim == 0


def test_ucf101_labels_by_class_folder(trees):
    ds = UCF101Dataset(trees["ucf"], 16, num_frames=4, frame_stride=3, hflip_p=0.0)
    assert ds.class_names == ["ApplyEyeMakeup", "Basketball"] and ds.num_classes == 2
    assert len(ds) == 6 and ds.skipped == {}
    for i in range(len(ds)):
        item = ds[i]
        check_item(item, (3, 4, 16, 16))
        assert ds.class_names[int(item["label"])] == Path(ds.paths[i]).parent.name


def test_ucf101_splits(trees, tmp_path):
    train = UCF101Dataset(trees["ucf"], 16, 4, 3, split="train")  # groups 8+ (no list file)
    test = UCF101Dataset(trees["ucf"], 16, 4, 3, split="test")  # groups 1-7
    assert len(train) == 4 and len(test) == 2
    assert all("_g01_" in p for p in test.paths) and train.num_classes == 2
    # the official list file wins when present
    lists = tmp_path / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "trainlist01.txt").write_text(
        "Basketball/v_Basketball_g09_c01.mp4 2\nBasketball/v_Basketball_g10_c01.mp4 2\n"
    )
    ds = UCF101Dataset(trees["ucf"], 16, 4, 3, split="train", split_dir=lists)
    assert [Path(p).name for p in ds.paths] == ["v_Basketball_g09_c01.mp4"]
    assert int(ds[0]["label"]) == 1 and len(ds.skipped["missing"]) == 1


@pytest.mark.parametrize("layout", ["ucf", "sky", "taichi"])
def test_clip_frames_follow_the_stride(trees, layout):
    """Source frame i has brightness 10 (i + 1): the decoded clip must step by the stride."""
    stride = 3 if layout != "sky" else 4
    ds = build_dataset(
        {"ucf": "ucf101", "sky": "sky_timelapse", "taichi": "taichi_hd"}[layout],
        trees[layout],
        16,
        num_frames=4,
        frame_stride=stride,
        hflip_p=0.0,
    )
    for i in range(len(ds)):
        idx = source_index(ds[i]["video"])
        assert np.allclose(np.diff(idx), stride, atol=0.25), (ds.paths[i], idx)
        assert abs(idx[0] - round(idx[0])) < 0.25 and -0.25 < idx[0]
        assert idx[-1] < count_frames(ds.paths[i]) - 0.75


def test_random_start_and_seeded_start(trees):
    root = trees["taichi"] / "test"
    ds = FaceForensicsDataset(root, 16, num_frames=4, frame_stride=2, hflip_p=0.0)
    starts = {round(source_index(ds[0]["video"])[0]) for _ in range(25)}
    assert len(starts) > 3 and max(starts) <= 20 - 7
    seeded = FaceForensicsDataset(root, 16, num_frames=4, frame_stride=2, seed=3)
    assert torch.equal(seeded[0]["video"], seeded[0]["video"])
    first = FaceForensicsDataset(root, 16, num_frames=4, frame_stride=2, clip_start="first")
    assert round(source_index(first[0]["video"])[0]) == 0


def test_sky_timelapse_nested_frame_folders(trees):
    ds = build_dataset(
        "sky_timelapse", trees["sky"], 16, num_frames=4, frame_stride=3, split="train"
    )
    assert len(ds) == 4 and ds.num_classes == 0 and ds.class_names == []
    assert all(Path(p).parent.parent.name == "sky_train" for p in ds.paths)
    check_item(ds[3], (3, 4, 16, 16))
    assert int(ds[3]["label"]) == 0
    assert len(SkyTimelapseDataset(trees["sky"], 16, 4, 3, split="test")) == 2
    assert len(SkyTimelapseDataset(trees["sky"], 16, 4, 3)) == 6


def test_faceforensics_non_square_centre_crop(trees):
    ds = build_dataset("faceforensics", trees["ffs"], 32, num_frames=4, frame_stride=3)
    assert len(ds) == 3
    check_item(ds[0], (3, 4, 32, 32))
    rect = build_dataset("faceforensics", trees["ffs"], (24, 40), num_frames=4, frame_stride=3)
    check_item(rect[1], (3, 4, 24, 40))


def test_taichi_split(trees):
    train = TaichiHDDataset(trees["taichi"], 16, 4, 3, split="train")
    assert sorted(Path(p).name for p in train.paths) == ["a.mp4", "b.mp4"]  # file + frame folder
    test = build_dataset("taichi_hd", trees["taichi"], 16, 4, 3, split="test")
    assert [Path(p).name for p in test.paths] == ["c.mp4"]
    assert len(build_dataset("taichi", trees["taichi"], 16, 4, 3)) == 3  # both splits
    check_item(train[1], (3, 4, 16, 16))


def test_corrupt_and_short_videos_are_skipped(tmp_path, caplog):
    write_video(tmp_path / "good1.mp4", index_frames(12))
    write_frame_folder(tmp_path / "good2", index_frames(12))
    write_video(tmp_path / "short.avi", index_frames(5))
    (tmp_path / "corrupt.mp4").write_bytes(os.urandom(3000))
    write_video(tmp_path / ".hidden.mp4", index_frames(12))  # ignored (temp-file style name)
    with caplog.at_level(logging.WARNING):
        ds = VideoClipDataset(tmp_path, 16, num_frames=4, frame_stride=3)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 2 of 4" in warnings[0].getMessage()
    assert ds.skipped == {
        "corrupt": [str(tmp_path / "corrupt.mp4")],
        "too_short": [str(tmp_path / "short.avi")],
    }
    assert len(ds) == 2
    for i in range(2):
        check_item(ds[i], (3, 4, 16, 16))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["video"].shape == (2, 3, 4, 16, 16) and batch["label"].tolist() == [0, 0]


def test_decode_failure_later_is_replaced(tmp_path, caplog):
    for name in ("a", "b", "c"):
        write_video(tmp_path / f"{name}.mp4", index_frames(12))
    ds = VideoClipDataset(tmp_path, 16, num_frames=4, frame_stride=3)
    (tmp_path / "b.mp4").write_bytes(os.urandom(3000))  # breaks after indexing
    with caplog.at_level(logging.WARNING):
        item = ds[1]
    check_item(item, (3, 4, 16, 16))
    assert ds.skipped["decode_error"] == [str(tmp_path / "b.mp4")]
    assert len([ds[i] for i in range(len(ds))]) == 3
    for name in ("a", "c"):
        (tmp_path / f"{name}.mp4").write_bytes(os.urandom(3000))
    with pytest.raises(RuntimeError, match="every one of the 3 videos"):
        ds[0]


def test_bad_roots_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_dataset("folder", tmp_path / "nowhere", 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        build_dataset("ucf101", tmp_path / "empty", 16)
    with pytest.raises(ValueError, match="empty"):
        VideoClipDataset(tmp_path / "empty", 16)
    write_video(tmp_path / "only" / "short.mp4", index_frames(5))
    with pytest.raises(ValueError, match="none of the 1 videos"):
        VideoClipDataset(tmp_path / "only", 16, num_frames=16, frame_stride=3)
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("kinetics", tmp_path, 16)


def test_folder_labels_from_folders(trees):
    ds = build_dataset("folder", trees["ucf"], 16, 4, 3, labels_from_folders=True)
    assert ds.class_names == ["ApplyEyeMakeup", "Basketball"]
    assert [int(ds[i]["label"]) for i in range(len(ds))] == [0, 0, 0, 1, 1, 1]


# ----------------------------------------------------------------------------------------------
# synthetic


def centre_of_mass(video):
    """(F, 2) x/y centre of the brightness above the background (the darkest value of each row
    over the whole clip: the background is a vertical gradient)."""
    lum = video.mean(dim=0)  # (F, H, W)
    fg = (lum - lum.amin(dim=(0, 2), keepdim=True)).numpy()
    ys, xs = np.mgrid[0 : fg.shape[1], 0 : fg.shape[2]]
    mass = fg.sum(axis=(1, 2))
    return np.stack([(fg * xs).sum((1, 2)) / mass, (fg * ys).sum((1, 2)) / mass], axis=1)


def test_synthetic_is_deterministic_and_labelled():
    ds = SyntheticVideoDataset(24, resolution=32, num_frames=16, num_classes=4, seed=0)
    assert len(ds) == 24 and ds.num_classes == 4 and ds.class_names == list(MOTION_TYPES[:4])
    again = SyntheticVideoDataset(24, resolution=32, num_frames=16, num_classes=4, seed=0)
    other = SyntheticVideoDataset(24, resolution=32, num_frames=16, num_classes=4, seed=1)
    assert torch.equal(ds[5]["video"], again[5]["video"]) and torch.equal(
        ds[5]["video"], ds[5]["video"]
    )
    assert not torch.equal(ds[5]["video"], other[5]["video"])
    assert not torch.equal(ds[5]["video"], ds[6]["video"])
    labels = [int(ds[i]["label"]) for i in range(24)]
    assert set(labels) == {0, 1, 2, 3}
    check_item(ds[0], (3, 16, 32, 32))
    uncond = build_dataset("synthetic", None, (24, 40), num_frames=8, num_videos=6, num_classes=0)
    assert uncond.num_classes == 0 and all(int(uncond[i]["label"]) == 0 for i in range(6))
    check_item(uncond[2], (3, 8, 24, 40))
    with pytest.raises(ValueError):
        SyntheticVideoDataset(4, num_classes=7)


def test_synthetic_motion_is_smooth_and_matches_the_class():
    ds = SyntheticVideoDataset(
        40, resolution=32, num_frames=16, num_classes=4, seed=0, max_objects=1
    )
    for i in range(len(ds)):
        video, label = ds[i]["video"], int(ds[i]["label"])
        step = (video[:, 1:] - video[:, :-1]).abs().mean()
        assert step < 0.1  # consecutive frames differ little
        com = centre_of_mass(video)
        moves = np.linalg.norm(com[1:] - com[:-1], axis=1)
        assert moves.max() < 3.5  # no jumps (pixels per frame at 32 x 32)
        assert np.linalg.norm(com - com[0], axis=1).max() > 3  # but it really moves
        spread_x, spread_y = np.ptp(com[:, 0]), np.ptp(com[:, 1])
        if label == 0:
            assert spread_y < 0.5 < spread_x
        elif label == 1:
            assert spread_x < 0.5 < spread_y
        elif label == 2:  # along the main diagonal: x and y change together
            d = np.diff(com, axis=0)
            assert np.all(d[:, 0] * d[:, 1] >= -1e-3)


def test_video_to_uint8_round_trip(tmp_path):
    video = SyntheticVideoDataset(1, 16, 6)[0]["video"]
    frames = video_to_uint8(video)
    assert frames.shape == (6, 16, 16, 3) and frames.dtype == np.uint8
    assert video_to_uint8(video[None]).shape == (1, 6, 16, 16, 3)
    back = read_video(write_video(tmp_path / "s.gif", frames))
    assert back.shape == frames.shape
