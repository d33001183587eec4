"""The paper's ablations at small scale, with seeds and confidence intervals.

Small models are trained from the demo config (the synthetic set; ``--dataset digits``: the
moving digits, config ``digits``) with the same step budget, then scored with the project's own
offline metrics (FD, KID and precision/recall in the motion network's v2 features, against the
run's training data; :func:`matten.eval.evaluate`):

* ``variants``: Matten variants 1-4 (paper Fig. 8a) at about the demo model's parameter count:
  each variant gets the depth whose count is closest to the demo's variant 3 (hidden 64, 2 blocks);
* ``conditioning``: M-AdaN against conditional tokens (Fig. 8b); tokens get the depth that
  brings them closest to the M-AdaN model's count (they have no modulation MLPs);
* ``size``: a ladder of hidden sizes at the demo's depth (Fig. 9).

Settings shared by groups (the demo's own model is in all three) are trained once. Every setting
is trained with ``--seeds`` seeds (``train.seed``); the table gives per setting the mean over
seeds and its 95% confidence interval (Student t), and a last block says for each of the paper's
orderings (variant 3 best; M-AdaN better than tokens; larger better) whether it holds at this
scale, is a tie (the intervals overlap) or reverses.

    python bench/ablation.py --output runs/ablation                  # ~1-1.5 h, 2 CPU cores
    python bench/ablation.py --output runs/ablation --dataset digits
    python bench/ablation.py --output runs/ablation-gpu --large      # a GPU: longer, more clips
    python bench/ablation.py --output runs/ablation --plan           # settings and counts only

Several processes: start the same command again (e.g. one per core, each with
``OMP_NUM_THREADS=1``) and the copies share the runs: each run is claimed with a lock file
beside its folder, a claimed run is left to its process and read back when done, and every copy
prints the table at the end.

Resumable: runs are trained with ``resume="auto"`` into
``OUTPUT/<dataset>/<setting>/steps<N>-seed<k>`` and each evaluation is written as JSON next to
its run (``ablation.json``), so a re-run trains and evaluates only what is missing, then prints
the table; everything is also gathered into ``OUTPUT/<dataset>/results.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import options_suffix, print_table, read_json, write_json  # noqa: E402

from matten.config import load_config  # noqa: E402

CONFIGS = {"synthetic": "demo", "digits": "digits"}
GROUPS = ("variants", "conditioning", "size")
# default: about 1 h on a 2-core CPU alone. Measured (nice, 2 threads, the machine partly busy):
# a training step of the demo's variant 3 takes ~0.45-0.77 s, of variant 1 at 8 blocks 4x that;
# all 7 settings of one seed cost ~14 variant-3 steps per step, and sampling for the evaluation
# (with guidance: 2 model calls per DDIM step) as much per clip and DDIM step / 16. 150 steps x 3
# seeds and 96 clips x 15 DDIM steps fit about an hour; 300+ steps or 128+ clips do not.
DEFAULTS = dict(steps=150, seeds=3, clips=96, sample_steps=15)
LARGE = dict(steps=4000, seeds=5, clips=1024, sample_steps=50)
MATCH_TOLERANCE = 0.15


@dataclass(frozen=True)
class Setting:
    variant: int
    depth: int
    hidden: int
    conditioning: str
    heads: int

    @property
    def name(self) -> str:
        return f"v{self.variant}-d{self.depth}-h{self.hidden}-{self.conditioning}"

    def overrides(self) -> list[str]:
        return [
            f"model.variant={self.variant}",
            f"model.depth={self.depth}",
            f"model.hidden_size={self.hidden}",
            f"model.num_heads={self.heads}",
            f"model.conditioning={self.conditioning}",
        ]


@dataclass
class Row:
    group: str
    label: str
    setting: Setting
    params: int = 0
    runs: list[dict] = field(default_factory=list)  # per seed: the evaluation's metrics


# ----------------------------------------------------------------------------------------------
# settings and parameter counts


def parameter_count(config: str, overrides: list[str], cache: dict) -> int:
    """Parameters of the model a run of ``config`` with ``overrides`` trains (built as training
    builds it: the data's channels, latent size and class count)."""
    key = (config, tuple(overrides))
    if key not in cache:
        from matten.training.setup import (
            build_dataset,
            build_denoiser,
            build_frozen_autoencoder,
            model_num_classes,
        )

        cfg = load_config(config, overrides)
        autoencoder, latent_hw = build_frozen_autoencoder(cfg)
        classes = model_num_classes(cfg, build_dataset(cfg))
        model = build_denoiser(cfg, autoencoder.latent_channels, latent_hw, classes)
        cache[key] = sum(p.numel() for p in model.parameters())
    return cache[key]


def matched_depth(config, base: list[str], make, target: int, cache: dict) -> int:
    """The depth whose parameter count is closest to ``target`` (counts grow with depth)."""
    best, depth = None, 1
    while depth <= 128:
        n = parameter_count(config, base + make(depth).overrides(), cache)
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (depth, n)
        if n > target:
            break
        depth += 1
    return best[0]


def plan(config: str, groups: list[str], hiddens: list[int], base: list[str]) -> list[Row]:
    cfg = load_config(config, base)
    depth0, hidden0 = cfg.model.depth or 2, cfg.model.hidden_size or 64
    heads = cfg.model.num_heads or 4
    cache: dict = {}
    reference = Setting(3, depth0, hidden0, "adan", heads)
    target = parameter_count(config, base + reference.overrides(), cache)
    rows = []
    if "variants" in groups:
        for v in (1, 2, 3, 4):
            depth = matched_depth(
                config, base, lambda d, v=v: Setting(v, d, hidden0, "adan", heads), target, cache
            )
            rows.append(Row("variants", f"variant {v}", Setting(v, depth, hidden0, "adan", heads)))
    if "conditioning" in groups:
        rows.append(Row("conditioning", "M-AdaN", reference))
        depth = matched_depth(
            config, base, lambda d: Setting(3, d, hidden0, "tokens", heads), target, cache
        )
        rows.append(Row("conditioning", "tokens", Setting(3, depth, hidden0, "tokens", heads)))
    if "size" in groups:
        for h in hiddens:
            if h % heads:
                raise SystemExit(f"--hidden {h}: must be a multiple of the {heads} heads")
            rows.append(Row("size", f"hidden {h}", Setting(3, depth0, h, "adan", heads)))
    for row in rows:
        row.params = parameter_count(config, base + row.setting.overrides(), cache)
        off = row.params / target - 1
        if row.group != "size" and abs(off) > MATCH_TOLERANCE:
            print(
                f"warning: {row.label} has {row.params} parameters, {off:+.0%} from the "
                f"reference {target}",
                flush=True,
            )
    return rows


# ----------------------------------------------------------------------------------------------
# training and evaluation


def run_folder(root: Path, setting: Setting, steps: int, seed: int, extra: list[str]) -> Path:
    """Where a run lives; ``--set`` options get a folder of their own (a short hash of them), so
    a run trained with other options is never taken for this one."""
    return root / setting.name / f"steps{steps}-seed{seed}{options_suffix(extra)}"


def train_run(
    config: str, run: Path, setting: Setting, steps: int, seed: int, base: list[str]
) -> dict:
    """Train (or finish) one run; returns its ``ablation.json`` with the training seconds."""
    from matten.training import train

    record_path = run / "ablation.json"
    record = read_json(record_path)
    if record.get("trained_steps") == steps:
        return record
    cfg = load_config(
        config,
        base
        + setting.overrides()
        + [
            f"train.max_steps={steps}",
            f"train.seed={seed}",
            f"train.checkpoint_every={max(50, steps // 3)}",
            "train.keep_last=1",
        ],
    )
    print(f"training {run} ({steps} steps)", flush=True)
    start = time.perf_counter()
    result = train(cfg, output=run, resume="auto", progress=sys.stderr.isatty())
    if result.stopped_by:
        raise SystemExit(f"stopped by {result.stopped_by}; run again to resume")
    seconds = time.perf_counter() - start
    record["train_seconds"] = round(
        record.get("train_seconds", 0.0) + (0.0 if result.nothing_to_do else seconds), 1
    )
    record["trained_steps"] = steps
    record["setting"] = setting.name
    record["seed"] = seed
    run.mkdir(parents=True, exist_ok=True)
    write_json(record_path, record)
    print(f"  trained in {seconds:.0f} s", flush=True)
    return record


def run_and_evaluate(config, setting: Setting, seed: int, run: Path, args, cache_dir) -> dict:
    """Train (or finish) one run and evaluate it (or read both back); its result row."""
    record = train_run(config, run, setting, args.steps, seed, args.set)
    metrics = evaluate_run(run, record, args.clips, args.sample_steps, args.steps, cache_dir)
    return {"seed": seed, "run": str(run), "train_seconds": record.get("train_seconds"), **metrics}


@contextlib.contextmanager
def claimed(run: Path, wait: bool):
    """An exclusive lock on ``run`` (a ``.lock`` file beside it) for the block; yields whether
    it was taken (``wait=False`` gives up at once when another process holds it)."""
    run.parent.mkdir(parents=True, exist_ok=True)
    with open(run.parent / f"{run.name}.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True


def eval_key(clips: int, sample_steps: int, steps: int) -> str:
    return f"step{steps}-clips{clips}-ddim{sample_steps}-seed0"


def evaluate_run(
    run: Path, record: dict, clips: int, sample_steps: int, steps: int, cache_dir: Path
) -> dict:
    """The run's metrics at these evaluation settings: read from ``ablation.json``, or computed
    with :func:`matten.eval.evaluate` and written there."""
    key = eval_key(clips, sample_steps, steps)
    evals = record.setdefault("evaluations", {})
    if key in evals:
        return evals[key]
    from matten.eval.evaluate import EvalSettings, evaluate

    print(f"evaluating {run} ({clips} clips, DDIM {sample_steps})", flush=True)
    start = time.perf_counter()
    report = evaluate(
        run,
        settings=EvalSettings(
            num_clips=clips, batch_size=min(64, clips), sampler="ddim", steps=sample_steps, seed=0
        ),
        cache_dir=cache_dir,
        progress=False,
    )
    seconds = time.perf_counter() - start
    evals[key] = {
        "fd": report["fd"],
        "kid": report["kid"]["mean"] if report["kid"] else None,
        "kid_std_err": report["kid"]["std_err"] if report["kid"] else None,
        "precision": report["precision"],
        "recall": report["recall"],
        "extractor": report["extractor"],
        "step": report["step"],
        "num_clips": report["num_clips"],
        "warning": report["warning"],
        "report": report["output"],
        "seconds": round(seconds, 1),
    }
    write_json(run / "ablation.json", record)
    kid = evals[key]["kid"]
    kid_text = "n/a" if kid is None else f"{kid:.4f}"  # KID needs a few clips on each side
    print(f"  FD {report['fd']:.3f}, KID {kid_text} ({seconds:.0f} s)", flush=True)
    return evals[key]


# ----------------------------------------------------------------------------------------------
# statistics and the verdict


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean and the 95% Student-t confidence interval over seeds (nan bounds with one seed)."""
    from scipy import stats

    x = np.asarray([v for v in values if v is not None], dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    m = float(x.mean())
    if len(x) < 2:
        return m, math.nan, math.nan
    half = float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return m, m - half, m + half


def fmt_ci(values, digits: int) -> str:
    m, lo, hi = mean_ci(values)
    if math.isnan(m):
        return "-"
    if math.isnan(lo):
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def compare(a: list[float], b: list[float]) -> str:
    """``better`` when a's interval lies wholly below b's (lower is better), ``worse`` when wholly
    above, else ``tie``."""
    _, alo, ahi = mean_ci(a)
    _, blo, bhi = mean_ci(b)
    if any(math.isnan(v) for v in (alo, ahi, blo, bhi)):
        return "tie"  # one seed: no interval, no claim
    if ahi < blo:
        return "better"
    if alo > bhi:
        return "worse"
    return "tie"


def values(row: Row, metric: str) -> list[float]:
    return [r[metric] for r in row.runs if r.get(metric) is not None]


def ordering(metric: str, rows: list[Row], claim: str) -> str:
    """The verdict on one of the paper's orderings, in one metric (lower is better)."""
    by = {r.label: r for r in rows}
    means = {r.label: mean_ci(values(r, metric))[0] for r in rows}
    ranked = " < ".join(f"{k} {v:.4g}" for k, v in sorted(means.items(), key=lambda kv: kv[1]))
    if claim == "variants":
        best = by.get("variant 3")
        others = [r for r in rows if r.label != "variant 3"]
        if best is None or not others:
            return "not run"
        results = {r.label: compare(values(best, metric), values(r, metric)) for r in others}
        if all(v == "better" for v in results.values()):
            verdict = "HOLDS (variant 3 is better than each other variant, intervals apart)"
        elif any(v == "worse" for v in results.values()):
            beat = [k for k, v in results.items() if v == "worse"]
            verdict = f"REVERSES ({', '.join(beat)} better than variant 3, intervals apart)"
        else:
            ties = [k for k, v in results.items() if v == "tie"]
            verdict = f"TIE (variant 3's interval overlaps {', '.join(ties)})"
    elif claim == "conditioning":
        if "M-AdaN" not in by or "tokens" not in by:
            return "not run"
        c = compare(values(by["M-AdaN"], metric), values(by["tokens"], metric))
        verdict = {
            "better": "HOLDS (M-AdaN better, intervals apart)",
            "worse": "REVERSES (tokens better, intervals apart)",
            "tie": "TIE (intervals overlap)",
        }[c]
    else:  # size: each larger model better than the next smaller one
        ladder = sorted(rows, key=lambda r: r.setting.hidden)
        if len(ladder) < 2:
            return "not run"
        steps = [
            (a, b, compare(values(b, metric), values(a, metric)))
            for a, b in zip(ladder, ladder[1:], strict=False)
        ]
        text = ", ".join(f"{b.label} vs {a.label}: {c}" for a, b, c in steps)
        if all(c == "better" for *_, c in steps):
            verdict = f"HOLDS ({text})"
        elif any(c == "worse" for *_, c in steps):
            verdict = f"REVERSES ({text})"
        else:
            verdict = f"TIE ({text})"
    return f"{verdict}; means: {ranked}"


CLAIMS = {
    "variants": "variant 3 best of the four (Fig. 8a)",
    "conditioning": "M-AdaN better than conditional tokens (Fig. 8b)",
    "size": "larger is better (Fig. 9)",
}


def report(rows: list[Row], dataset: str, args, extractor: str | None) -> dict:
    print()
    print(
        f"{dataset}: {args.steps} training steps per run, {args.seeds} seeds, {args.clips} "
        f"generated clips per evaluation (DDIM {args.sample_steps}) against {args.clips} "
        f"training clips, in {extractor or '?'} features; mean over seeds [95% t interval]; "
        "FD and KID lower is better, precision and recall higher"
    )
    header = [
        "group",
        "setting",
        "depth",
        "hidden",
        "params",
        "seeds",
        "FD",
        "KID",
        "precision",
        "recall",
        "train s/run",
    ]
    table = []
    for r in rows:
        secs = [x["train_seconds"] for x in r.runs if x.get("train_seconds")]
        table.append(
            [
                r.group,
                r.label,
                r.setting.depth,
                r.setting.hidden,
                f"{r.params / 1e6:.3f}M",
                len(r.runs),
                fmt_ci(values(r, "fd"), 3),
                fmt_ci(values(r, "kid"), 4),
                fmt_ci(values(r, "precision"), 2),
                fmt_ci(values(r, "recall"), 2),
                f"{np.mean(secs):.0f}" if secs else "-",
            ]
        )
    print_table(header, table)
    if args.clips < 1280:
        print(
            f"note: FD at {args.clips} clips is biased upwards (it needs about 10 clips per "
            "feature dimension); it compares only with FD at the same clip count. KID is "
            "unbiased."
        )
    print()
    print(f"verdict ({dataset}, at {args.steps} steps; 'tie' = the 95% intervals overlap):")
    verdicts = {}
    for group in [g for g in GROUPS if any(r.group == g for r in rows)]:
        group_rows = [r for r in rows if r.group == group]
        verdicts[group] = {}
        print(f"  {CLAIMS[group]}:")
        for metric in ("fd", "kid"):
            text = ordering(metric, group_rows, group)
            verdicts[group][metric] = text
            print(f"    {metric.upper():3s}: {text}")
    return verdicts


def summary(r: Row) -> dict:
    out = {
        "group": r.group,
        "setting": r.label,
        "name": r.setting.name,
        "variant": r.setting.variant,
        "depth": r.setting.depth,
        "hidden": r.setting.hidden,
        "conditioning": r.setting.conditioning,
        "params": r.params,
        "runs": r.runs,
    }
    for metric in ("fd", "kid", "precision", "recall"):
        m, lo, hi = mean_ci(values(r, metric))
        out[metric] = {"mean": m, "ci95": [lo, hi]}
    return out


# ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="folder of the runs and results")
    parser.add_argument(
        "--dataset",
        default="synthetic",
        help="synthetic (config demo), digits (config digits) or both, comma-separated",
    )
    parser.add_argument(
        "--groups", default=",".join(GROUPS), help=f"comma-separated, of {', '.join(GROUPS)}"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"training steps per run (default {DEFAULTS['steps']}; --large {LARGE['steps']})",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        help=f"seeds per setting (default {DEFAULTS['seeds']}; --large {LARGE['seeds']})",
    )
    parser.add_argument(
        "--clips",
        type=int,
        default=None,
        help=f"generated (and real) clips per evaluation (default "
        f"{DEFAULTS['clips']}; --large {LARGE['clips']})",
    )
    parser.add_argument(
        "--sample-steps",
        type=int,
        default=None,
        help=f"DDIM steps when sampling for evaluation (default "
        f"{DEFAULTS['sample_steps']}; --large {LARGE['sample_steps']})",
    )
    parser.add_argument("--hidden", default="32,64,96", help="the size ladder's hidden sizes")
    parser.add_argument(
        "--large",
        action="store_true",
        help="a GPU setting: " + ", ".join(f"{k} {v}" for k, v in LARGE.items()),
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every run (repeatable)",
    )
    parser.add_argument(
        "--plan",
        action="store_true",
        help="print the settings and their parameter counts, train nothing",
    )
    args = parser.parse_args()
    for name, value in (LARGE if args.large else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    groups = [g for g in args.groups.split(",") if g]
    datasets = [d for d in args.dataset.split(",") if d]
    for g in groups:
        if g not in GROUPS:
            raise SystemExit(f"--groups: unknown group {g!r} (of {', '.join(GROUPS)})")
    for d in datasets:
        if d not in CONFIGS:
            raise SystemExit(f"--dataset: unknown dataset {d!r} (of {', '.join(CONFIGS)})")
    if args.clips < 4:
        raise SystemExit("--clips must be at least 4")
    logging.basicConfig(level=logging.WARNING)
    hiddens = [int(h) for h in args.hidden.split(",") if h]

    for dataset in datasets:
        config = CONFIGS[dataset]
        root = Path(args.output) / dataset
        rows = plan(config, groups, hiddens, args.set)
        if args.plan:
            print_table(
                ["group", "setting", "variant", "depth", "hidden", "conditioning", "params"],
                [
                    [
                        r.group,
                        r.label,
                        r.setting.variant,
                        r.setting.depth,
                        r.setting.hidden,
                        r.setting.conditioning,
                        r.params,
                    ]
                    for r in rows
                ],
            )
            continue
        unique = list(dict.fromkeys(r.setting for r in rows))
        # every setting's seed 0 first, then seed 1, ...
        runs = [(s, seed) for seed in range(args.seeds) for s in unique]
        print(
            f"{dataset}: {len(unique)} settings x {args.seeds} seeds = {len(runs)} runs of "
            f"{args.steps} steps into {root}",
            flush=True,
        )
        results: dict = {}
        cache_dir = root / "eval-cache"
        start = time.perf_counter()
        # Several copies of this command share the runs: each run is claimed with a lock, a
        # claimed one is left to its process and read back when that process is done with it.
        deferred = []
        for i, (setting, seed) in enumerate(runs):
            run = run_folder(root, setting, args.steps, seed, args.set)
            with claimed(run, wait=False) as mine:
                if not mine:
                    print(f"  {run}: another process has it; read back later", flush=True)
                    deferred.append((setting, seed, run))
                    continue
                results[(setting, seed)] = run_and_evaluate(
                    config, setting, seed, run, args, cache_dir
                )
            print(f"[{i + 1}/{len(runs)}] {time.perf_counter() - start:.0f} s so far", flush=True)
        for setting, seed, run in deferred:
            with claimed(run, wait=True):
                results[(setting, seed)] = run_and_evaluate(
                    config, setting, seed, run, args, cache_dir
                )
        extractor = next((m["extractor"] for m in results.values() if m.get("extractor")), None)
        for r in rows:
            r.runs = [results[(r.setting, seed)] for seed in range(args.seeds)]
        verdicts = report(rows, dataset, args, extractor)
        write_json(
            root / "results.json",
            {
                "dataset": dataset,
                "config": config,
                "steps": args.steps,
                "seeds": args.seeds,
                "clips": args.clips,
                "sample_steps": args.sample_steps,
                "extractor": extractor,
                "overrides": args.set,
                "settings": [summary(r) for r in rows],
                "verdict": verdicts,
            },
        )
        print(f"results: {root / 'results.json'}")


if __name__ == "__main__":
    main()
