#!/usr/bin/env bash
# Create or reuse the project's virtual environment and install what ef-lightning needs.
# Sourced by tests/run.sh (the test command) and recipes/demo.sh (the demo). torch goes first and pinned: an unpinned torch
# (or a range admitting newer releases) would pull several GB of CUDA wheels.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${EF_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment at $VENV"
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.ef_lightning_installed"
want="$(cat "$ROOT/constraints.txt" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing torch 2.13.0 first (on these machines the pin resolves to the CPU wheel), then ef-lightning[dev] with constraints.txt"
  python -m pip install -q --upgrade pip
  python -m pip install -q "torch==2.13.0"
  python -m pip install -q -c "$ROOT/constraints.txt" -e "$ROOT[dev]"
  echo "$want" > "$stamp"
else
  echo "[setup] reusing $VENV (dependencies unchanged)"
fi
