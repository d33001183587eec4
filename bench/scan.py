"""Selective scan speed and memory: our backends against a plain loop and mambapy's parallel scan.

Input: B=1, ED=768, N=16, float32, L=4096 (the global sequence of a 16x256x256 video at Matten-S
width). Forward and forward+backward, best of 3, all in one run.

CPU (default): our numba kernel, our chunked torch scan, the plain loop and mambapy's pscan; peak
memory of each forward+backward measured in a fresh process as the growth of resident memory.
Then the numba kernel with B and C in each of mamba_ssm's layouts (variable, grouped, constant).

CUDA (``--device cuda``): our Triton kernels, mamba_ssm's CUDA kernel (when it imports), our
chunked torch scan and mambapy's pscan, at L=4096 and L=16384; peak memory from the CUDA
allocator. Each row also gives the method's fraction of the memory-bandwidth floor: the bytes a
fused scan must move (read u, delta, B, C, A, D and write y; the backward also reads the output
gradient and writes du, ddelta, dB, dC, dA, dD; all float32) divided by the HBM bandwidth
(``--hbm-gbps``, default the H200's 4800 GB/s). Then Triton and the chunked scan per layout.

    python bench/scan.py                      # needs `pip install -e .[bench]` for mambapy
    python bench/scan.py --length 512         # a quick run
    python bench/scan.py --device cuda        # GPU
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from _common import best_time, peak_extra_memory, print_table, report_peak  # noqa: E402

from matten.ssm import backend, selective_scan  # noqa: E402

BATCH, DIM, NSTATE, GROUPS = 1, 768, 16, 4
CPU_LENGTHS, CUDA_LENGTHS = [4096], [4096, 16384]
LAYOUTS = ["variable", "grouped", "constant"]


def inputs(length, device="cpu", layout="variable", seed=0):
    """u, delta, A, B, C, D of one benchmark scan; B and C in ``layout`` (G=4 when grouped)."""
    g = torch.Generator().manual_seed(seed)
    coeff = {
        "variable": (BATCH, NSTATE, length),
        "grouped": (BATCH, GROUPS, NSTATE, length),
        "constant": (DIM, NSTATE),
    }[layout]
    x = dict(
        u=torch.randn(BATCH, DIM, length, generator=g),
        delta=torch.randn(BATCH, DIM, length, generator=g) * 0.5 - 3,
        A=-torch.rand(DIM, NSTATE, generator=g) * 16,
        B=torch.randn(*coeff, generator=g),
        C=torch.randn(*coeff, generator=g),
        D=torch.randn(DIM, generator=g),
    )
    return {k: v.to(device) for k, v in x.items()}


def scan_with(name):
    """Our selective_scan on one named backend (softplus on delta, D skip, no z)."""

    def scan(u, delta, A, B, C, D):
        return selective_scan(u, delta, A, B, C, D, delta_softplus=True, backend=name)

    return scan


def _materialised(u, delta, A, B):
    delta = F.softplus(delta)
    deltaA = torch.exp(delta.unsqueeze(-1) * A[:, None, :])  # (B, ED, L, N)
    deltaB_u = (delta * u).unsqueeze(-1) * B.transpose(1, 2)[:, None]  # (B, ED, L, N)
    return deltaA, deltaB_u


def plain_loop(u, delta, A, B, C, D):
    """The per-step Python loop over materialised (B, ED, L, N) tensors."""
    deltaA, deltaB_u = _materialised(u, delta, A, B)
    h = u.new_zeros(BATCH, DIM, NSTATE)
    ys = []
    for a_t, bu_t, c_t in zip(deltaA.unbind(2), deltaB_u.unbind(2), C.unbind(2), strict=True):
        h = a_t * h + bu_t
        ys.append((h * c_t[:, None]).sum(-1))
    return torch.stack(ys, -1) + u * D[:, None]


def mambapy_pscan(u, delta, A, B, C, D):
    """mambapy's Blelloch parallel scan, on the same materialised tensors (its layout: B, L, ED,
    N)."""
    from mambapy.pscan import pscan

    deltaA, deltaB_u = _materialised(u, delta, A, B)
    hs = pscan(deltaA.transpose(1, 2), deltaB_u.transpose(1, 2))  # (B, L, ED, N)
    y = (hs @ C.transpose(1, 2).unsqueeze(-1)).squeeze(-1)  # (B, L, ED)
    return y.transpose(1, 2) + u * D[:, None]


def methods(device):
    """name -> function; the first is the reference the others must agree with."""
    if device == "cpu":
        return {
            "ours (numba kernel)": scan_with("cpu"),
            "ours (chunked torch)": scan_with("chunked"),
            "plain loop": plain_loop,
            "mambapy pscan": mambapy_pscan,
        }
    found = {"ours (triton)": scan_with("triton")}
    try:
        backend("cuda", override="mamba_ssm")
        found["mamba_ssm"] = scan_with("mamba_ssm")
    except RuntimeError as why:
        print(f"mamba_ssm not timed: {why}")
    found.update({"ours (chunked torch)": scan_with("chunked"), "mambapy pscan": mambapy_pscan})
    return found


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


def cuda_peak_mb(fn, x):
    """Growth of the CUDA allocator's peak over what is allocated before one forward+backward."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    forward_backward(fn, x)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def floor_bytes(length, layout="variable"):
    """Bytes a fused float32 scan must move: (forward, forward+backward)."""
    per_channel = BATCH * DIM * length  # one of u, delta, y, dy, du, ddelta
    if layout == "constant":
        coeff = DIM * NSTATE  # one of B, C, dB, dC
    else:
        coeff = BATCH * (GROUPS if layout == "grouped" else 1) * NSTATE * length
    params = DIM * NSTATE + DIM  # A and D, or dA and dD
    fwd = 3 * per_channel + 2 * coeff + params  # read u, delta, B, C, A, D; write y
    # The backward reads u, delta, B, C, A, D and dy, and writes du, ddelta, dB, dC, dA, dD.
    bwd = (3 * per_channel + 2 * coeff + params) + (2 * per_channel + 2 * coeff + params)
    return 4 * fwd, 4 * (fwd + bwd)


