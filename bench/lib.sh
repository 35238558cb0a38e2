# bench/lib.sh - the set-up the bench/ scripts share; sourced, not run.
# shellcheck shell=bash
#
# The machine set-up of ../shared/bench: the NSD upstream on 127.0.0.2:53 (started when
# not already up, stopped again on exit), the server under test pinned to CPU 1 and the
# load generator to CPU 0, one benchmark at a time (a lock shared with bench/run.sh).
# The server must listen on $ADDR:$PORT (127.0.0.20:5300).
#
#   bench_setup                      copy ../shared/bench to /tmp/bench, generate its data,
#                                    start the upstream, take the lock
#   bench_start_server CMD...        start CMD pinned to CPU 1 (PID in $PID), wait until it
#                                    answers
#   ask NAME [TYPE]                  one dig with a 1 s timeout; true when it got NOERROR
#                                    or NXDOMAIN
#   cpu_ns                           the server's CPU time so far, nanoseconds
#   rss_kib / fds / sockets / threads   the server's resident memory and counts now
#   recvq                            bytes queued on the server's UDP sockets now
#   metric NAME                      the sum of a metric's samples on $METRICS (or "-")
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SHARED_BENCH=$(cd "${SHARED_BENCH:-$ROOT/../shared/bench}" && pwd)
B=/tmp/bench
ADDR=127.0.0.20 PORT=5300
METRICS=${METRICS:-}
UP_STARTED=0 PID=

bench_setup() {
  local t
  for t in dnsperf dig nsd taskset; do
    command -v $t >/dev/null || { echo "missing $t (see bench/run.sh)" >&2; exit 1; }
  done
  exec 9>/tmp/bench-run.lock # never beside bench/run.sh: they share /tmp/bench and the CPUs
  flock -n 9 || { echo "# a benchmark is running; waiting for it" >&2; flock 9; }
  mkdir -p "$B" && cp -rf "$SHARED_BENCH"/. "$B"/ && chmod -R u+w "$B"
  [ -f "$B/data/miss.txt" ] || "$B/gen-data.sh" >/dev/null
  # A second server on the same address would share the load through SO_REUSEPORT.
  if ask host-9999.example.test; then echo "something already answers on $ADDR:$PORT" >&2; exit 1; fi
  trap bench_cleanup EXIT
  if ! "$B/upstream.sh" status >/dev/null 2>&1; then
    # Without the lock (fd 9): NSD runs in a session of its own and may outlive this script.
    "$B/upstream.sh" start 0 9>&- 2>/dev/null
    UP_STARTED=1
  fi
}

bench_cleanup() {
  [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
  [ "$UP_STARTED" = 1 ] && "$B/upstream.sh" stop 2>/dev/null
  return 0
}

bench_start_server() {
  taskset -c 1 "$@" >"$B/server.log" 2>&1 &
  PID=$!
  local _
  for _ in $(seq 100); do ask host-9999.example.test && return 0; sleep 0.1; done
  echo "server did not answer; see $B/server.log" >&2
  exit 1
}

ask() {
  dig +tries=1 +time=1 @$ADDR -p $PORT "$1" "${2:-A}" 2>/dev/null | grep -Eq 'status: (NOERROR|NXDOMAIN)'
}
cpu_ns() { cat /proc/"$PID"/task/*/schedstat 2>/dev/null | awk '{s+=$1} END{print s+0}'; }
rss_kib() { awk '/^VmRSS:/{print $2}' /proc/"$PID"/status; }
threads() { awk '/^Threads:/{print $2}' /proc/"$PID"/status; }
fds() { find /proc/"$PID"/fd -mindepth 1 -maxdepth 1 | wc -l; }
sockets() { find /proc/"$PID"/fd -mindepth 1 -maxdepth 1 -lname 'socket:*' | wc -l; }
# Bytes waiting in the server's UDP receive queues on $ADDR:$PORT.
recvq() { ss -Huln "src $ADDR:$PORT" | awk '{s += $2} END {print s + 0}'; }
metric() {
  [ -n "$METRICS" ] || { echo -; return; }
  curl -s --max-time 2 "http://$METRICS/metrics" |
    awk -v m="$1" '$1 == m || index($1, m "{") == 1 {s += $NF; f = 1} END {if (f) printf "%.0f\n", s; else print "-"}'
}
