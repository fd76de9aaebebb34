#!/usr/bin/env bash
# Installs what building and testing httprouter needs and is missing:
# etcd (Debian's etcd-server, with etcdctl from etcd-client) and curl;
# with --browser also Chromium, for the status page's test (which is
# skipped without it). Uses apt-get as root, or through sudo. Does nothing
# when all is present.
set -euo pipefail

need=()
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
command -v curl >/dev/null 2>&1 || need+=(curl)
browser=()
if [ "${1:-}" = --browser ]; then
  command -v chromium >/dev/null 2>&1 || browser=(chromium)
fi
[ ${#need[@]} -eq 0 ] && [ ${#browser[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1; then
  as_root=(sudo)
else
  echo "deps.sh: missing ${need[*]} ${browser[*]}; install them as root: apt-get install -y ${need[*]} ${browser[*]}" >&2
  [ ${#need[@]} -eq 0 ] && exit 0
  exit 1
fi
"${as_root[@]}" apt-get update -qq
if [ ${#need[@]} -gt 0 ]; then
  echo "deps.sh: installing ${need[*]}" >&2
  DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq "${need[@]}" >/dev/null
fi
# Optional: without it the browser test is skipped, so a failure is no
# reason to stop.
if [ ${#browser[@]} -gt 0 ]; then
  echo "deps.sh: installing ${browser[*]} (for the status page's test)" >&2
  DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq "${browser[@]}" >/dev/null \
    || echo "deps.sh: ${browser[*]} not installed; the browser test will be skipped" >&2
fi
# Debian starts the packaged etcd as a service; the tests start their own on
# free ports and need nothing from it.
