#!/usr/bin/env bash
# bench/soak.sh - a long mixed run at a steady rate: does anything grow?
#
#   bench/soak.sh [-- SERVER COMMAND...]
#
# SOAK_SECONDS [600] at RATE [10000] queries/s, from one dnsperf: a quarter cache hits (the
# harness's 1,000 names), a quarter names that exist upstream (the 10,000 miss names, in
# A, AAAA and TXT, so NOERROR and NODATA), half names that do not exist (NXDOMAIN, never
# repeated). The cache holds 5,000 entries, so it is full after seconds and evicts all
# along (churn at capacity). Every SAMPLE seconds [30] it prints the server's resident
# memory, threads, open file descriptors and sockets, cache entries, upstream sockets
# opened so far and answers by rcode; at the end the first full-cache sample against the
# last. The default server is localdns with bench/localdns.toml, its metrics endpoint on
# 127.0.0.20:9253 and [cache] capacity = 5000.
set -euo pipefail
[ "${1:-}" = -- ] && shift
# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
SOAK_SECONDS=${SOAK_SECONDS:-600} RATE=${RATE:-10000} SAMPLE=${SAMPLE:-30}
if [ $# -gt 0 ]; then CMD=("$@"); else
  (cd "$ROOT" && cargo build --release --quiet)
  sed 's/^address = ""/address = "127.0.0.20:9253"/' "$ROOT/bench/localdns.toml" >/tmp/bench-soak.toml
  printf '\n[cache]\ncapacity = 5000\n' >>/tmp/bench-soak.toml
  CMD=("$ROOT/target/release/localdns" run --config /tmp/bench-soak.toml)
  METRICS=127.0.0.20:9253
fi
bench_setup
bench_start_server "${CMD[@]}"
RUN=$$
# Enough never-repeated NXDOMAIN names for the whole run.
n=$(( SOAK_SECONDS * RATE / 2 + RATE ))
awk -v n="$n" -v tag="$RUN" 'NR == FNR {hit[h++] = $0; next} {miss[m++] = $1} END {
  split("A AAAA TXT", types, " ")
  for (i = 0; i < n; i++) {
    print hit[i % h]
    print miss[i % m], types[int(i / m) % 3 + 1]
    printf "soak-%d-%s.example.test A\n", 2 * i, tag
    printf "soak-%d-%s.cluster.local AAAA\n", 2 * i + 1, tag
  } }' "$B/data/hit.txt" "$B/data/miss.txt" >"$B/soak.txt"
taskset -c 0 dnsperf -s $ADDR -p $PORT -c 16 -q 500 -t 2 -Q "$RATE" -l "$SOAK_SECONDS" \
  -d "$B/soak.txt" >"$B/soak.out" 2>&1 &
load=$!
t0=$(date +%s)
printf '%6s %9s %7s %5s %7s %9s %12s\n' s rss_kib threads fds sockets entries upstream_udp
sample() {
  printf '%6d %9d %7d %5d %7d %9s %12s\n' $(( $(date +%s) - t0 )) "$(rss_kib)" "$(threads)" \
    "$(fds)" "$(sockets)" "$(metric localdns_cache_entries)" "$(metric localdns_upstream_udp_sockets_total)"
}
while kill -0 "$load" 2>/dev/null; do sample | tee -a "$B/soak-samples.txt"; sleep "$SAMPLE"; done
wait "$load" || true
grep -E 'Queries (sent|completed|lost)|Response codes|Average Latency' "$B/soak.out"
echo "first sample after 60 s against the last:"
awk 'NR == 1 {next} $1 >= 60 && !f {f = $0} {l = $0} END {print "  " f; print "  " l}' \
  <(printf 'x\n'; cat "$B/soak-samples.txt")
rm -f "$B/soak-samples.txt"
