"""`matten flops`: parameters and FLOPs of a backbone, or the paper's Table 2 side by side."""

from __future__ import annotations

import json

from ..eval.flops import flops_report
from ..models import parse_name


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "flops",
        help="parameters and FLOPs of a model (counted on the meta device, no memory)",
        description="Parameters and FLOPs of one forward pass on a frames x resolution^2 video "
        "(latent = resolution / 8 with the SD VAE, patch 2), unconditional.",
    )
    parser.add_argument("--model", default="Matten-XL/2", help="e.g. Matten-S/2 ... Latte-XL/2")
    parser.add_argument("--variant", type=int, default=3, choices=[1, 2, 3, 4])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument(
        "--table",
        action="store_true",
        help="Table 2 layout: variants 1-4 and Latte at the --model size",
    )
    parser.add_argument(
        "--thop-batch",
        type=int,
        default=3,
        help="batch of the thop-style count (Latte's published figure uses 3)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(run=lambda args: run(args, parser))


def _g(x):
    return "-" if x is None else f"{x / 1e9:.0f}"


def run(args, parser) -> int:
    try:
        _, size, patch = parse_name(args.model)
    except ValueError as exc:
        parser.error(f"--model: {exc}")
    if args.frames < 1 or args.thop_batch < 1:
        parser.error("--frames and --thop-batch must be >= 1")
    latent = args.resolution // 8
    if args.resolution < 1 or args.resolution % 8 or latent % patch:
        parser.error(
            f"--resolution {args.resolution} must be a positive multiple of "
            f"{8 * patch} (the SD VAE divides it by 8, then {patch}x{patch} patches)"
        )
    if args.table:
        entries = [(f"Matten-{size}/{patch}", v) for v in (1, 2, 3, 4)] + [
            (f"Latte-{size}/{patch}", 3)
        ]
    else:
        entries = [(args.model, args.variant)]
    reports = [
        flops_report(name, variant, args.frames, args.resolution, thop_batch=args.thop_batch)
        for name, variant in entries
    ]
    if args.json:
        print(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))
        return 0
    print(
        f"one forward pass, {args.frames}x{args.resolution}x{args.resolution} video "
        f"(latent {reports[0]['latent']} x 4 channels), unconditional; G = 1e9"
    )
    header = [
        "model",
        "variant",
        "blocks",
        "params (M)",
        "paper params (M)",
        "FLOPs counted (G)",
        "thop-style MACs x batch " + str(args.thop_batch) + " (G)",
        "Eq. 5-7 (G)",
        "paper FLOPs (G)",
    ]
    rows = [
        [
            r["model"],
            r["variant"] or "-",
            r["depth"],
            f"{r['params'] / 1e6:.1f}",
            r["paper_params_m"] or "-",
            _g(r["flops"]),
            _g(r["thop_macs"]),
            _g(r["analytic_flops"]),
            r["paper_flops_g"] or "-",
        ]
        for r in reports
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    for row in [header] + rows:
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths, strict=True)))
    if args.table:
        v3, latte = reports[2], reports[4]
        print(
            f"Matten-V3 / Latte: counted {v3['flops'] / latte['flops']:.2f}, thop-style "
            f"{v3['thop_macs'] / latte['thop_macs']:.2f} (paper: 4008 / 5572 = 0.72)"
        )
    return 0
