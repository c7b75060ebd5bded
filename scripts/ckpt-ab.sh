#!/bin/bash
# Alternating checkpoint timings of two (or more) builds of limitless, for A/B comparisons on
# a noisy machine: each round launches tests/programs/mem.c holding 1 GiB of random bytes
# under each build in turn, dumps it (stopped) into DIR and prints how long the dump took.
# Usage: scripts/ckpt-ab.sh DIR ROUNDS LIMITLESS-BINARY...
set -eu
if [ $# -lt 3 ]; then
  echo "usage: $0 DIR ROUNDS LIMITLESS-BINARY... (for example: $0 /tmp 4 old/limitless new/limitless)" >&2
  exit 2
fi
out=$1 rounds=$2
shift 2
work=$(mktemp -d)
trap 'pkill -f "$work/mem" 2>/dev/null || true; rm -rf "$work"' EXIT
gcc -O2 -o "$work/mem" "$(dirname "$0")/../tests/programs/mem.c"
for _ in $(seq "$rounds"); do
  for bin in "$@"; do
    rm -f "$work/s" "$work/out"
    "$bin" launch --socket "$work/s" -- "$work/mem" 1024 random > "$work/out" 2>/dev/null &
    until grep -q READY "$work/out" 2>/dev/null; do sleep 0.1; done
    sync
    sleep 0.3
    echo "$bin: $("$bin" dump --socket "$work/s" -o "$out/ckpt-ab.img" 2>&1 | grep -o 'in [0-9.]* ms')"
    wait
    rm -f "$out/ckpt-ab.img"
    sleep 0.3
  done
done
