"""Checkpoints written by an earlier version of Matten (tests/fixtures, made by
make_fixtures.py before the code around the core was re-layered) load, and sample exactly the
frames they sampled then."""

from pathlib import Path

import numpy as np
import torch

from matten.checkpoint import load_for_sampling
from matten.diffusion import create_diffusion
from matten.pipelines import generate_long, sample_videos

FIXTURES = Path(__file__).parent / "fixtures"
EXPECTED = np.load(FIXTURES / "expected.npz")


def test_an_old_clip_checkpoint_samples_the_same_frames():
    clip = load_for_sampling(FIXTURES / "clip_run")
    assert clip.step == 2 and clip.num_classes == 4
    videos = sample_videos(
        clip.model,
        clip.autoencoder,
        2,
        clip.num_frames,
        clip.latent_size,
        labels=torch.tensor([0, 3]),
        sampler="ddim",
        steps=3,
        cfg_scale=2.0,
        seed=5,
        learn_sigma=clip.learn_sigma,
        diffusion_steps=clip.diffusion_steps,
        prediction=clip.prediction,
    )
    np.testing.assert_allclose(videos.numpy(), EXPECTED["clip"], atol=1e-5, rtol=0)


def test_an_old_long_video_checkpoint_samples_the_same_frames():
    causal = load_for_sampling(FIXTURES / "causal_run")
    diffusion = create_diffusion(
        "2",
        diffusion_steps=causal.diffusion_steps,
        learn_sigma=causal.learn_sigma,
        prediction=causal.prediction,
    )
    latents = generate_long(
        causal.model,
        diffusion,
        6,
        2,
        (3, *causal.latent_size),
        batch=1,
        actions=torch.tensor([[1, 1, 2, 0, 3, 4]]),
        sampler="ddim",
        clip_denoised=True,
        generator=torch.Generator().manual_seed(7),
    )
    frames = causal.autoencoder.decode(latents).clamp(-1, 1)
    np.testing.assert_allclose(frames.numpy(), EXPECTED["causal"], atol=1e-5, rtol=0)
