#!/usr/bin/env bash
# The README's test command: create/reuse the venv, install, run the lint and type checks (tests/lint.sh), then
# pytest. A failing check fails the command before pytest starts. Extra arguments go to pytest
# (e.g. `bash tests/run.sh -m slow`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/.ci/setup_env.sh"
cd "$ROOT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
bash "$ROOT/tests/lint.sh"
exec python -m pytest "$@"
