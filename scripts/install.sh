#!/usr/bin/env bash
# Fresh-machine setup: a virtual environment, torch, and pyclipq built against that torch.
# Usage: scripts/install.sh [VENV_DIR]   (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
python3 -m venv "$venv"
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
# torch first: pyclipq compiles against whatever torch is installed.
python -m pip install -q torch==2.14.1 torchvision==0.29.1
python -m pip install -q scikit-build-core pybind11 ninja cmake
# --no-build-isolation: build against the torch above, never download a second one.
# peers (ONNX Runtime, OpenVINO, NNCF) adds about 10 s of wheels and no conflicts: its tests run in CI.
python -m pip install -q --no-build-isolation ".[clip,test,plot,triton,peers,data]"
# from outside the source tree, so the installed package is the one imported
(cd / && python -c "import pyclipq, json; print(json.dumps(pyclipq.build_info()))")
