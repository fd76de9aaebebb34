#!/usr/bin/env bash
# Registers a backend with httprouter through etcd's v2 API while its health
# check passes, and removes it when the check fails or on Ctrl-C/TERM.
#
#   scripts/register.sh <domain> <ip> <port> [etcd-url]
#
# The key is $ETCD_KEY/<domain>/<ip>-<port> (ETCD_KEY defaults to /domains)
# and its value http://<ip>:<port>. It is written once with a TTL, then the
# TTL is refreshed with refresh=true&prevExist=true, which etcd does not
# report to watchers: a heartbeat costs the router nothing. If the script
# dies without cleaning up, the key expires after TTL seconds by itself.
#
# Environment: ETCD_KEY (/domains), TTL (10 s), INTERVAL (3 s),
# HEALTH_PATH (/), HEALTH_TIMEOUT (2 s). Needs curl only.
set -u

usage() { echo "usage: $0 <domain> <ip> <port> [etcd-url]" >&2; exit 2; }
[ $# -ge 3 ] && [ $# -le 4 ] || usage
domain=$1 ip=$2 port=$3
etcd=${4:-${ETCD_URL:-http://127.0.0.1:2379}}
etcd=${etcd%/}
prefix=${ETCD_KEY:-/domains}
prefix=/${prefix#/}; prefix=${prefix%/}
ttl=${TTL:-10} interval=${INTERVAL:-3}
health_path=${HEALTH_PATH:-/} health_timeout=${HEALTH_TIMEOUT:-2}

# The domain becomes a path segment: keep it to host-name characters so it
# cannot turn into a different key (etcd decodes %2F into a real '/').
[[ $domain =~ ^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:[0-9]{1,5})?$ ]] || { echo "$0: bad domain '$domain'" >&2; exit 2; }
[[ $ip =~ ^[0-9A-Za-z.:-]+$ ]] || { echo "$0: bad ip '$ip'" >&2; exit 2; }
[[ $port =~ ^[0-9]{1,5}$ ]] && [ "$port" -ge 1 ] && [ "$port" -le 65535 ] || { echo "$0: bad port '$port'" >&2; exit 2; }
[[ $ttl =~ ^[0-9]+$ && $interval =~ ^[0-9]+$ ]] && [ "$interval" -lt "$ttl" ] || { echo "$0: need INTERVAL < TTL (whole seconds)" >&2; exit 2; }

host=$ip
[[ $ip == *:* ]] && host="[$ip]"   # IPv6 literal
backend="http://$host:$port"
key_url="$etcd/v2/keys$prefix/$domain/$ip-$port"
registered=0

log() { printf '%s register.sh %s %s: %s\n' "$(date -u +%FT%TZ)" "$domain" "$backend" "$*" >&2; }

# curl to etcd: prints the HTTP status; the body goes to $body.
body=$(mktemp); trap 'rm -f "$body"' EXIT
etcd_call() {
  local code
  code=$(curl -sS -o "$body" -w '%{http_code}' -m 5 "$@" 2>/dev/null) || true
  echo "${code:-000}"
}

register() {
  local code
  code=$(etcd_call -X PUT "$key_url" --data-urlencode "value=$backend" -d "ttl=$ttl")
  if [[ $code == 200 || $code == 201 ]]; then
    registered=1; log "registered (ttl ${ttl}s)"
  else
    log "register failed: HTTP $code $(head -c 200 "$body")"
  fi
}

refresh() {
  local code
  code=$(etcd_call -X PUT "$key_url?refresh=true&prevExist=true&ttl=$ttl")
  case $code in
    200) ;;
    404) log "key had expired; registering again"; registered=0; register ;;
    *) log "refresh failed: HTTP $code $(head -c 200 "$body")" ;;
  esac
}

deregister() {
  local code
  code=$(etcd_call -X DELETE "$key_url")
  registered=0
  log "deregistered (HTTP $code)"
}

stop() { [ "$registered" = 1 ] && deregister; exit 0; }
trap stop INT TERM

log "health-checking $backend$health_path every ${interval}s, etcd $etcd"
while :; do
  if curl -fsS -o /dev/null -m "$health_timeout" "$backend$health_path" 2>/dev/null; then
    if [ "$registered" = 1 ]; then refresh; else register; fi
  elif [ "$registered" = 1 ]; then
    log "health check failed"
    deregister
  fi
  # sleep in the background so a signal is handled at once
  sleep "$interval" & wait $!
done
