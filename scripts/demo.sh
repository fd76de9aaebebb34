#!/usr/bin/env bash
# Runs httprouter for real.
#
#   scripts/demo.sh [httprouter flags...]
#
# With --etcdurl among the flags, it just runs the router with them. Without
# one, it starts a throwaway etcd on 127.0.0.1:2379 (temporary data dir),
# two demo backends on 127.0.0.1:9001 and :9002 registered for
# demo.example.com with scripts/register.sh, and the router on :8080.
# Ctrl-C stops everything it started (by PID) and removes the temp dir.
set -euo pipefail
cd "$(dirname "$0")/.."

bin=target/release/httprouter
cargo build --release --quiet --bin httprouter --example demo_backend
for a in "$@"; do
  case $a in -etcdurl|--etcdurl|-etcdurl=*|--etcdurl=*) exec "$bin" "$@" ;; esac
done

scripts/deps.sh
pids=()
tmp=$(mktemp -d /tmp/httprouter-demo.XXXXXX)
etcd_pid=
cleanup() {
  trap - INT TERM EXIT
  # Everything but etcd first, so register.sh can remove its keys.
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ -n "$etcd_pid" ]; then kill -TERM "$etcd_pid" 2>/dev/null || true; wait "$etcd_pid" 2>/dev/null || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in 2379 2380 8080 9001 9002; do
  if port_busy "$p"; then
    echo "demo.sh: port $p is in use. Stop what uses it, or run the router against your own etcd:" >&2
    echo "  scripts/demo.sh --etcdurl http://HOST:2379" >&2
    exit 1
  fi
done

# In its own session: a Ctrl-C in the terminal must not stop etcd before
# register.sh has removed its keys; cleanup stops it last.
setsid etcd --name demo --data-dir "$tmp/etcd" --enable-v2=true \
  --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
  --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
  --initial-cluster demo=http://127.0.0.1:2380 --log-level error >"$tmp/etcd.log" 2>&1 &
etcd_pid=$!
for _ in $(seq 100); do curl -fs -o /dev/null http://127.0.0.1:2379/version && break; sleep 0.1; done
curl -fs -o /dev/null http://127.0.0.1:2379/version || { echo "demo.sh: etcd did not start:"; tail "$tmp/etcd.log"; exit 1; } >&2

target/release/examples/demo_backend 127.0.0.1:9001 web1 & pids+=($!)
target/release/examples/demo_backend 127.0.0.1:9002 web2 & pids+=($!)
scripts/register.sh demo.example.com 127.0.0.1 9001 http://127.0.0.1:2379 & pids+=($!)
scripts/register.sh demo.example.com 127.0.0.1 9002 http://127.0.0.1:2379 & pids+=($!)

cat >&2 <<MSG

  httprouter is starting on :8080 with a local etcd and two demo backends.
  Try:   curl -H 'Host: demo.example.com' localhost:8080/
  Stop:  Ctrl-C

MSG
"$bin" --listen 0.0.0.0:8080 --etcdurl http://127.0.0.1:2379 "$@" &
router=$!
pids=("$router" "${pids[@]}")
wait "$router"
