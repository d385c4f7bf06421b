#!/usr/bin/env bash
# The device check (tests/gpu_check.py's docstring says what it measures): one table, printed last.
#   bash tests/gpu_check.sh            # one GPU (H100/H200): random-init Qwen2.5 0.5b and 1.5b shapes
#   bash tests/gpu_check.sh --smoke    # CPU: the same code on a tiny shape (tests/test_plan.py runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
exec python tests/gpu_check.py "$@"
