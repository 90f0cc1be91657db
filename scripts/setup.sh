#!/usr/bin/env bash
# Create .venv (if missing) and install the project with its test extras.
# Usage: bash scripts/setup.sh [EXTRA,...]   e.g. `eval` adds lm-eval + transformers (the test command asks for it;
# the main job does not need them and installs ~2 minutes faster without).
# Without an NVIDIA GPU the CPU build of torch is pinned, so a fresh machine does not pull a multi-GB CUDA build.
# Override with TORCH_SPEC="torch==X" (and PIP_EXTRA_INDEX_URL for a private wheel index) when needed.
# Nothing is installed outside .venv unless RNC_SETUP_SYSTEM=1 (CI sets it): then, as root with apt-get, Debian's
# chromium for the chat-page browser test. Without a browser that one test is skipped. Running as root in a user's
# container is no request to change its system packages.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${RNC_SETUP_SYSTEM:-0}" in
  0|1) ;;
  *) echo "setup: RNC_SETUP_SYSTEM=${RNC_SETUP_SYSTEM} must be 0 (install into .venv only, the default) or 1" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
if [ -z "${TORCH_SPEC:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then TORCH_SPEC="torch>=2.5"; else TORCH_SPEC="torch==2.13.0"; fi
fi
python -c "import torch" 2>/dev/null || python -m pip install -q "$TORCH_SPEC" 2>&1 | grep -v "is ignored" || true
EXTRAS="dev${1:+,$1}"
python -m pip install -q -e ".[$EXTRAS]" 2>&1 | grep -v "is ignored" || true
# The chat page is tested in a real headless browser; install Debian's chromium only when asked (see the top).
if [ "${RNC_SETUP_SYSTEM:-0}" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
      || echo "setup: chromium not installed; the chat-page browser test will be skipped"
  else
    echo "setup: RNC_SETUP_SYSTEM=1 installs chromium with apt-get as root; not root or no apt-get, so the" \
      "chat-page browser test will be skipped"
  fi
fi
python -c "import torch, ray, recursive_model; print(f'setup ok: torch {torch.__version__}, ray {ray.__version__}')"
