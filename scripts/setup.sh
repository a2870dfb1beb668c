#!/usr/bin/env bash
# Everything ckpt needs on a fresh Debian machine, as root: compilers, a venv with ckpt and its tools.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CKPT_VENV:-.venv}
need_apt=()
command -v gcc >/dev/null || need_apt+=(gcc libc6-dev)
command -v python3 >/dev/null || need_apt+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
command -v ip >/dev/null && command -v tc >/dev/null || need_apt+=(iproute2)  # migration across network namespaces
command -v openssl >/dev/null || need_apt+=(openssl)  # the TLS migration test makes its certificate
command -v nft >/dev/null || need_apt+=(nftables)  # the network lock of `ckpt dump --tcp-established`
if [ ${#need_apt[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}"
fi
# ckpt/image/pagework.c needs xxhash.h (header only) but is optional (a Python fallback does the
# same work), so a machine without the package or a network still finishes its setup.
if [ ! -f /usr/include/xxhash.h ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libxxhash-dev \
    || echo "pagework: not built (libxxhash-dev could not be installed; the dump uses Python)"
fi
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# editable_mode=compat: a .pth line naming this directory. The default mode installs an import
# finder that every Python start of the venv loads (pathlib, fnmatch, re: ~12 ms of each `ckpt`).
"$VENV/bin/pip" install -q --disable-pip-version-check -e '.[dev,plot]' --config-settings editable_mode=compat
# pip writes the venv's interpreter over bin/ckpt's `#!python` and drops any option there: -S (no
# `site`, ~3-4 ms of every served `ckpt` here; bin/ckpt puts the venv's packages on sys.path) goes on.
sed -i '1s|^\(#!/[^ ]*python[0-9.]*\)$|\1 -S|' "$VENV/bin/ckpt"
# The dump's per-page work without the GIL (ckpt/image/pagework.py; without it, the same bytes in
# Python). Built again when its source is newer; the -mavx2 build is used where the CPU has AVX2.
pw=ckpt/image/pagework.c
for build in "_pagework.so:" "_pagework-avx2.so:-mavx2"; do
  [ -f /usr/include/xxhash.h ] || break
  so=ckpt/image/${build%%:*}
  if [ ! -f "$so" ] || [ "$pw" -nt "$so" ]; then
    gcc -O2 ${build#*:} -shared -fPIC -o "$so.tmp" "$pw" && mv "$so.tmp" "$so" \
      || echo "pagework: $so not built (gcc failed; the dump uses Python)"
  fi
done
# A frozen target's fd table and /proc files read in one call without the GIL, beside the injected
# batch (ckpt/proc/grab.py; without it, the collect reads them itself: the same answers).
pg=ckpt/proc/procgrab.c
if [ ! -f ckpt/proc/_procgrab.so ] || [ "$pg" -nt ckpt/proc/_procgrab.so ]; then
  gcc -O2 -pthread -shared -fPIC -o ckpt/proc/_procgrab.so.tmp "$pg" && mv ckpt/proc/_procgrab.so.tmp ckpt/proc/_procgrab.so \
    || echo "procgrab: not built (gcc failed; the collect reads /proc itself)"
fi
# A freeze's injected stops, their ordinary course in C (ckpt/ptrace/quickstops.py; without it,
# every stop goes through Python: the same requests).
qs=ckpt/ptrace/quickstops.c
if [ ! -f ckpt/ptrace/_quickstops.so ] || [ "$qs" -nt ckpt/ptrace/_quickstops.so ]; then
  gcc -O2 -Wall -shared -fPIC -o ckpt/ptrace/_quickstops.so.tmp "$qs" && mv ckpt/ptrace/_quickstops.so.tmp ckpt/ptrace/_quickstops.so \
    || echo "quickstops: not built (gcc failed; the stops go through Python)"
fi
# An editable install has no bytecode until a run writes it, and with PYTHONDONTWRITEBYTECODE set
# no run does: every `ckpt` command would then compile its ~50 modules again (~70 ms).
"$VENV/bin/python" -m compileall -q ckpt >/dev/null
# The same for the methods @dataclass compiles at every import (~200 M instructions of a command's
# start): ckpt/codecache.py keeps their bytecode in ckpt/__pycache__.
"$VENV/bin/python" -c 'from ckpt import codecache; codecache.build()'
echo "ckpt installed in $VENV ($("$VENV/bin/ckpt" --version))"
