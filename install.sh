#!/usr/bin/env bash
# Install bnmove into the active Python: ./install.sh [EXTRAS], e.g. ./install.sh test
#
# torch is installed first, and only if missing: the newest (CUDA) build where an
# NVIDIA GPU is present, a CPU build elsewhere, so a CPU machine never pulls
# gigabytes of CUDA libraries. Override with BNMOVE_TORCH_SPEC, e.g.
#   BNMOVE_TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu" ./install.sh
# onnxruntime the same way, unless one is already installed: the extra "gpu"
# (onnxruntime-gpu) with a GPU, "cpu" (onnxruntime) without; BNMOVE_ORT=gpu|cpu overrides.
set -euo pipefail
cd "$(dirname "$0")"
py="${PYTHON:-python}"
extras="${1:-}"
if ! "$py" -c "import torch" >/dev/null 2>&1; then
    if [ -n "${BNMOVE_TORCH_SPEC:-}" ]; then
        spec="$BNMOVE_TORCH_SPEC"
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        spec="torch"
    else
        spec="torch==2.13.0"   # the CPU build this project's machines carry locally
    fi
    echo "install.sh: installing $spec" >&2
    # shellcheck disable=SC2086
    "$py" -m pip install --quiet $spec
fi
if [ -n "${BNMOVE_ORT:-}" ]; then
    ort="$BNMOVE_ORT"
elif "$py" -c "import onnxruntime" >/dev/null 2>&1; then
    ort=""
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    ort="gpu"
else
    ort="cpu"
fi
extras="$(printf '%s' "${extras:+$extras,}$ort" | sed 's/,$//')"
"$py" -m pip install --quiet ".${extras:+[$extras]}"
