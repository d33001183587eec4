"""The pipeline API: ``from_pretrained`` + ``__call__`` give exactly what ``matten sample``
writes, for clips and long videos (on the checkpoint fixtures, so nothing is trained here)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from matten import cli
from matten.data import make_grid, read_video, upscale_frames, video_to_uint8, write_video
from matten.pipelines import LongVideoPipeline, MattenPipeline, SamplingError

FIXTURES = Path(__file__).parent / "fixtures"
EXPECTED = np.load(FIXTURES / "expected.npz")


def test_clip_pipeline_reproduces_matten_sample(tmp_path):
    out = tmp_path / "clips.gif"
    assert (
        cli.main(
            [
                "sample",
                "--checkpoint",
                str(FIXTURES / "clip_run"),
                "--output",
                str(out),
                "-n",
                "2",
                "--class",
                "0",
                "--class",
                "3",
                "--steps",
                "3",
                "--seed",
                "5",
                "--cfg-scale",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    pipe = MattenPipeline.from_pretrained(FIXTURES / "clip_run")
    videos = pipe(2, [0, 3], steps=3, seed=5, cfg_scale=2.0)
    assert videos.shape == (2, 3, 4, 8, 8)
    np.testing.assert_allclose(videos.numpy(), EXPECTED["clip"], atol=1e-5, rtol=0)
    # matten sample's grid holds these frames, enlarged (lossless PNG: exact)
    grid = np.asarray(Image.open(out.with_name(out.name + ".png")).convert("RGB"))
    assert np.array_equal(grid, make_grid(upscale_frames(video_to_uint8(videos), 64)))
    # class names work as labels, and output_type="np" gives the uint8 frames
    frames = pipe(2, ["left_right", "orbit"], steps=3, seed=5, cfg_scale=2.0, output_type="np")
    assert np.array_equal(frames, video_to_uint8(videos))


def test_long_pipeline_reproduces_matten_sample_frames(tmp_path):
    out = tmp_path / "long.gif"
    assert (
        cli.main(
            [
                "sample",
                "--checkpoint",
                str(FIXTURES / "causal_run"),
                "--output",
                str(out),
                "-n",
                "1",
                "--frames",
                "6",
                "--chunk-size",
                "2",
                "--steps",
                "2",
                "--seed",
                "7",
                "--actions",
                "left,left,right,stay,up,down",
                "--no-progress",
            ]
        )
        == 0
    )
    pipe = LongVideoPipeline.from_pretrained(FIXTURES / "causal_run")
    actions = torch.tensor([[1, 1, 2, 0, 3, 4]])
    video = pipe(6, 2, steps=2, seed=7, actions=actions)
    np.testing.assert_allclose(video.numpy(), EXPECTED["causal"], atol=1e-5, rtol=0)
    # the same frames through the same writer give the same GIF matten sample wrote
    mine = write_video(tmp_path / "mine.gif", upscale_frames(video_to_uint8(video), 128)[0], fps=8)
    assert np.array_equal(read_video(mine), read_video(out))
    # streaming: the chunks as they come, decoded, are the whole video in pieces
    chunks = list(pipe.stream(6, 2, steps=2, seed=7, actions=actions))
    assert [c.start for c in chunks] == [0, 2, 4]
    assert torch.equal(torch.cat([c.frames for c in chunks], dim=2), video)


def test_pipelines_refuse_the_wrong_model_kind():
    with pytest.raises(SamplingError, match="holds a clip model"):
        LongVideoPipeline.from_pretrained(FIXTURES / "clip_run")
    with pytest.raises(SamplingError, match="--class 7 is out of range"):
        MattenPipeline.from_pretrained(FIXTURES / "clip_run")(1, 7, steps=2)
