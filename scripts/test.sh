#!/usr/bin/env bash
# The test suite: every op against its reference (CPU AVX2 and scalar paths, Triton
# through its interpreter on CPU tensors), plus an nvcc compile of every .cu file
# for sm_80 and sm_90a whenever nvcc exists. Run inside the environment from install.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=1
# `pytest`, not `python -m pytest`: the installed package is tested, not the source tree.
# -rs: every skipped test says why (a kernel table this CPU lacks, no CUDA device, ...).
pytest -q -rs "$@"
