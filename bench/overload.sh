#!/usr/bin/env bash
# bench/overload.sh - twice the load the machine can answer, then back to normal.
#
#   bench/overload.sh [-- SERVER COMMAND...]
#
# The load is half cache hits (the harness's 1,000 hit names) and half names never asked
# before (NXDOMAIN from the NSD upstream), so every other query is a miss that costs an
# upstream round trip: the expensive mix, and one dnsperf core can offer twice what the
# server answers.
#   1. capacity: dnsperf at full speed (2,000 queries outstanding) for CAP_SECONDS [10];
#      C = answered per second.
#   2. overload: dnsperf offering 2C per second for LOAD_SECONDS [30]; every second the
#      server's resident memory, and at the end what was answered and lost and the answer
#      latency (average and worst): a server that drops keeps latency low, one that queues
#      answers late or not at all.
#   3. after: from the moment the load stops, a fresh miss and a cached name every 20 ms
#      until both answer (the time includes dig's own start, ~10 ms), then 3 s at 1,000 queries/s (latency average and worst).
# The default server is localdns with bench/localdns.toml plus its metrics endpoint on
# 127.0.0.20:9253 (to read the overload and SERVFAIL counters).
set -euo pipefail
[ "${1:-}" = -- ] && shift
# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
CAP_SECONDS=${CAP_SECONDS:-10} LOAD_SECONDS=${LOAD_SECONDS:-30}
if [ $# -gt 0 ]; then CMD=("$@"); else
  (cd "$ROOT" && cargo build --release --quiet)
  sed 's/^address = ""/address = "127.0.0.20:9253"/' "$ROOT/bench/localdns.toml" >/tmp/bench-overload.toml
  CMD=("$ROOT/target/release/localdns" run --config /tmp/bench-overload.toml)
  METRICS=127.0.0.20:9253
fi
bench_setup
bench_start_server "${CMD[@]}"
RUN=$$
perf() { taskset -c 0 dnsperf -s $ADDR -p $PORT -c 16 -t 1 "$@" 2>&1; }
# Interleave the hit names with names never asked before: $1 is a tag unique to the phase.
mix() {
  awk -v tag="$1-$RUN" 'NR == FNR {hit[n++] = $0; next} END {
    for (i = 0; i < 400000; i++) { print hit[i % n]; printf "ol-%d-%s.example.test A\n", i, tag } }' \
    "$B/data/hit.txt" /dev/null >"$B/overload-$1.txt"
}
field() { awk -v k="$1" 'index($0, k) {print $(NF - 0); exit}' <<<"$2"; }
latency() { # average and worst answer latency from dnsperf's output, ms
  awk '/Average Latency/ {gsub(/[(),]/, ""); printf "avg %.2f ms, worst %.0f ms", $4 * 1000, $8 * 1000}' <<<"$1"
}
answered() { awk '/Queries completed:/ {print $3}' <<<"$1"; }
lost() { awk '/Queries lost:/ {print $3}' <<<"$1"; }
sent() { awk '/Queries sent:/ {print $3}' <<<"$1"; }

perf -d "$B/data/hit.txt" -n 1 -q 20 >/dev/null # warm the hit names
mix cap; mix load
out=$(perf -d "$B/overload-cap.txt" -l "$CAP_SECONDS" -q 2000)
C=$(( $(answered "$out") / CAP_SECONDS ))
echo "capacity: $C answered/s at full speed ($(lost "$out") of $(sent "$out") lost; $(latency "$out"))"

rss0=$(rss_kib) over0=$(metric localdns_overload_total) sf0=$(metric localdns_servfail_total)
( for _ in $(seq "$LOAD_SECONDS"); do echo "$(rss_kib) $(recvq)"; sleep 1; done ) >"$B/overload-rss.txt" &
sampler=$!
perf -d "$B/overload-load.txt" -l "$LOAD_SECONDS" -q 20000 -Q $((2 * C)) >"$B/overload-load.out" &
load=$!
# dnsperf stops sending after LOAD_SECONDS, then waits a second for the last answers: the
# probes start when it stops sending, beside that wait.
t_end=$(( $(date +%s%N) + LOAD_SECONDS * 1000000000 ))
sleep "$LOAD_SECONDS"
i=0 miss_ok='' hit_ok=''
while [ -z "$miss_ok" ] || [ -z "$hit_ok" ]; do
  [ -n "$miss_ok" ] || { ask "after-$i-$RUN.example.test" && miss_ok=$(( ($(date +%s%N) - t_end) / 1000000 )); }
  [ -n "$hit_ok" ] || { ask host-1.example.test && hit_ok=$(( ($(date +%s%N) - t_end) / 1000000 )); }
  i=$((i + 1)); [ "$i" -lt 500 ] || break; sleep 0.02
done
wait "$load"
out=$(cat "$B/overload-load.out")
kill "$sampler" 2>/dev/null || true; wait "$sampler" 2>/dev/null || true
rss1=$(rss_kib)
echo "overload: offered $((2 * C))/s for ${LOAD_SECONDS} s: sent $(sent "$out"), answered $(answered "$out") ($(( $(answered "$out") / LOAD_SECONDS ))/s), lost $(lost "$out"); $(latency "$out")"
awk -v a="$rss0" -v b="$rss1" 'NR == 1 {lo = $1; qlo = $2} {hi = $1 > hi ? $1 : hi; lo = $1 < lo ? $1 : lo
  qhi = $2 > qhi ? $2 : qhi; qlo = $2 < qlo ? $2 : qlo} END {
  printf "memory: RSS %d KiB before, %d-%d KiB during, %d KiB after\n", a, lo, hi, b
  printf "listening socket receive queue during the load: %d-%d KiB\n", qlo / 1024, qhi / 1024}' "$B/overload-rss.txt"
over1=$(metric localdns_overload_total) sf1=$(metric localdns_servfail_total)
[ "$over0" = - ] || echo "server counters during the load: overload +$((over1 - over0)), SERVFAIL +$((sf1 - sf0))"

echo "after the load: a cached name answered ${hit_ok:-never} ms, a new name ${miss_ok:-never} ms after it stopped"
mix after
out=$(perf -d "$B/overload-after.txt" -l 3 -q 200 -Q 1000)
echo "then at 1000/s: answered $(answered "$out"), lost $(lost "$out"); $(latency "$out")"
