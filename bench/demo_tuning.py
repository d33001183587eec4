"""What holds the demo back: candidate training recipes at the demo's own budget, then sampler
settings on the best of them, scored with the project's offline metrics.

Each candidate trains the demo config (``--config``, default ``demo``) with a few overrides for
the config's own step count, into ``OUTPUT/<candidate>``, and is evaluated like ``matten eval``
(FD, KID with its standard error, precision/recall in the motion net v2's features, against the
run's training data), sampled with DDIM at the config's steps and guidance scale. Then the best
candidate (lowest KID) is sampled again with other guidance scales and DDIM step counts.
Training time is printed per candidate, so recipes that cost more per step show it.

    python bench/demo_tuning.py --output runs/demo-tuning            # ~1 h on 2 CPU cores
    python bench/demo_tuning.py --output runs/demo-tuning --candidates linear,cosine+min_snr

Resumable: a candidate's run resumes where it stopped, and every evaluation is kept in
``OUTPUT/<candidate>/tuning.json``; everything is gathered into ``OUTPUT/results.json``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _common import options_suffix, print_table, read_json, write_json  # noqa: E402

from matten.config import load_config  # noqa: E402

# The recipes compared (overrides of the demo config); each names every option it is about, so
# the comparison does not move when the config's defaults do.
CANDIDATES = {
    "linear": ["diffusion.schedule=linear", "diffusion.loss_weighting=uniform"],
    "min_snr": ["diffusion.schedule=linear", "diffusion.loss_weighting=min_snr"],
    "cosine": ["diffusion.schedule=cosine", "diffusion.loss_weighting=uniform"],
    "cosine+min_snr": ["diffusion.schedule=cosine", "diffusion.loss_weighting=min_snr"],
}
# The sampler sweep, one setting at a time from the config's (DDIM steps, guidance scale).
CFG_SCALES = (1.0, 1.5, 3.0)
SAMPLE_STEPS = (25, 100)


def run_folder(root: Path, name: str, extra: list[str]) -> Path:
    """Where a candidate lives; ``--set`` options get a folder of their own (a short hash), so
    a run trained with other options is never taken for this one."""
    return root / f"{name}{options_suffix(extra)}"


def train_candidate(config: str, run: Path, overrides: list[str]) -> dict:
    """Train (or finish) one candidate; returns its record with the training seconds."""
    from matten.training import train

    record = read_json(run / "tuning.json")
    cfg = load_config(config, overrides)
    if record.get("trained_steps") == cfg.train.max_steps:
        return record
    print(f"training {run} ({cfg.train.max_steps} steps): {' '.join(overrides)}", flush=True)
    start = time.perf_counter()
    result = train(cfg, output=run, resume="auto", progress=sys.stderr.isatty())
    if result.stopped_by:
        raise SystemExit(f"stopped by {result.stopped_by}; run again to resume")
    seconds = time.perf_counter() - start
    record["train_seconds"] = round(
        record.get("train_seconds", 0.0) + (0.0 if result.nothing_to_do else seconds), 1
    )
    record["trained_steps"] = cfg.train.max_steps
    record["overrides"] = overrides
    write_json(run / "tuning.json", record)
    print(f"  trained in {seconds:.0f} s", flush=True)
    return record


def evaluate_candidate(
    run: Path, record: dict, clips: int, steps: int | None, cfg_scale: float | None
) -> dict:
    """Metrics of the run's final EMA weights sampled with DDIM ``steps`` (None: the config's)
    at guidance ``cfg_scale`` (None: the config's); kept in ``tuning.json``. The motion net and
    the real clips' statistics are cached once for all candidates (``OUTPUT/cache``)."""
    from matten.eval.evaluate import EvalSettings, evaluate

    key = f"step{record['trained_steps']}-clips{clips}-ddim{steps or 'run'}-cfg{cfg_scale or 'run'}"
    evals = record.setdefault("evaluations", {})
    if key not in evals:
        print(f"evaluating {run} ({key})", flush=True)
        start = time.perf_counter()
        report = evaluate(
            run,
            settings=EvalSettings(
                num_clips=clips,
                batch_size=min(64, clips),
                sampler="ddim",
                steps=steps,
                cfg_scale=cfg_scale,
                seed=0,
            ),
            cache_dir=run.parent / "cache",
            progress=False,
        )
        evals[key] = {
            "fd": report["fd"],
            "kid": report["kid"]["mean"] if report["kid"] else None,
            "kid_std_err": report["kid"]["std_err"] if report["kid"] else None,
            "precision": report["precision"],
            "recall": report["recall"],
            "extractor": report["extractor"],
            "report": report["output"],
            "seconds": round(time.perf_counter() - start, 1),
        }
        write_json(run / "tuning.json", record)
    return evals[key]


def row(name: str, record: dict, metrics: dict, *extra) -> list:
    kid = metrics["kid"]
    kid_text = "n/a" if kid is None else f"{kid:.3f} ± {metrics['kid_std_err']:.3f}"
    return [
        name,
        *extra,
        f"{record.get('train_seconds', float('nan')):.0f}",
        f"{metrics['fd']:.2f}",
        kid_text,
        f"{metrics['precision']:.2f}",
        f"{metrics['recall']:.2f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="folder of the runs and results")
    parser.add_argument("--config", default="demo", help="the config the candidates start from")
    parser.add_argument(
        "--candidates", default=",".join(CANDIDATES), help=f"of {', '.join(CANDIDATES)}"
    )
    parser.add_argument("--clips", type=int, default=128, help="clips per evaluation")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run"
    )
    parser.add_argument(
        "--no-sampler-sweep", action="store_true", help="skip the guidance / DDIM-steps sweep"
    )
    args = parser.parse_args()
    names = [c for c in args.candidates.split(",") if c]
    for name in names:
        if name not in CANDIDATES:
            raise SystemExit(f"--candidates: unknown {name!r} (of {', '.join(CANDIDATES)})")
    logging.basicConfig(level=logging.WARNING)
    root = Path(args.output)
    results: dict = {"config": args.config, "set": args.set, "clips": args.clips}
    records = {}
    for name in names:
        run = run_folder(root, name, args.set)
        records[name] = train_candidate(args.config, run, CANDIDATES[name] + args.set)
        records[name]["default"] = evaluate_candidate(run, records[name], args.clips, None, None)
    print()
    headers = ["recipe", "train s", "FD", "KID", "precision", "recall"]
    print_table(headers, [row(n, records[n], records[n]["default"]) for n in names])
    results["recipes"] = {n: records[n] for n in names}

    def kid_of(n):
        kid = records[n]["default"]["kid"]
        return float("inf") if kid is None else kid

    best = min(names, key=kid_of)
    print(f"\nbest recipe by KID: {best}")
    if not args.no_sampler_sweep:
        sample = load_config(args.config, args.set).sample
        settings = [(None, None)]  # the config's own: the evaluation above
        settings += [(sample.steps, c) for c in CFG_SCALES if c != sample.cfg_scale]
        settings += [(s, sample.cfg_scale) for s in SAMPLE_STEPS if s != sample.steps]
        sweep = []
        for steps, scale in settings:
            m = evaluate_candidate(
                run_folder(root, best, args.set), records[best], args.clips, steps, scale
            )
            sweep.append(
                row(best, records[best], m, steps or sample.steps, scale or sample.cfg_scale)
            )
        print()
        print_table(["recipe", "DDIM", "cfg", *headers[1:]], sweep)
        results["sampler_sweep"] = {"recipe": best, "evaluations": records[best]["evaluations"]}
    write_json(root / "results.json", results)


if __name__ == "__main__":
    main()