def time_method(fn, x, device, repeats):
    fwd = best_time(synchronised(lambda: fn(**x), device), repeats)
    fb = best_time(synchronised(lambda: forward_backward(fn, x), device), repeats)
    return fwd, fb


def check_agreement(all_methods, x):
    """Same answer first: every method against the first one."""
    ref = next(iter(all_methods.values()))(**x)
    for name, fn in all_methods.items():
        err = ((fn(**x) - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-4, f"{name} disagrees with {next(iter(all_methods))}: {err}"


def where(device):
    return (
        torch.cuda.get_device_name()
        if device == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )


def cpu_table(length, repeats):
    x = inputs(length)
    all_methods = methods("cpu")
    check_agreement(all_methods, x)
    rows = []
    for name, fn in all_methods.items():
        fwd, fb = time_method(fn, x, "cpu", 1 if name == "plain loop" else repeats)
        rows.append([name, fwd, fb, peak_extra_memory(__file__, name, "--length", str(length))])
    base_f, base_fb = rows[2][1], rows[2][2]
    table = [
        [
            n,
            f"{f * 1e3:.0f}",
            f"{base_f / f:.1f}x",
            f"{fb * 1e3:.0f}",
            f"{base_fb / fb:.1f}x",
            f"{m:.0f}",
        ]
        for n, f, fb, m in rows
    ]
    print(
        f"selective scan, B={BATCH} L={length} ED={DIM} N={NSTATE} float32, {where('cpu')}; "
        f"one (B, L, ED, N) float32 tensor = {BATCH * length * DIM * NSTATE * 4 / 2**20:.0f} MB"
    )
    print_table(
        [
            "method",
            "fwd ms",
            "fwd speed-up vs loop",
            "fwd+bwd ms",
            "fwd+bwd speed-up vs loop",
            "fwd+bwd peak extra MB",
        ],
        table,
    )
    ours, mp = rows[0], rows[3]
    print(
        f"ours vs mambapy pscan: fwd {mp[1] / ours[1]:.1f}x, fwd+bwd {mp[2] / ours[2]:.1f}x faster"
    )


def cuda_table(length, repeats, hbm_gbps):
    x = inputs(length, "cuda")
    all_methods = methods("cuda")
    check_agreement(all_methods, x)
    floor_f, floor_fb = (b / (hbm_gbps * 1e9) for b in floor_bytes(length))
    rows = []
    for name, fn in all_methods.items():
        fwd, fb = time_method(fn, x, "cuda", repeats)
        rows.append([name, fwd, fb, cuda_peak_mb(fn, x)])
    pscan_f, pscan_fb = rows[-1][1], rows[-1][2]
    table = [
        [
            n,
            f"{f * 1e3:.2f}",
            f"{pscan_f / f:.1f}x",
            f"{floor_f / f:.1%}",
            f"{fb * 1e3:.2f}",
            f"{pscan_fb / fb:.1f}x",
            f"{floor_fb / fb:.1%}",
            f"{m:.0f}",
        ]
        for n, f, fb, m in rows
    ]
    print(
        f"\nselective scan, B={BATCH} L={length} ED={DIM} N={NSTATE} float32, {where('cuda')}; "
        f"one (B, L, ED, N) float32 tensor = {BATCH * length * DIM * NSTATE * 4 / 2**20:.0f} MB; "
        f"bandwidth floor at {hbm_gbps:.0f} GB/s: fwd {floor_f * 1e6:.1f} us, "
        f"fwd+bwd {floor_fb * 1e6:.1f} us"
    )
    print_table(
        [
            "method",
            "fwd ms",
            "fwd vs pscan",
            "fwd % of floor",
            "fwd+bwd ms",
            "fwd+bwd vs pscan",
            "fwd+bwd % of floor",
            "fwd+bwd peak extra MB",
        ],
        table,
    )
    if "mamba_ssm" in all_methods:
        ours, fused = rows[0], rows[1]
        print(
            f"triton vs mamba_ssm: fwd {ours[1] / fused[1]:.2f}x, "
            f"fwd+bwd {ours[2] / fused[2]:.2f}x its time"
        )


def layout_table(device, length, repeats, hbm_gbps):
    """Our fast backends with B and C in each layout; time relative to the variable layout."""
    names = ["cpu"] if device == "cpu" else ["triton", "chunked"]
    rows = []
    for name in names:
        base = None
        for layout in LAYOUTS:
            x = inputs(length, device, layout)
            fwd, fb = time_method(scan_with(name), x, device, repeats)
            base = base or (fwd, fb)
            row = [
                name,
                layout,
                f"{fwd * 1e3:.2f}",
                f"{fwd / base[0]:.2f}x",
                f"{fb * 1e3:.2f}",
                f"{fb / base[1]:.2f}x",
            ]
            if device == "cuda":
                row.append(f"{floor_bytes(length, layout)[1] / (hbm_gbps * 1e9) / fb:.1%}")
            rows.append(row)
    header = [
        "backend",
        "B, C layout",
        "fwd ms",
        "fwd vs variable",
        "fwd+bwd ms",
        "fwd+bwd vs variable",
    ] + (["fwd+bwd % of floor"] if device == "cuda" else [])
    print(
        f"\nB and C layouts (grouped: G={GROUPS}; constant: (ED, N)), L={length}, {where(device)}"
    )
    print_table(header, rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--length",
        type=int,
        action="append",
        help=f"sequence length (repeatable; default {CPU_LENGTHS} on CPU, {CUDA_LENGTHS} on CUDA)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per method (best kept)")
    parser.add_argument(
        "--hbm-gbps",
        type=float,
        default=4800.0,
        help="GPU memory bandwidth for the floor, GB/s (default: H200)",
    )
    parser.add_argument("--no-layouts", action="store_true", help="skip the layout table")
    parser.add_argument("--peak-memory", metavar="METHOD", help=argparse.SUPPRESS)
    args = parser.parse_args()
    lengths = args.length or (CUDA_LENGTHS if args.device == "cuda" else CPU_LENGTHS)
    if args.peak_memory:  # child process of peak_extra_memory (CPU)
        x = inputs(lengths[0])
        report_peak(lambda: forward_backward(methods("cpu")[args.peak_memory], x))
        return

    print(f"selective_scan backend for {args.device}: {backend(args.device)}")
    for length in lengths:
        if args.device == "cuda":
            cuda_table(length, args.repeats, args.hbm_gbps)
        else:
            cpu_table(length, args.repeats)
    if not args.no_layouts:
        layout_table(args.device, lengths[0], args.repeats, args.hbm_gbps)


if __name__ == "__main__":
    main()
