#!/usr/bin/env bash
# bench/storm.sh - one pod's storm of unique misses while another pod asks a few names a
# second, localdns and unbound side by side on the same machine in the same run (issue 16).
#
#   bench/storm.sh [ratelimit|slow|both] [SECONDS]      (default: both, 20 s)
#
# ratelimit: the authority (NSD) rate-limits like a cloud VPC resolver: rrl-ratelimit 200
#            with rrl-slip 2 (over the rate, every second answer is TC=1 and the rest are
#            dropped); the storm is 5,000 q/s of unique names.
# slow:      the authority answers 500 ms late (bench/delay-proxy.py in front of NSD, no
#            rate limit); the storm is 3,000 q/s of unique names.
# The storming pod is dnsperf from 127.0.0.2, the other pod dnsperf from 127.0.0.3 at 20 q/s
# of names of its own (all misses). Per pod: sent, answered (NOERROR), SERVFAIL, lost, and the
# slowest answer dnsperf saw. Server on CPU 1, the rest wherever the kernel puts it.
# Needs dnsperf, nsd, unbound, python3, taskset, and target/release/localdns.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${LOCALDNS_BIN:-$ROOT/target/release/localdns}
MODES=${1:-both}
SECS=${2:-20}
[ "$MODES" = both ] && MODES="ratelimit slow"
for t in dnsperf nsd unbound python3 taskset dig; do
  command -v $t >/dev/null || { echo "missing $t: apt-get install dnsperf nsd unbound" >&2; exit 1; }
done
[ -x "$BIN" ] || { echo "build first: cargo build --release" >&2; exit 1; }

AUTH=127.0.0.40 AUTH_PORT=5301 PROXY_PORT=5302 SRV=127.0.0.41 SRV_PORT=5300
W=$(mktemp -d /tmp/storm.XXXXXX)
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  # NSD forks: end its whole session.
  [ -f "$W/nsd.sid" ] && kill -TERM -- -"$(cat "$W/nsd.sid")" 2>/dev/null
  wait 2>/dev/null
  rm -rf "$W"
}
trap cleanup EXIT

answers() { dig +tries=1 +time=1 @"$1" -p "$2" "$3" A 2>/dev/null | grep -q 'status: NOERROR'; }
wait_for() {
  local _
  for _ in $(seq 100); do answers "$@" && return 0; sleep 0.1; done
  echo "nothing answers on $1:$2" >&2
  return 1
}

# The authority: storm.test, a wildcard for the storm's unique names (NSD's RRL keys all
# of them on the wildcard) and the other pod's names, each a name of its own.
start_nsd() { # RATELIMIT
  mkdir -p "$W/nsd"
  {
    # shellcheck disable=SC2016 # a literal $TTL
    printf '$TTL 300\n@ IN SOA ns1 hostmaster 1 3600 600 86400 60\n@ IN NS ns1\nns1 IN A 192.0.2.53\n'
    printf '* IN A 192.0.2.1\n'
    for i in $(seq 0 999); do printf 'q%d IN A 192.0.2.7\n' "$i"; done
  } >"$W/nsd/storm.test.zone"
  cat >"$W/nsd/nsd.conf" <<CONF
server:
    ip-address: $AUTH@$AUTH_PORT
    do-ip6: no
    server-count: 1
    username: ""
    chroot: ""
    database: ""
    zonesdir: "$W/nsd"
    zonelistfile: "$W/nsd/zone.list"
    xfrdfile: "$W/nsd/xfrd.state"
    xfrdir: "$W/nsd"
    pidfile: "$W/nsd/nsd.pid"
    logfile: "$W/nsd/nsd.log"
    verbosity: 0
    rrl-ratelimit: $1
    rrl-slip: 2
    rrl-whitelist-ratelimit: $1
    receive-buffer-size: 4194304
    send-buffer-size: 4194304
remote-control:
    control-enable: no
zone:
    name: storm.test
    zonefile: storm.test.zone
CONF
  setsid nsd -d -c "$W/nsd/nsd.conf" >"$W/nsd/stdout" 2>&1 &
  echo $! >"$W/nsd.sid"
  wait_for $AUTH $AUTH_PORT ns1.storm.test
}

