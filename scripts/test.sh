#!/usr/bin/env bash
# The test command of the README and of CI: set up, then lint, type-check and run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${CKPT_VENV:-.venv}
"$VENV/bin/ruff" check ckpt tests bench examples
"$VENV/bin/mypy" ckpt
# pytest exits 5 when it collects nothing: that must fail CI, and it does (set -e).
exec "$VENV/bin/pytest" -q -p no:cacheprovider "$@"
