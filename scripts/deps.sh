#!/usr/bin/env bash
# Installs what building and testing httprouter needs and is missing:
# etcd (Debian's etcd-server, with etcdctl from etcd-client) and curl.
# Uses apt-get as root, or through sudo. Does nothing when all is present.
set -euo pipefail

need=()
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
command -v curl >/dev/null 2>&1 || need+=(curl)
[ ${#need[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1; then
  as_root=(sudo)
else
  echo "deps.sh: missing ${need[*]}; install them as root: apt-get install -y ${need[*]}" >&2
  exit 1
fi
echo "deps.sh: installing ${need[*]}" >&2
"${as_root[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq "${need[@]}" >/dev/null
# Debian starts the packaged etcd as a service; the tests start their own on
# free ports and need nothing from it.
