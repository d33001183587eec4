import numpy as np
import pytest
import torch

from matten.data.long_memory import (
    ACTION_DELTAS,
    DARK,
    TRAJECTORIES,
    PanningMapDataset,
    actions_from_camera,
)
from matten.eval.long_memory import pixel_last_seen, retrieval_error, revisit_pairs


@pytest.mark.parametrize("trajectory", TRAJECTORIES)
def test_items_are_deterministic_with_the_documented_shapes(trajectory):
    ds = PanningMapDataset(6, resolution=16, num_frames=64, map_size=48, trajectory=trajectory)
    again = PanningMapDataset(6, resolution=16, num_frames=64, map_size=48, trajectory=trajectory)
    other = PanningMapDataset(
        6, resolution=16, num_frames=64, map_size=48, trajectory=trajectory, seed=1
    )
    item = ds[3]
    assert set(item) == {"video", "label", "actions", "camera"}
    for key in item:
        assert torch.equal(item[key], again[3][key]) and torch.equal(item[key], ds[3][key])
    assert not torch.equal(item["video"], other[3]["video"])
    assert not torch.equal(item["video"], ds[4]["video"])
    assert torch.equal(ds[-1]["video"], ds[5]["video"])
    video = item["video"]
    assert video.shape == (3, 64, 16, 16) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1 and video.std() > 0.1
    assert item["label"].dtype == torch.int64 and int(item["label"]) == 0
    assert item["actions"].shape == (64,) and item["actions"].dtype == torch.int64
    assert item["camera"].shape == (64, 2) and item["camera"].dtype == torch.float32
    with pytest.raises(IndexError):
        ds[6]


def test_non_square_window_and_plain_items():
    ds = PanningMapDataset(
        2, resolution=(12, 20), num_frames=9, map_size=(30, 40), with_actions=False
    )
    item = ds[1]
    assert set(item) == {"video", "label"} and item["video"].shape == (3, 9, 12, 20)
    assert ds.world(1).shape == (30, 40, 3)


@pytest.mark.parametrize("trajectory", TRAJECTORIES)
@pytest.mark.parametrize("step", [1, 2])
def test_camera_stays_inside_the_map_moves_little_and_matches_the_actions(trajectory, step):
    ds = PanningMapDataset(
        20, resolution=16, num_frames=64, map_size=48, trajectory=trajectory, step=step
    )
    for i in range(len(ds)):
        camera, actions = ds.camera_path(i)
        assert camera.min() >= 0
        assert camera[:, 0].max() <= 48 - 16 and camera[:, 1].max() <= 48 - 16
        delta = np.diff(camera, axis=0)
        assert np.abs(delta).sum(axis=1).max() <= step  # one axis-aligned step or a pause
        assert actions[0] == 0
        assert np.array_equal(ACTION_DELTAS[actions[1:]] * step, delta)
        assert np.array_equal(actions_from_camera(camera, step), actions)
        # it pans well away, not just jitters (a random agent's walk spreads less)
        assert np.ptp(camera, axis=0).max() >= (3 * step if trajectory == "wander" else 8)


def test_frames_are_crops_of_the_world_at_the_camera():
    ds = PanningMapDataset(3, resolution=16, num_frames=20, map_size=48)
    frames, camera, _ = ds.render(2)
    world = ds.world(2)
    for t in (0, 7, 19):
        x, y = camera[t]
        assert np.array_equal(frames[t], world[y : y + 16, x : x + 16])
    # landmarks make the world brighter in places than its textured background
    assert world.max() > 0.85 and np.median(world.max(axis=2)) < 0.7


@pytest.mark.parametrize("trajectory", [t for t in TRAJECTORIES if t != "wander"])
def test_every_path_revisits_after_at_least_half_the_clip(trajectory):
    ds = PanningMapDataset(20, resolution=16, num_frames=64, map_size=48, trajectory=trajectory)
    for i in range(len(ds)):
        camera = ds[i]["camera"]
        pairs = revisit_pairs(camera, min_gap=32)
        assert pairs and all(later - earlier == gap >= 32 for earlier, later, gap in pairs)
        assert all(torch.equal(camera[a], camera[b]) for a, b, _ in pairs)


def _same_as_previous(actions: np.ndarray) -> float:
    moving = actions[1:] != 0
    return float(np.mean(actions[1:][moving] == actions[:-1][moving]))


def test_wander_moves_cannot_be_told_from_the_past_ones():
    # a model learns to steer only if the next move is not a continuation of the last ones
    wander = PanningMapDataset(40, num_frames=64, trajectory="wander", step=2)
    walk = PanningMapDataset(40, num_frames=64, trajectory="out_and_back", step=2)
    wander_actions = np.concatenate([wander.camera_path(i)[1] for i in range(len(wander))])
    walk_actions = np.concatenate([walk.camera_path(i)[1] for i in range(len(walk))])
    counts = np.bincount(wander_actions, minlength=6)
    assert counts[5] == 0 and counts[:5].min() > 0.1 * counts[:5].sum()  # every move, often
    # a move repeats the one before about as often as holding 1-3 frames implies (~0.6),
    # much less than on the persistent walk
    assert _same_as_previous(wander_actions) < 0.7 < _same_as_previous(walk_actions)