server_localdns() { # UPSTREAM_IP UPSTREAM_PORT
  cat >"$W/localdns.toml" <<CONF
[listen]
addresses = ["$SRV"]
port = $SRV_PORT
[upstream]
servers = ["$1:$2"]
[network]
setup_interface = false
setup_rules = false
[metrics]
address = ""
CONF
  taskset -c 1 "$BIN" run --config "$W/localdns.toml" >"$W/server.log" 2>&1 &
  SERVER=$!
}

server_unbound() { # UPSTREAM_IP UPSTREAM_PORT
  cat >"$W/unbound.conf" <<CONF
server:
    interface: $SRV@$SRV_PORT
    port: $SRV_PORT
    do-ip6: no
    num-threads: 1
    so-rcvbuf: 4m
    msg-cache-size: 64m
    rrset-cache-size: 128m
    prefetch: yes
    serve-expired: yes
    module-config: "iterator"
    local-zone: "test." nodefault
    do-not-query-localhost: no
    access-control: 127.0.0.0/8 allow
    username: ""
    chroot: ""
    directory: "$W"
    pidfile: "$W/unbound.pid"
    use-syslog: no
    logfile: ""
    verbosity: 0
remote-control:
    control-enable: no
forward-zone:
    name: "."
    forward-addr: $1@$2
CONF
  taskset -c 1 unbound -d -c "$W/unbound.conf" >"$W/server.log" 2>&1 &
  SERVER=$!
}

# "pod sent answered servfail lost slowest_ms" from a dnsperf report.
tally() { # POD FILE
  awk -v pod="$1" '
    /Queries sent:/ {sent=$3}
    /Queries lost:/ {lost=$3}
    /Response codes:/ {for (i=3;i<=NF;i++) {c=$i; gsub(/,/,"",c); if (c=="NOERROR") ok=$(i+1); if (c=="SERVFAIL") sf=$(i+1)}}
    /Average Latency/ {m=$0; sub(/.*max /,"",m); sub(/\).*/,"",m); max=m*1000}
    END {printf "%-6s %8d %8d %8d %8d %10.0f\n", pod, sent, ok, sf, lost, max}' "$2"
}

run_one() { # MODE SERVER
  local mode=$1 name=$2 rate up_ip=$AUTH up_port=$AUTH_PORT
  if [ "$mode" = ratelimit ]; then rate=5000; else rate=3000; up_port=$PROXY_PORT; fi
  "server_$name" $up_ip $up_port
  PIDS+=("$SERVER")
  wait_for $SRV $SRV_PORT ns1.storm.test
  awk -v n=$((rate * SECS)) -v s="$name$mode" 'BEGIN {for (i=0;i<n;i++) printf "u%d-%s.storm.test A\n", i, s}' >"$W/storm.txt"
  awk -v n=1000 'BEGIN {for (i=0;i<n;i++) printf "q%d.storm.test A\n", i}' >"$W/quiet.txt"
  dnsperf -a 127.0.0.2 -s $SRV -p $SRV_PORT -d "$W/storm.txt" -n 1 -Q $rate -l "$SECS" -c 20 -q 20000 -t 5 >"$W/storm.out" 2>&1 &
  local storm=$!
  dnsperf -a 127.0.0.3 -s $SRV -p $SRV_PORT -d "$W/quiet.txt" -n 1 -Q 20 -l "$SECS" -c 1 -q 100 -t 5 >"$W/quiet.out" 2>&1
  wait $storm || true
  kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null || true
  echo "## $mode, $name"
  printf '%-6s %8s %8s %8s %8s %10s\n' pod sent answered SERVFAIL lost slowest_ms
  tally storm "$W/storm.out"
  tally other "$W/quiet.out"
}

for mode in $MODES; do
  if [ "$mode" = ratelimit ]; then start_nsd 200; else start_nsd 0
    python3 "$ROOT/bench/delay-proxy.py" $AUTH $PROXY_PORT $AUTH $AUTH_PORT 0.5 &
    PIDS+=("$!")
    wait_for $AUTH $PROXY_PORT ns1.storm.test
  fi
  for server in localdns unbound; do run_one "$mode" "$server"; done
  kill -TERM -- -"$(cat "$W/nsd.sid")" 2>/dev/null; rm -f "$W/nsd.sid"
  sleep 0.5
done
