#!/usr/bin/env bash
# The test command of the README and of CI: set up, then lint, type-check and run every test.
# The tests run in two phases (scripts/test-phases.sh, docs/testing.md): two xdist workers for all
# but the tests marked `serial` (tests/serial.py), then those alone. Both phases always run; both
# must pass.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${CKPT_VENV:-.venv}
"$VENV/bin/ruff" check ckpt tests bench examples
"$VENV/bin/mypy" ckpt
exec bash scripts/test-phases.sh "$@"
