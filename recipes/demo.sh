#!/usr/bin/env bash
# The README's demo command: a real 2-process EF21-Muon training on CPU with offline data.
# Creates/reuses the virtual environment, then runs recipes/demo.py (extra arguments go to it).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/.ci/setup_env.sh"
cd "$ROOT"
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONWARNINGS=ignore
exec python recipes/demo.py "$@"
