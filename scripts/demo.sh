#!/usr/bin/env bash
# The demo: build the bundled example, start it, dump it fully and twice incrementally while it
# works, then show, read, diff and verify the layers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
VENV=${CKPT_VENV:-.venv}
CKPT="$VENV/bin/ckpt"
mkdir -p examples/bin
gcc -O1 -Wall -o examples/bin/counter examples/counter.c
work=$(mktemp -d /tmp/ckpt-demo.XXXXXX)
trap 'kill $pid 2>/dev/null || true; rm -rf "$work"' EXIT
mkfifo "$work/ready"
examples/bin/counter "$work/ready" &
pid=$!
read -r addr <"$work/ready"     # the example says where its table lives once it is ready
echo "== example pid $pid, its table at $addr"
echo; echo "== ckpt check"; "$CKPT" check
echo; echo "== full dump";            "$CKPT" dump --pid "$pid" -D "$work/dump"
echo; echo "== incremental dump 1";   "$CKPT" dump --pid "$pid" -D "$work/dump" --incremental
echo; echo "== incremental dump 2";   "$CKPT" dump --pid "$pid" -D "$work/dump" --incremental
last=$(ls "$work/dump"/layer-*.ckpt | tail -n 1)
first=$(ls "$work/dump"/layer-*.ckpt | head -n 1)
echo; echo "== ckpt show $last"; "$CKPT" show "$last"
echo; echo "== ckpt read: the first 64 bytes of the table"; "$CKPT" read "$last" --addr "$addr" --size 64
echo; echo "== ckpt diff first last"; "$CKPT" diff "$first" "$last" || true
echo; echo "== ckpt verify"; "$CKPT" verify "$last"
