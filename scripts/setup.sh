#!/usr/bin/env bash
# Sets up ./.venv with everything stg_ext needs on a fresh machine of this project's kind (CPU-only
# x86_64, Python 3.11), then builds stg_ext in place. Safe to run again: it only adds what is missing.
#   STG_EXT_TORCH   torch requirement to install (default: torch==2.13.0, the CPU wheel on this machine;
#                   an unpinned torch would pull a multi-GB CUDA build)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip "setuptools>=64" wheel
"${pip[@]}" install "${STG_EXT_TORCH:-torch==2.13.0}"
# --no-build-isolation: the C++ ops compile against the torch installed above.
"${pip[@]}" install --no-build-isolation -e ".[test,triton,bench,cli]"
.venv/bin/python -c "import stg_ext; print('stg_ext', stg_ext.__version__, 'backends:', stg_ext.available_backends())"
