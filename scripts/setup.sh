#!/usr/bin/env bash
# Set up a virtual environment (default .venv) with the CPU build of torch and everything else.
# Usage: bash scripts/setup.sh            (VENV=path to choose another location)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip
# torch first, pinned: a bare or open-ended torch requirement would pull a multi-GB CUDA build.
"$PY" -m pip install --quiet torch==2.13.0
"$PY" -m pip install --quiet -c constraints.txt -e ".[dev]"
# dev pulls the ocr extra; RapidOCR's opencv-python needs libGL.so.1 (without it the OCR tests are skipped).
"$PY" -c "import rapidocr_onnxruntime" 2>/dev/null \
    || echo "warning: rapidocr_onnxruntime does not import (no libGL.so.1? apt-get install libgl1); OCR tests will skip"
# torchvision from PyPI is a CUDA build; this hook lets it import beside CPU torch (docs/conventions.md, "torchvision").
"$PY" scripts/torchvision_cpu_hook.py --install
"$PY" -c "import shared, flowalign, llmalign, open_clip, diffusers, transformers, peft, math_verify; print('environment ready')"
