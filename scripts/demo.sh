#!/usr/bin/env bash
# Builds Limitless, runs a small program under the engine, checkpoints it (stopping it)
# after 3 seconds, inspects the image, and restores it to run to the end.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked
L="$PWD/target/release/limitless"
work=$(mktemp -d /tmp/limitless-demo.XXXXXX)
cat > "$work/tick.c" <<'C'
#include <stdio.h>
#include <unistd.h>
int main(void) {
  for (int i = 1; i <= 8; i++) { printf("tick %d\n", i); fflush(stdout); sleep(1); }
  return 0;
}
C
gcc -O1 -o "$work/tick" "$work/tick.c"
echo "== launch: the program starts under the engine"
"$L" launch --socket "$work/ctl.sock" -- "$work/tick" &
sleep 3.2
echo "== dump: checkpoint to $work/tick.img and stop the program"
"$L" dump --socket "$work/ctl.sock" --output "$work/tick.img"
wait || true
echo "== inspect"
"$L" inspect --no-verify "$work/tick.img" | head -4
echo "== restore: the program carries on where it stopped"
"$L" restore "$work/tick.img"
rm -rf "$work"
