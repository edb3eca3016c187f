#!/bin/bash
# The flake-free proof (docs/reliability.md, "Flaky tests"): N whole-suite CI runs in a row, each in a fresh clone
# of COMMIT, with one busy loop per core beside it. Stops at the first failure.
#   scripts/proof-runs.sh N LOGDIR [COMMIT]      (COMMIT defaults to HEAD of this checkout)
set -u
N=$1; LOG=$(realpath -m "$2"); REPO=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
COMMIT=${3:-$(git -C "$REPO" rev-parse HEAD)}
FRESH=$(mktemp -d /tmp/proof-clone.XXXXXX)
mkdir -p "$LOG"
for i in $(seq 1 "$N"); do
  rm -rf "$FRESH"
  git clone -q "$REPO" "$FRESH" && git -C "$FRESH" checkout -q "$COMMIT" || exit 9
  hogs=()
  for _ in $(seq 1 "$(nproc)"); do nice -n 19 bash -c 'while :; do :; done' & hogs+=($!); done
  start=$(date +%s)
  (cd "$FRESH" && CI=true bash .ci/run) > "$LOG/run$i.log" 2>&1; rc=$?
  kill "${hogs[@]}"
  echo "run $i commit $COMMIT rc=$rc $(( $(date +%s) - start ))s $(grep -E '(passed|failed)' "$LOG/run$i.log" | tail -1)" >> "$LOG/summary"
  [ "$rc" -ne 0 ] && exit "$rc"
done
echo "ALL $N GREEN" >> "$LOG/summary"
