"""Matten: video generation with Mamba-Attention latent diffusion."""

__version__ = "0.1.0"
