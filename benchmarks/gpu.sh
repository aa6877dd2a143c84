#!/usr/bin/env bash
# The GPU benchmark of issue 12 in one command (benchmarks/gpu.py says what it measures).
#
# On the lent GPU machine (the `run` tool), from the repository root, with the wheels in .whl/:
#     command: bash benchmarks/gpu.sh        carry: [".whl"]        timeout_s: 540
# It takes about 5 minutes on an H100 (at most ~7.5: every workload and search has a time limit)
# and writes results-gpu-<device>.md/.json to $OUT and benchmarks/results/.
#
# Dry run on the CPU (tiny sizes, the same code path, < 60 s; tests/test_benchmarks.py runs it):
#     bash benchmarks/gpu.sh --cpu          (or BKFX_GPU_DRY_RUN=1 bash benchmarks/gpu.sh)
#
# .whl/ holds opacus, dp-accounting, dm-tree and their pure dependencies for CPython 3.12 (the
# GPU machine has none of them; see shared/GPU.md); prepare it with
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl opacus==1.6.0 dp-accounting==0.6.0 "dm-tree~=0.1.8" opt-einsum absl-py "attrs>=22,<24" wrapt
# bkfx itself runs from this source tree (PYTHONPATH), not installed.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [[ -d .whl ]] && compgen -G ".whl/*.whl" > /dev/null && [[ " $* " != *" --cpu "* && "${BKFX_GPU_DRY_RUN:-}" != 1 ]]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
if [[ " $* " != *" --cpu "* && "${BKFX_GPU_DRY_RUN:-}" != 1 ]]; then
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv || true
fi
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)"
exec "$PY" benchmarks/gpu.py "$@"
