#!/usr/bin/env bash
# bench/quick.sh - server CPU per query, measured finely, for A/B runs during development.
#
#   bench/quick.sh hit|miss [ROUNDS] [-- SERVER COMMAND...]
#
# The same machine set-up as bench/run.sh (../shared/bench: NSD upstream on 127.0.0.2:53,
# server pinned to CPU 1, dnsperf to CPU 0), but the server's CPU time is read from
# /proc/PID/task/*/schedstat (nanoseconds) instead of clock ticks, so a 10,000-query round
# resolves 0.01 µs per query instead of 1 µs. Prints one line per round.
#   hit:  the harness's 1,000 hit names, warmed, then dnsperf at full speed for DUR seconds.
#   miss: 10,000 names never asked before per round (the harness's miss names, a new
#         query type each round: A, AAAA, TXT, MX, ...).
# The default server is localdns with bench/localdns.toml; it must listen on
# 127.0.0.20:5300. Compare servers by alternating them in one sitting (the machine's noise
# between sittings is as large as the differences that matter); for the peer table use
# bench/run.sh.
#
# Environment: SHARED_BENCH [REPO/../shared/bench], DUR (hit seconds per round) [5].
set -euo pipefail

MODE=${1:?usage: bench/quick.sh hit|miss [ROUNDS] [-- SERVER COMMAND...]}; shift
ROUNDS=3
if [ $# -gt 0 ] && [ "$1" != -- ]; then ROUNDS=$1; shift; fi
[ "${1:-}" = -- ] && shift
case "$MODE" in hit|miss) ;; *) echo "mode must be hit or miss" >&2; exit 2 ;; esac
# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
if [ $# -gt 0 ]; then CMD=("$@"); else
  (cd "$ROOT" && cargo build --release --quiet)
  CMD=("$ROOT/target/release/localdns" run --config "$ROOT/bench/localdns.toml")
fi
bench_setup
bench_start_server "${CMD[@]}"
echo "# RSS at start: $(rss_kib) KiB"
perf() { taskset -c 0 dnsperf -s $ADDR -p $PORT -c 16 -q 200 "$@" 2>&1; }

if [ "$MODE" = hit ]; then perf -d "$B/data/hit.txt" -n 2 -q 20 >/dev/null; fi
TYPES=(A AAAA TXT MX NS SRV CAA HINFO PTR NAPTR)
for r in $(seq "$ROUNDS"); do
  if [ "$MODE" = hit ]; then
    file=$B/data/hit.txt; args=(-l "${DUR:-5}")
  else
    [ "$r" -le ${#TYPES[@]} ] || { echo "at most ${#TYPES[@]} miss rounds" >&2; break; }
    file=/tmp/bench/quick-miss.txt; args=(-n 1 -t 5)
    awk -v t="${TYPES[$((r-1))]}" '{print $1, t}' "$B/data/miss.txt" > "$file"
  fi
  c0=$(cpu_ns); out=$(perf -d "$file" "${args[@]}"); c1=$(cpu_ns)
  done_q=$(awk '/Queries completed:/{print $3}' <<<"$out")
  lost=$(awk '/Queries lost:/{print $3}' <<<"$out")
  qps=$(awk '/Queries per second:/{printf "%.0f", $4}' <<<"$out")
  awk -v m="$MODE" -v r="$r" -v a="$c0" -v b="$c1" -v n="$done_q" -v l="$lost" -v q="$qps" \
    -v rss="$(rss_kib)" \
    'BEGIN{printf "%s round %d: %.2f us/q server CPU, %s qps, %s answered, %s lost, RSS %s KiB\n", m, r, (b-a)/1000/n, q, n, l, rss}'
done
