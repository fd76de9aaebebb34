#!/usr/bin/env bash
# Side-by-side throughput of httprouter against nginx, HAProxy and the Go
# anchors, with the shared harness (../shared/bench, see its README). Only
# ratios measured in the same run are worth quoting.
#
#   scripts/bench.sh                       # 3 rounds, c64 c256 c64-64k
#   ROUNDS=1 DURATION=3s PROFILES=c64 scripts/bench.sh   # a quick look
#
# The harness is copied to a temporary folder first: it builds its Go anchor
# next to itself, and shared/ is read-only. Needs nginx-light, haproxy, wrk,
# golang-go, python3 (not installed by CI: benchmarks are not tests).
set -euo pipefail
cd "$(dirname "$0")/.."

shared=${SHARED_BENCH:-../shared/bench}
[ -x "$shared/run.sh" ] || { echo "bench.sh: no harness at $shared (set SHARED_BENCH)" >&2; exit 1; }
for tool in nginx haproxy wrk go python3 etcd; do
  command -v "$tool" >/dev/null || { echo "bench.sh: missing $tool (apt-get install -y nginx-light haproxy wrk golang-go etcd-server)" >&2; exit 1; }
done

cargo build --release --locked --quiet --bin httprouter
bin=$PWD/target/release/httprouter
work=$(mktemp -d /tmp/httprouter-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
cp -r "$shared" "$work/bench"
chmod -R u+w "$work/bench"

export OURS_NAME=${OURS_NAME:-httprouter}
export OURS_CMD="$bin --listen \$LISTEN --etcdurl \$ETCD_URL --etcdkey /domains --logfile /dev/null${HTTPROUTER_ARGS:+ $HTTPROUTER_ARGS}"
export PROFILES=${PROFILES:-"c64 c256 c64-64k"}
export OUT_DIR=${OUT_DIR:-$PWD/target/bench/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT_DIR"
"$work/bench/run.sh" "$@"
echo "results: $OUT_DIR" >&2
