#!/usr/bin/env bash
# Every GPU table of bench/RESULTS.md in one run, sized for a lent GPU machine's single command
# (at most 10 minutes): the selective scan's backends at L = 4096 and 16384 with their memory and
# bandwidth-floor fractions (bench/scan.py), the depthwise conv's Triton backward against torch's
# (bench/conv.py), Matten-S/2 v1-v4 and Latte-S/2 at 16/32/64 frames (bench/backbone.py), and one
# training step against Latte (bench/train.py).
#
# Needs a CUDA GPU, PyTorch, Triton and matten's own imports (numba, einops, scipy, pyyaml,
# tqdm); not mamba_ssm (timed when it imports) and not an installed matten: the checkout's src/
# is put on PYTHONPATH. mambapy (pure Python, for the pscan rows) is installed from wheels in
# .whl/ when the machine lacks it. On a machine that reaches no package registry, prepare them
# here first and carry them:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl mambapy==1.2.0
#   bash bench/gpu.sh [OUT]        # with .whl carried along; tables to stdout and OUT/*.txt
#
# PYTHON names the interpreter (default python3).
#
# Each benchmark runs under its own time limit; one that fails or runs out is reported and the
# next one still runs. The exit status is the number of benchmarks that did not finish.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-bench/gpu-out}}
mkdir -p "$out"

py=${PYTHON:-python3}
if [ -d .whl ] && ! "$py" -c "import mambapy" 2>/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/matten-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/matten-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1

if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "bench/gpu.sh: no CUDA device for $py (no torch, or torch.cuda.is_available() is False)" >&2
    exit 2
fi
{
    nvidia-smi -L 2>/dev/null
    "$py" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch',
torch.__version__, '| triton', triton.__version__, '|', torch.cuda.get_device_name())"
    "$py" -c "import mambapy" 2>/dev/null && echo "mambapy: yes" || echo "mambapy: not found"
} | tee "$out/environment.txt"

failed=0
run() {  # run NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name: $* (limit ${limit} s)"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
    local status=${PIPESTATUS[0]}
    if [ "$status" -ne 0 ]; then
        echo "== $name did not finish (exit status $status)" | tee -a "$out/$name.txt"
        failed=$((failed + 1))
    fi
}
run scan 220 "$py" bench/scan.py --device cuda
run conv 50 "$py" bench/conv.py --device cuda
run backbone 170 "$py" bench/backbone.py --device cuda
run train 110 "$py" bench/train.py --device cuda
exit "$failed"