def test_revisit_pairs_tolerance_and_excursion():
    camera = np.array([[0, 0], [0, 0], [1, 0], [5, 0], [1, 0], [0.4, 0], [0, 0]], dtype=float)
    assert revisit_pairs(camera, min_gap=5) == [(0, 5, 5), (0, 6, 6), (1, 6, 5)]
    assert revisit_pairs(camera, min_gap=5, max_overlap_shift=0.0) == [(0, 6, 6), (1, 6, 5)]
    assert (0, 1, 1) in revisit_pairs(camera, min_gap=1)
    # with an excursion required, a camera that stayed put gives no pair
    assert (0, 1, 1) not in revisit_pairs(camera, min_gap=1, min_excursion=2)
    assert (2, 4, 2) in revisit_pairs(camera, min_gap=1, min_excursion=2)
    with pytest.raises(ValueError, match="min_gap"):
        revisit_pairs(camera, min_gap=0)
    with pytest.raises(ValueError, match="camera"):
        revisit_pairs(np.zeros((5, 3)), min_gap=1)


@pytest.mark.parametrize("trajectory", ["out_and_back", "loop"])
def test_retrieval_error_is_zero_on_real_videos_and_large_on_forgetful_ones(trajectory):
    ds = PanningMapDataset(4, resolution=16, num_frames=64, map_size=48, trajectory=trajectory)
    generator = torch.Generator().manual_seed(0)
    for i in range(len(ds)):
        item = ds[i]
        real = retrieval_error(item["video"], item["camera"], min_gap=1, bins=6, max_shift=3)
        counted = [e for e, n in zip(real["errors"], real["count"], strict=True) if n]
        assert sum(real["count"]) > 0 and max(counted) == 0.0 and real["mean"] == 0.0
        assert real["gaps"] == sorted(real["gaps"]) and len(real["gaps"]) == 6
        assert len(real["edges"]) == 7 and real["edges"][0] == 1 and real["edges"][-1] == 64
        for e, n in zip(real["errors"], real["count"], strict=True):
            assert (n == 0) == np.isnan(e)

        forgetful = item["video"].clone()
        forgetful[:, 32:] = torch.rand(forgetful[:, 32:].shape, generator=generator) * 2 - 1
        bad = retrieval_error(
            forgetful.numpy(), item["camera"].numpy(), min_gap=32, bins=[32, 48, 64]
        )
        assert sum(bad["count"]) > 0 and bad["mean"] > 0.3
        assert all(e > 0.3 for e, n in zip(bad["errors"], bad["count"], strict=True) if n)


def test_retrieval_error_aligns_whole_pixel_offsets():
    ds = PanningMapDataset(1, resolution=16, num_frames=64, map_size=48)
    item = ds[0]
    exact = retrieval_error(item["video"], item["camera"], min_gap=2)
    shifted = retrieval_error(item["video"], item["camera"], min_gap=2, max_shift=4)
    assert sum(shifted["count"]) > sum(exact["count"]) and shifted["mean"] == 0.0
    # a video that drifts by a pixel at every revisit is caught once offsets are aligned
    drifted = item["video"].roll(1, dims=3)
    drifted[:, :32] = item["video"][:, :32]
    assert retrieval_error(drifted, item["camera"], min_gap=32)["mean"] > 0.02


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="map_size .* must exceed resolution"):
        PanningMapDataset(1, resolution=64, map_size=48)
    with pytest.raises(ValueError, match="must exceed resolution"):
        PanningMapDataset(1, resolution=48, map_size=48)
    with pytest.raises(ValueError, match="num_frames must be >= 2"):
        PanningMapDataset(1, num_frames=1)
    with pytest.raises(ValueError, match="num_videos"):
        PanningMapDataset(0)
    with pytest.raises(ValueError, match="step"):
        PanningMapDataset(1, step=0)
    with pytest.raises(ValueError, match="trajectory"):
        PanningMapDataset(1, trajectory="spiral")
    with pytest.raises(ValueError, match="landmark_size"):
        PanningMapDataset(1, landmark_size=(0.3, 0.1))
    video, camera = torch.zeros(3, 8, 16, 16), torch.zeros(8, 2)
    with pytest.raises(ValueError, match="camera must be"):
        retrieval_error(video, torch.zeros(7, 2))
    with pytest.raises(ValueError, match="video must be"):
        retrieval_error(video[0], camera)
    with pytest.raises(ValueError, match="min_gap"):
        retrieval_error(video, camera, min_gap=8)
    with pytest.raises(ValueError, match="bins"):
        retrieval_error(video, camera, bins=[3, 2])
    with pytest.raises(ValueError, match="max_shift"):
        retrieval_error(video, camera, max_shift=16)
    with pytest.raises(ValueError, match="discrete actions"):
        actions_from_camera(np.array([[0, 0], [1, 1]]))


