#!/usr/bin/env bash
# fedrun vs NVFlare 2.9.0, cellnet side by side on this machine (issue #6 §5), then ONE table:
#   scenario | NVFlare aux | fedrun | ratio | C limit | fedrun / C
#
#   bash crates/fedrun-bench/vs-nvflare.sh [ROUNDS]        # default 3 rounds, about 8 minutes here
#
# Each round runs every scenario once, and for each scenario NVFlare (nvflare/cellbench.py), fedrun
# (fedrun-cellbench, release build) and the matching C loopback limit (nvflare/netlimits.c) back to
# back, so that the machine's noise hits all three alike. Every run starts fresh processes, one per
# cell, on 127.0.0.1 only. The table shows medians over the rounds. Counts are below the NVFlare
# harness's defaults so that the whole script stays under 10 minutes.
#
# Environment:
#   NVFLARE_VENV  the venv with nvflare==2.9.0 (default target/nvflare-venv; created if missing,
#                 which needs PyPI and adds a minute or two)
#   VS_OUT        where results go (default target/vs-nvflare; emptied first)
# Needs python3 (venv), gcc, cargo.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
ROUNDS="${1:-3}"
OUT="${VS_OUT:-$ROOT/target/vs-nvflare}"
VENV="${NVFLARE_VENV:-$ROOT/target/nvflare-venv}"
PY="$VENV/bin/python"
START=$(date +%s)

if ! "$PY" -c 'import sys, nvflare; sys.exit(nvflare.__version__ != "2.9.0")' 2>/dev/null; then
  echo "=== creating $VENV with nvflare==2.9.0"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q nvflare==2.9.0
fi

echo "=== building fedrun-cellbench (release)"
(cd "$ROOT" && cargo build --release -q -p fedrun-bench)
FR="$ROOT/target/release/fedrun-cellbench"

rm -rf "$OUT"
mkdir -p "$OUT/nvflare" "$OUT/fedrun"
# cellbench.py writes results/ next to itself: run a copy inside $OUT.
cp "$HERE/nvflare/cellbench.py" "$OUT/nvflare/"
gcc -O2 -o "$OUT/netlimits" "$HERE/nvflare/netlimits.c"
LIMITS="$OUT/limits.jsonl"
: > "$LIMITS"

# One run each, appended to the tag's results file; a failure is reported and the script goes on.
nv() {
  (cd "$OUT/nvflare" && timeout 600 "$PY" cellbench.py run --runs 1 --append "$@") \
    2>>"$OUT/nvflare.log" | grep '^SUMMARY' | cut -c1-110 || echo "NVFlare FAILED: $*"
}
fr() {
  timeout 600 "$FR" run --runs 1 --append --results-dir "$OUT/fedrun" "$@" \
    2>>"$OUT/fedrun.log" | grep '^SUMMARY' | cut -c1-110 || echo "fedrun FAILED: $*"
}
# c MODE ARG [SUFFIX]: one netlimits run, its JSON line appended to limits.jsonl (SUFFIX renames
# the mode, e.g. pingpong_cross for a pinned run).
c() {
  local line
  if line=$(timeout 300 "$OUT/netlimits" "$1" "$2"); then
    if [ -n "${3:-}" ]; then line=${line/\"mode\":\"${1}\"/\"mode\":\"${1}_${3}\"}; fi
    echo "$line" | tee -a "$LIMITS"
  else
    echo "C FAILED: $*"
  fi
}

for r in $(seq 1 "$ROUNDS"); do
  echo "=== round $r/$ROUNDS $(date +%T)"
  # 1. sequential ~100 B request/reply
  nv --scenario latency --path aux --count 1000
  fr --scenario latency --path aux --count 2000
  nv --scenario latency --path core --count 1000
  fr --scenario latency --path core --count 2000
  c pingpong 20000
  # the same pinned to one CPU and across CPUs (cross-CPU wake-ups cost ~20 us on this VM guest)
  PIN=same c pingpong 20000 same
  PIN=cross c pingpong 20000 cross
  # 2. requests/s with 16 and 64 in flight
  for k in 16 64; do
    nv --scenario throughput --path aux --concurrency $k --count 1500
    fr --scenario throughput --path aux --concurrency $k --count 20000
    nv --scenario throughput --path core --concurrency $k --count 3000
    fr --scenario throughput --path core --concurrency $k --count 20000
    c pipeline $k
  done
  # 3. server -> 8 clients, all replies in
  nv --scenario multicast --path aux --clients 8 --count 100
  fr --scenario multicast --path aux --clients 8 --count 1000
  nv --scenario multicast --path core --clients 8 --count 200
  fr --scenario multicast --path core --clients 8 --count 1000
  # 4. large transfers; fedrun's aux path streams objects (StreamObjects + BytesProducer, 4 MiB
  #    pieces by default, each one frame, read lazily); the 1 MiB variant shows the cost of more
  #    pieces (one aux round trip each)
  nv --scenario large --path aux --size-mib 1 --count 10
  fr --scenario large --path aux --size-mib 1 --count 20
  nv --scenario large --path aux --size-mib 16 --count 3
  fr --scenario large --path aux --size-mib 16 --count 5
  nv --scenario large --path aux --size-mib 128 --count 2
  fr --scenario large --path aux --size-mib 128 --count 3
  fr --scenario large --path aux --size-mib 128 --count 3 --chunk-kib 1024
  nv --scenario large --path core --size-mib 128 --count 2
  fr --scenario large --path core --size-mib 128 --count 3
  c bulk 4096
  # 5. fire-and-forget ~100 B, received/s
  nv --scenario ff --path aux --count 2000
  fr --scenario ff --path aux --count 20000
  nv --scenario ff --path core --count 10000
  fr --scenario ff --path core --count 20000
  c oneway 500000
done

echo "=== table ($(( $(date +%s) - START )) s so far; logs in $OUT)"
echo
"$FR" table --nvflare "$OUT/nvflare/results" --fedrun "$OUT/fedrun" --limits "$LIMITS" | tee "$OUT/table.md"
echo
echo "total: $(( $(date +%s) - START )) s"
