"""Selective scan speed and memory on CPU: our fast path vs a plain loop vs mambapy's parallel scan.

Input: B=1, L=4096, ED=768, N=16 (the global sequence of a 16x256x256 video at Matten-S width),
float32. Forward and forward+backward, best of 3, all in one run; peak memory of each
forward+backward measured in a fresh process as the growth of resident memory.

    python bench/scan.py                 # needs `pip install -e .[bench]` for mambapy
    python bench/scan.py --device cuda   # GPU: selective_scan dispatches to mamba_ssm or the chunked scan
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from _common import best_time, peak_extra_memory, print_table, report_peak  # noqa: E402

from matten.ssm import selective_scan  # noqa: E402
from matten.ssm.chunked_scan import chunked_scan  # noqa: E402

BATCH, LENGTH, DIM, NSTATE = 1, 4096, 768, 16


def inputs(device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = dict(u=torch.randn(BATCH, DIM, LENGTH, generator=g),
             delta=torch.randn(BATCH, DIM, LENGTH, generator=g) * 0.5 - 3,
             A=-torch.rand(DIM, NSTATE, generator=g) * 16,
             B=torch.randn(BATCH, NSTATE, LENGTH, generator=g),
             C=torch.randn(BATCH, NSTATE, LENGTH, generator=g),
             D=torch.randn(DIM, generator=g))
    return {k: v.to(device) for k, v in x.items()}


def ours_fast(u, delta, A, B, C, D):
    return selective_scan(u, delta, A, B, C, D, delta_softplus=True)


def ours_chunked(u, delta, A, B, C, D):
    """Our device-agnostic torch path (what CUDA runs when mamba_ssm is not installed)."""
    delta = F.softplus(delta)
    y, _ = chunked_scan(u, delta, A, B, C, u.new_zeros(BATCH, DIM, NSTATE))
    return y + u * D[:, None]


def _materialised(u, delta, A, B):
    delta = F.softplus(delta)
    deltaA = torch.exp(delta.unsqueeze(-1) * A[:, None, :])            # (B, ED, L, N)
    deltaB_u = (delta * u).unsqueeze(-1) * B.transpose(1, 2)[:, None]  # (B, ED, L, N)
    return deltaA, deltaB_u


def plain_loop(u, delta, A, B, C, D):
    """The per-step Python loop over materialised (B, ED, L, N) tensors."""
    deltaA, deltaB_u = _materialised(u, delta, A, B)
    h = u.new_zeros(BATCH, DIM, NSTATE)
    ys = []
    for a_t, bu_t, c_t in zip(deltaA.unbind(2), deltaB_u.unbind(2), C.unbind(2)):
        h = a_t * h + bu_t
        ys.append((h * c_t[:, None]).sum(-1))
    return torch.stack(ys, -1) + u * D[:, None]


def mambapy_pscan(u, delta, A, B, C, D):
    """mambapy's Blelloch parallel scan, on the same materialised tensors (its layout: B, L, ED, N)."""
    from mambapy.pscan import pscan
    deltaA, deltaB_u = _materialised(u, delta, A, B)
    hs = pscan(deltaA.transpose(1, 2), deltaB_u.transpose(1, 2))     # (B, L, ED, N)
    y = (hs @ C.transpose(1, 2).unsqueeze(-1)).squeeze(-1)           # (B, L, ED)
    return y.transpose(1, 2) + u * D[:, None]


def methods(device):
    fast = "ours (selective_scan)" if device == "cuda" else "ours (numba kernel)"
    return {fast: ours_fast, "ours (chunked torch)": ours_chunked, "plain loop": plain_loop,
            "mambapy pscan": mambapy_pscan}


def synchronised(fn, device):
    def run():
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return out
    return run


def forward_backward(fn, x):
    leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
    fn(**leaves).sum().backward()
    return leaves


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--peak-memory", metavar="METHOD")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    x = inputs(args.device)
    all_methods = methods(args.device)
    if args.peak_memory:
        report_peak(lambda: forward_backward(all_methods[args.peak_memory], x))
        return

    # Same answer first: every method against our fast path.
    ref = ours_fast(**x)
    for name, fn in all_methods.items():
        err = ((fn(**x) - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-4, f"{name} disagrees with the fast path: {err}"

    rows = []
    for name, fn in all_methods.items():
        repeats = 1 if name == "plain loop" else 3
        fwd = best_time(synchronised(lambda: fn(**x), args.device), repeats)
        fb = best_time(synchronised(lambda: forward_backward(fn, x), args.device), repeats)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            forward_backward(fn, x)
            mem = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            mem = peak_extra_memory(__file__, name)
        rows.append([name, fwd, fb, mem])
    base_f, base_fb = rows[2][1], rows[2][2]
    table = [[n, f"{f * 1e3:.0f}", f"{base_f / f:.1f}x", f"{fb * 1e3:.0f}", f"{base_fb / fb:.1f}x",
              f"{m:.0f}"] for n, f, fb, m in rows]
    size_mb = BATCH * LENGTH * DIM * NSTATE * 4 / 2**20
    where = (torch.cuda.get_device_name() if args.device == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")
    print(f"selective scan, B={BATCH} L={LENGTH} ED={DIM} N={NSTATE} float32, {where}; "
          f"one (B, L, ED, N) float32 tensor = {size_mb:.0f} MB")
    print_table(["method", "fwd ms", "fwd speed-up vs loop", "fwd+bwd ms",
                 "fwd+bwd speed-up vs loop", "fwd+bwd peak extra MB"], table)
    ours, mp = rows[0], rows[3]
    print(f"ours vs mambapy pscan: fwd {mp[1] / ours[1]:.1f}x, fwd+bwd {mp[2] / ours[2]:.1f}x faster")


if __name__ == "__main__":
    main()