def test_short_clips_still_work():
    for trajectory in ("out_and_back", "loop"):
        for frames in (2, 3, 5):
            ds = PanningMapDataset(
                2, resolution=8, num_frames=frames, map_size=10, trajectory=trajectory
            )
            assert ds[1]["video"].shape == (3, frames, 8, 8)


def test_pixel_last_seen_against_a_brute_force_search():
    data = PanningMapDataset(
        2, resolution=8, num_frames=20, map_size=20, seed=4, trajectory="mixed", step=2
    )
    for i in range(2):
        camera = data[i]["camera"].numpy().astype(np.int64)
        last = pixel_last_seen(camera, 8, 8)
        for f in range(20):
            for r in range(8):
                for c in range(8):
                    point = (camera[f, 1] + r, camera[f, 0] + c)  # (row, col) on the map
                    shown = [
                        g
                        for g in range(f)
                        if camera[g, 1] <= point[0] < camera[g, 1] + 8
                        and camera[g, 0] <= point[1] < camera[g, 0] + 8
                    ]
                    assert last[f, r, c] == (shown[-1] if shown else -1)
        # a real video shows the same colour wherever a point was seen before
        video = data[i]["video"].numpy()
        f, r, c = np.nonzero(last >= 0)
        g = last[f, r, c]
        dy, dx = (camera[f] - camera[g]).T[::-1]
        np.testing.assert_array_equal(video[:, f, r, c], video[:, g, r + dy, c + dx])
    with pytest.raises(ValueError, match="integer"):
        pixel_last_seen(np.array([[0.5, 0.0]]), 8, 8)


def test_blackout_goes_dark_in_place_and_comes_back_to_what_was_seen():
    lit = PanningMapDataset(8, resolution=8, num_frames=16, map_size=24, step=2, seed=3)
    dark = PanningMapDataset(
        8,
        resolution=8,
        num_frames=16,
        map_size=24,
        step=2,
        seed=3,
        blackout=0.5,
        blackout_frames=(3, 5),
    )
    went_dark = 0
    for i in range(8):
        item, plain = dark[i], lit[i]
        actions, camera, video = item["actions"], item["camera"], item["video"]
        off = actions == DARK
        assert torch.equal(item["video"][:, 0], plain["video"][:, 0])  # the same map
        if not off.any():
            assert torch.equal(video, plain["video"])
            continue
        went_dark += 1
        frames = torch.nonzero(off).flatten()
        start, n = int(frames[0]), len(frames)
        assert torch.equal(frames, torch.arange(start, start + n)) and 3 <= n <= 5
        assert 1 <= start and start + n <= 15  # lit frames on both sides
        assert (video[:, off] == -1).all()  # black
        assert (camera[start : start + n] == camera[start - 1]).all()  # still in the dark
        # the path around the dark is the path of a clip n frames shorter
        short = PanningMapDataset(8, resolution=8, num_frames=16 - n, map_size=24, step=2, seed=3)
        assert torch.equal(torch.cat([camera[:start], camera[start + n :]]), short[i]["camera"])
        # nothing is seen in the dark: after it, every point was last seen before it
        last = pixel_last_seen(camera.numpy().astype(np.int64), 8, 8, visible=~off.numpy())
        assert (last[start + n] < start).all() and (last[start + n] >= 0).any()
        if actions[start + n] == 0:
            assert torch.equal(video[:, start + n], video[:, start - 1])
        pairs = revisit_pairs(camera.numpy(), 1, visible=~off.numpy())
        assert pairs and not any(off[a] or off[b] for a, b, _ in pairs)
        result = retrieval_error(video, camera, visible=~off.numpy())
        assert result["mean"] == 0.0
    assert 2 <= went_dark <= 6
    fixed = PanningMapDataset(
        4,
        resolution=8,
        num_frames=16,
        map_size=24,
        blackout=1.0,
        blackout_frames=(5, 5),
        blackout_start=3,
    )
    for i in range(4):
        assert torch.equal(torch.nonzero(fixed[i]["actions"] == DARK).flatten(), torch.arange(3, 8))
    with pytest.raises(ValueError, match="blackout must be"):
        PanningMapDataset(1, blackout=2.0)
    with pytest.raises(ValueError, match="lit frame before and after"):
        PanningMapDataset(1, num_frames=8, blackout=0.5, blackout_frames=(4, 7))
    with pytest.raises(ValueError, match="lit frame before and after"):
        PanningMapDataset(1, num_frames=8, blackout=0.5, blackout_frames=(2, 2), blackout_start=0)
