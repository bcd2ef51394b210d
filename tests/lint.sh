#!/usr/bin/env bash
# Lint, format and type checks of the library: ef_lightning/ and callbacks/ (installed as ef_lightning.callbacks).
# tests/run.sh (the README's test command, which CI runs) calls this before pytest. Every stage runs and prints one
# line; the script exits non-zero if any stage failed. Configuration: [tool.ruff] and [tool.mypy] in pyproject.toml;
# versions pinned in constraints.txt. Fix formatting with `ruff format ef_lightning callbacks`.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${VIRTUAL_ENV:-}" ]; then
  # shellcheck disable=SC1091
  source "$ROOT/.ci/setup_env.sh"
fi
cd "$ROOT" || exit 2
PATHS=(ef_lightning callbacks)
failed=()

stage() {  # stage NAME COMMAND...: run it, show its output only on failure, print one status line
  local name="$1" out rc
  shift
  out="$("$@" 2>&1)"
  rc=$?
  if [ "$rc" -eq 0 ]; then
    echo "[lint] $name: ok"
  else
    printf '%s\n' "$out"
    echo "[lint] $name: FAILED (exit $rc): $*"
    failed+=("$name")
  fi
}

stage "ruff check" python -m ruff check --no-cache "${PATHS[@]}"
stage "ruff format --check" python -m ruff format --check --no-cache "${PATHS[@]}"
stage "mypy" python -m mypy "${PATHS[@]}"

if [ "${#failed[@]}" -gt 0 ]; then
  (IFS=,; echo "[lint] FAILED: ${failed[*]}")
  exit 1
fi
