#!/usr/bin/env bash
# Runs httprouter for real.
#
#   scripts/demo.sh [httprouter flags...]
#
# With --etcdurl among the flags, it just runs the router with them. Without
# one, it starts a throwaway etcd (temporary data dir, first free loopback
# port from 23790; a packaged etcd on 2379 is left alone), two demo backends
# (first free ports from 9001) registered for demo.example.com with
# scripts/register.sh, and the router on :8080 with its status page on
# 127.0.0.1 (first free port from 9090).
# Ctrl-C stops everything it started (by PID) and removes the temp dir.
set -euo pipefail
cd "$(dirname "$0")/.."

bin=target/release/httprouter
# With cargo's progress: the first build takes a while.
cargo build --release --bin httprouter --example demo_backend
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
# Ctrl-C is the documented way to stop: a clean stop, exit 0.
trap 'exit 0' INT TERM

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() {
  local p=$1
  while port_busy "$p" || [[ " ${taken[*]:-} " == *" $p "* ]]; do p=$((p + 1)); done
  taken+=("$p")
  echo "$p"
}
if port_busy 8080; then
  echo "demo.sh: port 8080 is in use; stop what uses it first." >&2
  exit 1
fi
taken=()
etcd_port=$(free_port 23790)
peer_port=$(free_port $((etcd_port + 1)))
web1_port=$(free_port 9001)
web2_port=$(free_port $((web1_port + 1)))
admin_port=$(free_port 9090)
admin=(--admin "127.0.0.1:$admin_port")
for a in "$@"; do
  case $a in -admin|--admin|-admin=*|--admin=*) admin=() admin_port= ;; esac
done
etcd_url=http://127.0.0.1:$etcd_port

# In its own session: a Ctrl-C in the terminal must not stop etcd before
# register.sh has removed its keys; cleanup stops it last.
setsid etcd --name demo --data-dir "$tmp/etcd" --enable-v2=true \
  --listen-client-urls "$etcd_url" --advertise-client-urls "$etcd_url" \
  --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
  --initial-cluster "demo=http://127.0.0.1:$peer_port" --log-level error >"$tmp/etcd.log" 2>&1 &
etcd_pid=$!
for _ in $(seq 100); do curl -fs -o /dev/null "$etcd_url/version" && break; sleep 0.1; done
curl -fs -o /dev/null "$etcd_url/version" || { echo "demo.sh: etcd did not start:"; tail "$tmp/etcd.log"; exit 1; } >&2

target/release/examples/demo_backend "127.0.0.1:$web1_port" web1 & pids+=($!)
target/release/examples/demo_backend "127.0.0.1:$web2_port" web2 & pids+=($!)
scripts/register.sh demo.example.com 127.0.0.1 "$web1_port" "$etcd_url" & pids+=($!)
scripts/register.sh demo.example.com 127.0.0.1 "$web2_port" "$etcd_url" & pids+=($!)

echo "demo.sh: starting httprouter on :8080 (etcd at $etcd_url, demo backends on :$web1_port and :$web2_port)" >&2
"$bin" --listen 0.0.0.0:8080 "${admin[@]}" --etcdurl "$etcd_url" "$@" &
router=$!
pids=("$router" "${pids[@]}")
# The ready line once a request would be served, not before.
ready=
for _ in $(seq 300); do
  kill -0 "$router" 2>/dev/null || { echo "demo.sh: httprouter exited at start" >&2; exit 1; }
  if [ "$(curl -s -o /dev/null -w '%{http_code}' -H 'Host: demo.example.com' http://127.0.0.1:8080/ || true)" = 200 ]; then
    ready=1
    break
  fi
  sleep 0.1
done
if [ -n "$ready" ]; then
  cat >&2 <<MSG

  httprouter is ready. Try:   curl -H 'Host: demo.example.com' localhost:8080/
${admin_port:+  Status page:                http://127.0.0.1:$admin_port/  (also /metrics, /routes, /healthz)
}  Stop with Ctrl-C.

MSG
else
  echo "demo.sh: demo.example.com is not served after 30 s; the router's log above says why" >&2
fi
wait "$router"
