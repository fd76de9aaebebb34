#!/usr/bin/env bash
# Side-by-side throughput of httprouter against nginx, HAProxy and the Go
# anchors, with the shared harness (../shared/bench, see its README): the
# glibc build and the static musl build (the way most users run it) in the
# same run. Only ratios measured in the same run are worth quoting.
#
#   scripts/bench.sh                       # 3 rounds, c64 c256 c64-64k c16-1m
#   ROUNDS=1 DURATION=3s PROFILES=c64 scripts/bench.sh   # a quick look
#   MUSL=0 scripts/bench.sh                # the glibc build alone
#
# Then scripts/idle-connections.py reports what 10,000 idle keep-alive
# connections cost each build (RSS and threads; IDLE_CONNECTIONS=N).
#
# The harness is copied to a temporary folder first: it builds its Go anchor
# next to itself, and shared/ is read-only. Needs nginx-light, haproxy, wrk,
# golang-go, python3, and for the musl build the rustup target
# x86_64-unknown-linux-musl and musl-tools (not installed by CI: benchmarks
# are not tests).
set -euo pipefail
cd "$(dirname "$0")/.."

shared=${SHARED_BENCH:-../shared/bench}
[ -x "$shared/run.sh" ] || { echo "bench.sh: no harness at $shared (set SHARED_BENCH)" >&2; exit 1; }
for tool in nginx haproxy wrk go python3 etcd; do
  command -v "$tool" >/dev/null || { echo "bench.sh: missing $tool (apt-get install -y nginx-light haproxy wrk golang-go etcd-server)" >&2; exit 1; }
done

cargo build --release --locked --quiet --bin httprouter
bin=$PWD/target/release/httprouter
args="--listen \$LISTEN --etcdurl \$ETCD_URL --etcdkey /domains --logfile /dev/null${HTTPROUTER_ARGS:+ $HTTPROUTER_ARGS}"
extra=()
if [ "${MUSL:-1}" = 1 ]; then
  musl_target=x86_64-unknown-linux-musl
  if ! rustup target list --installed 2>/dev/null | grep -qx "$musl_target" || ! command -v musl-gcc >/dev/null; then
    echo "bench.sh: the musl build needs 'rustup target add $musl_target' and musl-tools (or run with MUSL=0)" >&2
    exit 1
  fi
  cargo build --release --locked --quiet --bin httprouter --target "$musl_target"
  extra=(--proxy "httprouter-musl=$PWD/target/$musl_target/release/httprouter $args")
fi
work=$(mktemp -d /tmp/httprouter-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
cp -r "$shared" "$work/bench"
chmod -R u+w "$work/bench"

export OURS_NAME=${OURS_NAME:-httprouter}
export OURS_CMD="$bin $args"
export PROFILES=${PROFILES:-"c64 c256 c64-64k c16-1m"}
export OUT_DIR=${OUT_DIR:-$PWD/target/bench/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT_DIR"
"$work/bench/run.sh" "${extra[@]}" "$@"
# What idle connections cost: 10,000 held open after one request each.
scripts/idle-connections.py "$bin" "${IDLE_CONNECTIONS:-10000}" | tee -a "$OUT_DIR/summary.md"
if [ "${MUSL:-1}" = 1 ]; then
  scripts/idle-connections.py "$PWD/target/$musl_target/release/httprouter" "${IDLE_CONNECTIONS:-10000}" | tee -a "$OUT_DIR/summary.md"
fi
echo "results: $OUT_DIR" >&2
