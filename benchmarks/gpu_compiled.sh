#!/usr/bin/env bash
# Issue 13's GPU measurements of the compiled DP step in one command, for the lent GPU machine
# (the `run` tool), from the repository root:
#     command: bash benchmarks/gpu_compiled.sh        timeout_s: 560
# Each part has its own time limit (about 8 minutes in all) and writes under $OUT:
#   1. tests/gpu_checks.py --only compiled: the compiled step (inductor; reduce-overhead, bkfx's
#      CUDA graphs) and torch.compile(fullgraph=True) around the DP model, against the eager step.
#   2. GPT-2 124M, seq 512, fp32, inductor: bkfx compiled and bkfx under torch.compile over the
#      equally compiled non-private step (the issue's target: <= 1.05x).
#   3. The small models with CUDA graphs (mode="reduce-overhead"; target <= 1.5x).
# Dry run on the CPU (tiny sizes, the same code paths, about 2 minutes):
#     bash benchmarks/gpu_compiled.sh --cpu
# Nothing beyond the GPU machine's own packages is needed: bkfx runs from this tree (PYTHONPATH).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/bkfx-gpu-compiled}
mkdir -p "$OUT"
status=0
part() {  # part LIMIT_S NAME COMMAND...: run with a time limit, keep going after a failure
    local limit=$1 name=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" || { echo "== $name FAILED (exit $?)"; status=1; }
}
if [[ " $* " == *" --cpu "* ]]; then
    part 240 checks "$PY" tests/gpu_checks.py --device cpu --only compiled --out "$OUT"
    part 240 gpt2 "$PY" benchmarks/compiled.py --device cpu --models gpt2 --batch 2 --steps 2 --warmup 1 --out "$OUT/gpt2"
    part 240 small "$PY" benchmarks/compiled.py --device cpu --models mlp30x16 --steps 2 --warmup 1 --out "$OUT/small"
    exit $status
fi
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv || true
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)"
part 150 checks "$PY" tests/gpu_checks.py --device cuda --only compiled --out "$OUT"
part 180 gpt2-124m "$PY" benchmarks/compiled.py --device cuda --models gpt2-124m --steps 10 --warmup 2 --out "$OUT/gpt2-124m"
part 180 small "$PY" benchmarks/compiled.py --device cuda --compile-mode reduce-overhead --models mlp30x16 mlp cnn vit \
    --steps 20 --out "$OUT/reduce-overhead"
exit $status
