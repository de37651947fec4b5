#!/usr/bin/env bash
# The GPU session in one command (see `bash bench/gpu_session.sh --help`):
#   bash bench/gpu_session.sh "$OUT" --budget 540      on the device machine
#   bash bench/gpu_session.sh OUT --dry-run            the plan, with a time estimate per step
#   bash bench/gpu_session.sh OUT --cpu-check          every step that can run here, in a no-GPU form
# Runs from the repository root with the python that holds torch (python3 there; $PYTHON overrides).
set -u
cd "$(dirname "$0")/.." || exit 2
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONUNBUFFERED=1
exec "$PY" -m bench.gpu_session "$@"
