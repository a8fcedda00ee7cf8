#!/usr/bin/env bash
# One call on a fresh GPU machine: build pyclipq (CUDA kernels on) against the machine's
# torch, run the whole test suite on CUDA, then the GPU microbenchmarks at CLIP shapes.
#
# Usage: benchmarks/gpu_check.sh [build] [test|gputest] [bench|quick]   (no stage = build test bench)
#        gputest: only the GPU-kernel tests; quick: a 3-shape benchmark.
# Env:   OUT (results folder, default results/gpu), PYCLIPQ_CUDA_ARCHS (default 90a:
#        Hopper only, to save compile time), PYTEST_WORKERS (default 8), BENCH_ARGS.
# Writes $OUT/build.log, $OUT/pytest_*.log, $OUT/bench_gpu.json, $OUT/bench.log.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT=${OUT:-$REPO/results/gpu}
mkdir -p "$OUT"
export PYCLIPQ_CUDA=ON PYCLIPQ_CUDA_ARCHS=${PYCLIPQ_CUDA_ARCHS:-90a} PYTHONUNBUFFERED=1
# Real Triton kernels on the GPU (tests/conftest.py only defaults the interpreter on).
export TRITON_INTERPRET=0
PY=${PYTHON:-python3}
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build test bench)
has() { local s; for s in "${stages[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

if has build; then
  t0=$(date +%s)
  # --no-build-isolation: against this machine's torch; --no-deps: nothing to download.
  if $PY -m pip install --no-build-isolation --no-deps -v . >"$OUT/build.log" 2>&1; then
    echo "build: ok in $(( $(date +%s) - t0 )) s"
  else
    echo "build: FAILED (tail of $OUT/build.log):"; tail -40 "$OUT/build.log"; exit 1
  fi
  # outside the source tree, so the installed package (with _C) is what imports
  (cd /tmp && $PY -c "import pyclipq, json; i = pyclipq.build_info(); print(json.dumps(i)); assert i['cuda']")
fi

if has test || has gputest; then
  W=${PYTEST_WORKERS:-8}
  xdist=""; $PY -c "import xdist" 2>/dev/null && xdist="-n $W"
  # GPU kernels first (the CUDA kernels, the Triton kernels on CUDA, the ops on every device) ...
  (cd /tmp && $PY -m pytest -q $xdist -p no:cacheprovider "$REPO/tests/test_cuda_ops.py" \
     "$REPO/tests/test_triton_ops.py" "$REPO/tests/test_ops.py" "$REPO/tests/test_cuda_compile.py" \
     >"$OUT/pytest_gpu.log" 2>&1) || status=1
  tail -15 "$OUT/pytest_gpu.log"
fi
if has test; then
  # ... then everything else.
  (cd /tmp && $PY -m pytest -q $xdist -p no:cacheprovider "$REPO/tests" --ignore "$REPO/tests/test_cuda_ops.py" --ignore "$REPO/tests/test_triton_ops.py" \
     --ignore "$REPO/tests/test_ops.py" --ignore "$REPO/tests/test_cuda_compile.py" \
     >"$OUT/pytest_rest.log" 2>&1) || status=1
  tail -8 "$OUT/pytest_rest.log"
fi

if has bench || has quick; then
  q=""; has quick && q="--quick"
  (cd /tmp && $PY "$REPO/benchmarks/bench_gpu.py" --out "$OUT" $q ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | \
     grep -E "Goals|goal|device:|budget|Error" ) || status=1
fi
exit $status
