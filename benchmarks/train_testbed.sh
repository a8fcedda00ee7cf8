#!/usr/bin/env bash
# The training results of benchmarks/train_results.md, on a machine with a GPU (or not).
#
#   OUT=runs bash benchmarks/train_testbed.sh "ternary --preset qall ..." "p4q --format int4 ..."
#
# Each argument is one `python -m pyclipq.cli.testbed_recipes` command line; its --out is added
# ($WORK/run<i>) and its log, which ends with the results JSON, is copied to $OUT/run<i>.log. Wheels in .whl/ (open_clip_torch and its pure-Python needs, or a prebuilt
# pyclipq) are installed first for machines that cannot download them; pyclipq is built
# against the local torch when it does not import (CPU kernels only: PYCLIPQ_CUDA=OFF, the
# packed models are evaluated on the CPU). Without shipped test-bed weights the test bed is
# trained first with the recipe recorded in its metadata.
set -euo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-runs}
WORK=${WORK:-/tmp/pyclipq-train}
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd)
repo=$(pwd)
site=/tmp/pyclipq-site
mkdir -p "$site"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" .whl/*.whl
fi
started=$SECONDS
if ! (cd /tmp && python3 -c "import pyclipq") 2>/dev/null; then
  PYCLIPQ_CUDA=OFF python3 -m pip wheel -q --no-build-isolation --no-deps --no-index -w "$WORK" "$repo"
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" "$WORK"/pyclipq-*.whl
  echo "built pyclipq in $((SECONDS - started)) s"
fi
cd "$WORK"
testbed_args=()
if ! python3 -c "from pyclipq.testbed import load_testbed; load_testbed()" 2>/dev/null; then
  if [ -f "$repo/.testbed/testbed.safetensors" ]; then
    testbed_args=(--testbed "$repo/.testbed")
  else
    device=$(python3 -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
    python3 -m pyclipq.cli.testbed_train --steps 800 --vision-layers 6 --text-layers 2 --device "$device" --out "$WORK/testbed" | tail -3
    cp "$WORK"/testbed/testbed.* "$OUT"/
    testbed_args=(--testbed "$WORK/testbed")
  fi
fi
i=0
for command in "$@"; do
  i=$((i + 1))
  echo "=== run$i: $command"
  # shellcheck disable=SC2086  # each argument is a whole command line
  python3 -m pyclipq.cli.testbed_recipes $command "${testbed_args[@]}" --out "$WORK/run$i" --no-progress 2>&1 \
    | grep -v -e Warning -e warn | tee "$OUT/run$i.log" | grep -E "top-1|top1|seconds|Error|error" || true
done
echo "total $((SECONDS - started)) s"
