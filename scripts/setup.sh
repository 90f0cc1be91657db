#!/usr/bin/env bash
# Create .venv (if missing) and install the project with its test extras.
# Without an NVIDIA GPU the CPU build of torch is pinned, so a fresh machine does not pull a multi-GB CUDA build.
# Override with TORCH_SPEC="torch==X" (and PIP_EXTRA_INDEX_URL for a private wheel index) when needed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
if [ -z "${TORCH_SPEC:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then TORCH_SPEC="torch>=2.5"; else TORCH_SPEC="torch==2.13.0"; fi
fi
python -c "import torch" 2>/dev/null || python -m pip install -q "$TORCH_SPEC" 2>&1 | grep -v "is ignored" || true
python -m pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored" || true
# The chat page is tested in a real headless browser; install Debian's chromium when we can (root + apt).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
    || echo "setup: chromium not installed; the chat-page browser test will be skipped"
fi
python -c "import torch, ray, recursive_model; print(f'setup ok: torch {torch.__version__}, ray {ray.__version__}')"
