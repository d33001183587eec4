"""The moving-digits set: scikit-learn's handwritten digits bouncing in a frame."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from matten.config import load_config
from matten.data import DATASETS, MovingDigitsDataset, build_dataset, dataset_from_config
from matten.training import train

TINY = [
    "model.depth=1",
    "model.hidden_size=32",
    "model.num_heads=2",
    "data.resolution=8",
    "data.num_frames=4",
    "data.num_videos=16",
    "train.batch_size=4",
    "train.max_steps=2",
    "sample.num_samples=2",
    "sample.steps=2",
    "train.cpu=true",
]


def test_items_have_the_common_format_and_are_deterministic_by_seed():
    ds = build_dataset("moving_digits", None, 16, 6, num_videos=12, seed=3)
    assert "moving_digits" in DATASETS and len(ds) == 12
    item = ds[5]
    assert item["video"].shape == (3, 6, 16, 16) and item["video"].dtype == torch.float32
    assert item["label"].dtype == torch.int64 and int(item["label"]) == 5
    assert item["video"].min() >= -1 and item["video"].max() <= 1
    assert ds.num_classes == 10 and ds.class_names == [str(d) for d in range(10)]
    again = MovingDigitsDataset(12, 16, 6, seed=3)
    other = MovingDigitsDataset(12, 16, 6, seed=4)
    for i in range(12):
        assert torch.equal(ds[i]["video"], again[i]["video"])
    assert not all(torch.equal(ds[i]["video"], other[i]["video"]) for i in range(12))
    assert torch.equal(ds[-1]["video"], ds[11]["video"])
    with pytest.raises(IndexError):
        ds[12]


def test_the_digit_moves_and_stays_whole_inside_the_frame():
    ds = MovingDigitsDataset(20, 16, 8, speed=(0.06, 0.08))
    for i in range(20):
        frames, _ = ds.render(i)
        ink = frames.sum(axis=(1, 2, 3))
        _, _, (digit,) = ds.layout(i)
        scan_ink = 3 * ds.images[digit["image"]].sum()
        np.testing.assert_allclose(ink, scan_ink, rtol=1e-5)  # never clipped by the border
        steps = np.hypot(np.diff(digit["y"]), np.diff(digit["x"]))
        # at most the speed (1.28 px per frame) plus the rounding of both coordinates, and moving
        assert steps.max() <= 0.08 * 16 + np.sqrt(2) and steps.sum() >= 4


def test_the_first_frame_shows_its_class_digit():
    """Independent check of the labels: slide each digit's mean scan (from load_digits itself)
    over the first frame; the best-correlating class is the label for nearly every clip."""
    digits = load_digits()
    templates = np.stack([digits.images[digits.target == c].mean(0) for c in range(10)])
    templates -= templates.mean(axis=(1, 2), keepdims=True)
    templates /= np.linalg.norm(templates, axis=(1, 2), keepdims=True)
    ds = MovingDigitsDataset(100, 16, 2, seed=1)  # 8x8 digits: the scans at their own size
    hits = 0
    for i in range(len(ds)):
        frame = ds.render(i)[0][0].mean(axis=-1)
        best = -np.inf, None
        for y in range(9):
            for x in range(9):
                patch = frame[y : y + 8, x : x + 8] - frame[y : y + 8, x : x + 8].mean()
                scores = templates.reshape(10, -1) @ patch.ravel() / (np.linalg.norm(patch) + 1e-9)
                if scores.max() > best[0]:
                    best = scores.max(), int(scores.argmax())
        hits += best[1] == i % 10
    assert hits >= 80  # nearest class mean reads about 90% of these scans right; chance is 10


def test_the_test_split_is_disjoint_and_reproducible():
    train_set = build_dataset("moving_digits", None, 16, 4, num_videos=50)
    test_set = build_dataset("moving_digits", None, 16, 4, split="test", num_videos=50)
    assert not set(train_set.image_indices) & set(test_set.image_indices)
    assert len(train_set.image_indices) + len(test_set.image_indices) == 1797
    used = {d["image"] for i in range(50) for d in test_set.layout(i)[2]}
    assert used <= set(test_set.image_indices)
    again = build_dataset("moving_digits", None, 16, 4, split="test", num_videos=50)
    assert all(torch.equal(test_set[i]["video"], again[i]["video"]) for i in range(50))
    with pytest.raises(ValueError, match="split must be"):
        MovingDigitsDataset(4, split="val")


def test_two_digits_colours_and_background():
    ds = MovingDigitsDataset(10, 32, 4, num_digits=2, colour="random", background="tinted")
    assert ds.digit_size == 16  # half the frame, upscaled from 8x8
    for i in range(10):
        label, background, digits = ds.layout(i)
        assert len(digits) == 2 and load_digits().target[digits[0]["image"]] == label
        assert background.max() <= 0.2 and (background > 0).all()
        assert len({tuple(d["colour"]) for d in digits}) == 2
    assert np.allclose(MovingDigitsDataset(2, 16, 2).render(0)[0][0, 0, 0], 0)  # black default
    bad = {
        "num_digits": 3,
        "digit_size": 17,
        "colour": "blue",
        "background": "grey",
        "speed": (0.1, 0.05),
    }
    for option, value in bad.items():
        with pytest.raises(ValueError, match=f"moving_digits {option}"):
            MovingDigitsDataset(2, 16, 2, **{option: value})


def test_two_training_steps_with_the_digits_config(tmp_path):
    cfg = load_config("digits", TINY)
    assert cfg.data.name == "moving_digits"
    dataset = dataset_from_config(cfg.data)
    assert isinstance(dataset, MovingDigitsDataset) and len(dataset) == 16
    result = train(cfg, output=tmp_path / "run", progress=False)
    assert result.step == 2 and all(np.isfinite(result.losses))
    assert result.model.y_embedder.embedding.num_embeddings == 11  # 10 digits + the null class
