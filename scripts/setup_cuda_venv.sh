#!/usr/bin/env bash
# Creates (or tops up) a second venv holding the registry's CUDA torch, as a GPU user on Linux would get it
# from `pip install torch==2.13.0` (the CUDA 13.0 build, ~2.5 GB with its nvidia-* wheels; pip's cache keeps
# it between runs on one machine). This machine's pip configuration serves a local CPU wheel for that pin,
# so torch comes from the registry with that configuration ignored (--isolated, no find-links, no
# constraints). The rest of the test requirements install with the normal configuration afterwards.
#   usage: scripts/setup_cuda_venv.sh [VENV]        (default: .venv-cuda)
#   STG_EXT_CUDA_TORCH   torch requirement (default torch==2.13.0)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-cuda}
python=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
py="$venv/bin/python"
req=${STG_EXT_CUDA_TORCH:-torch==2.13.0}
if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; then
  PIP_FIND_LINKS= PIP_CONSTRAINT= "$py" -m pip install --isolated --disable-pip-version-check -q \
    --upgrade pip "setuptools>=64" wheel
  PIP_FIND_LINKS= PIP_CONSTRAINT= "$py" -m pip install --isolated --disable-pip-version-check -q "$req"
fi
"$py" -c 'import torch; assert torch.version.cuda, torch.__version__; print("cuda venv:", torch.__version__, "CUDA", torch.version.cuda)'
