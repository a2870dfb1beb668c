#!/usr/bin/env bash
# The test command of the README and of CI: set up, then lint, type-check and run every test.
# The tests run in two phases (docs/testing.md): two xdist workers for all but the tests marked
# `serial` (tests/serial.py), then those alone. Both phases always run; both must pass.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${CKPT_VENV:-.venv}
"$VENV/bin/ruff" check ckpt tests bench examples
"$VENV/bin/mypy" ckpt
pytest=("$VENV/bin/pytest" -q -p no:cacheprovider)
parallel=0
"${pytest[@]}" -n 2 -m "not serial" "$@" || parallel=$?
alone=0
"${pytest[@]}" -m serial "$@" || alone=$?
# pytest exits 5 when it collects nothing: that must fail CI. With no arguments each phase has
# tests, so a 5 of either fails; a selection given as arguments may fall in one phase only.
if [ $# -gt 0 ]; then
  [ "$parallel" = 5 ] && [ "$alone" != 5 ] && parallel=0
  [ "$alone" = 5 ] && [ "$parallel" != 5 ] && alone=0
fi
echo "scripts/test.sh: two workers exit $parallel, serial exit $alone"
[ "$parallel" = 0 ] && exit "$alone"
exit "$parallel"
