#!/usr/bin/env bash
# The pytest part of scripts/test.sh, run from the project's directory: two xdist workers for every
# test but those marked `serial`, then those alone (docs/testing.md). Both phases always run; the
# exit status is the first failing phase's.
#
# Arguments go to both phases, composed with each phase's own selection: paths, node ids and -k
# restrict both; a -m expression is joined to each phase's with "and" (several: all of them).
# The workers are the phases' own: -n, -d, --dist, --tx, --numprocesses, --maxprocesses are refused.
# pytest exits 5 when it collects nothing: that fails, unless the arguments select tests and the
# other phase ran some (a selection may fall in one phase only).
set -euo pipefail
VENV=${CKPT_VENV:-.venv}
marks=()
rest=()
restricted=0
args=("$@")
n=${#args[@]}
i=0
while [ "$i" -lt "$n" ]; do
  a=${args[$i]}
  case $a in
    --)
      rest+=("${args[@]:$i}")
      [ $((n - i)) -gt 1 ] && restricted=1
      break
      ;;
    -m)
      i=$((i + 1))
      if [ "$i" -ge "$n" ]; then
        echo "scripts/test.sh: -m needs a mark expression" >&2
        exit 2
      fi
      marks+=("${args[$i]}")
      ;;
    -m?*) marks+=("${a#-m}") ;;
    -n | -n?* | -d | --numprocesses | --numprocesses=* | --maxprocesses | --maxprocesses=* | --dist | --dist=* | --tx | --tx=*)
      echo "scripts/test.sh: $a refused: the phases run their own workers (two, then one); for others run pytest itself" >&2
      exit 2
      ;;
    -k | --deselect | --ignore | --ignore-glob)  # a selection, with its value
      restricted=1
      rest+=("$a")
      i=$((i + 1))
      [ "$i" -lt "$n" ] && rest+=("${args[$i]}")
      ;;
    -k?* | --deselect=* | --ignore=* | --ignore-glob=*) restricted=1 && rest+=("$a") ;;
    -p | -c | -o | -W | -r | --rootdir | --basetemp | --confcutdir | --junitxml | --junit-xml | --tb | --durations)
      rest+=("$a")  # an option with a value that is not a selection
      i=$((i + 1))
      [ "$i" -lt "$n" ] && rest+=("${args[$i]}")
      ;;
    -*) rest+=("$a") ;;
    *)
      # A path or node id selects; anything else is the value of an option taking one after a
      # space (--maxfail 3, --timeout 600, --log-level INFO), which must not hide an empty phase.
      if [ -e "$a" ] || [[ $a == *::* ]]; then
        restricted=1
      fi
      rest+=("$a")
      ;;
  esac
  i=$((i + 1))
done
sel=""
[ ${#marks[@]} -gt 0 ] && restricted=1
for m in "${marks[@]}"; do
  sel+=" and ($m)"
done
pytest=("$VENV/bin/pytest" -q -p no:cacheprovider)
parallel=0
"${pytest[@]}" -n 2 -m "not serial$sel" "${rest[@]}" || parallel=$?
alone=0
"${pytest[@]}" -m "serial$sel" "${rest[@]}" || alone=$?
# 0 or 1: the phase collected tests and ran them.
ran() { [ "$1" = 0 ] || [ "$1" = 1 ]; }
if [ "$restricted" = 1 ]; then
  [ "$parallel" = 5 ] && ran "$alone" && parallel=0
  [ "$alone" = 5 ] && ran "$parallel" && alone=0
fi
echo "scripts/test.sh: two workers exit $parallel, serial exit $alone"
[ "$parallel" = 0 ] && exit "$alone"
exit "$parallel"
