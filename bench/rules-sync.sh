#!/usr/bin/env bash
# bench/rules-sync.sh - localdns's CPU per kube-proxy sync on a node with a kube-proxy-sized
# ruleset (issue 19 item 2). A benchmark, not a test: it prints figures, asserts nothing.
#
#   [BINS="binA binB"] bench/rules-sync.sh [SECONDS] [SERVICES]     (default: 10 s, 5,000)
#
# In a network namespace of its own: kube-proxy's rules for SERVICES Services in nat and
# filter (bench/kube-proxy-gen.py, ~8 nat rules a Service, loaded with
# iptables-nft-restore --noflush), then for each binary in BINS (default
# target/release/localdns): `localdns run` with the iptables-nft backend and the default
# rules check interval (5 s), IDLE seconds with no change, then SECONDS kube-proxy-like
# partial syncs, one a second (iptables-nft-restore --noflush of filter and of nat's
# KUBE-SERVICES plus 5 Services' chains, as kube-proxy >= 1.27 writes them). Reports
# localdns's CPU time from /proc/PID/stat: its own (utime+stime) and its children's
# (cutime+cstime: the iptables programs it ran), in ms per second idle and with syncs;
# CPU per sync is the difference. Binaries are run one after the other in one namespace
# and one sitting, so compare them within one run.
#
# Environment: BINS, IDLE (seconds) [10], LOGS (a directory to keep each binary's log in). Needs root, iptables (nft), python3, curl.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SECS=${1:-10}
SERVICES=${2:-5000}
IDLE=${IDLE:-10}
BINS=${BINS:-$ROOT/target/release/localdns}
for t in iptables-nft-restore python3 curl ip; do
  command -v $t >/dev/null || { echo "missing $t" >&2; exit 1; }
done
for b in $BINS; do [ -x "$b" ] || { echo "not an executable: $b" >&2; exit 1; }; done
case "$SECS$SERVICES$IDLE" in *[!0-9]*) echo "SECONDS, SERVICES and IDLE are numbers" >&2; exit 2 ;; esac

NS=rules-sync-$$
W=$(mktemp -d /tmp/rules-sync.XXXXXX)
PID=
cleanup() {
  [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
  ip netns del "$NS" 2>/dev/null
  rm -rf "$W"
}
trap cleanup EXIT
ip netns add "$NS"
ip -n "$NS" link set lo up
in_ns() { ip netns exec "$NS" "$@"; }

GEN="$ROOT/bench/kube-proxy-gen.py"
python3 "$GEN" full "$SERVICES" >"$W/full"
# Each binary gets rounds of its own: a round's input follows from the one before.
n=0
for _ in $BINS; do
  for i in $(seq "$SECS"); do
    n=$((n + 1))
    python3 "$GEN" sync "$SERVICES" "$n" >"$W/sync-$n"
  done
done
echo "# loading kube-proxy's rules for $SERVICES Services ($(grep -c '^-A' "$W/full") rules)"
in_ns iptables-nft-restore --noflush <"$W/full"
in_ns iptables -A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT

cat >"$W/config.toml" <<EOF
[listen]
addresses = ["169.254.20.10", "10.96.0.10"]
udp_threads = 1
[upstream]
servers = ["127.0.0.2:53"]
[network]
interface = "nodelocaldns"
firewall = "iptables-nft"
[metrics]
address = "127.0.0.1:9253"
EOF

# utime stime cutime cstime of PID, in ms.
cpu() {
  local hz
  hz=$(getconf CLK_TCK)
  awk -v hz="$hz" '{ sub(/^.*\) /, ""); print $12 * 1000 / hz, $13 * 1000 / hz, $14 * 1000 / hz, $15 * 1000 / hz }' "/proc/$1/stat"
}
now_ms() { date +%s%3N; }

printf '%-40s %12s %12s %12s %12s %10s\n' binary "idle ms/s" "sync ms/s" "ms/sync" "(own+child)" checks
round=0
for bin in $BINS; do
  # Not through in_ns: $! of a shell function is a subshell, not localdns.
  ip netns exec "$NS" "$bin" run --config "$W/config.toml" >"$W/log" 2>&1 &
  PID=$!
  for _ in $(seq 300); do
    in_ns curl -sf -o /dev/null --max-time 1 http://127.0.0.1:9253/ready && break
    kill -0 "$PID" 2>/dev/null || { echo "$bin exited:"; cat "$W/log"; exit 1; }
    sleep 0.1
  done
  in_ns curl -sf -o /dev/null --max-time 1 http://127.0.0.1:9253/ready || { echo "$bin never ready:"; cat "$W/log"; exit 1; }
  # Start-up work (setup, the first read-back) is not what is measured.
  sleep 2
  read -r u0 s0 cu0 cs0 < <(cpu "$PID"); t0=$(now_ms)
  sleep "$IDLE"
  read -r u1 s1 cu1 cs1 < <(cpu "$PID"); t1=$(now_ms)
  for _ in $(seq "$SECS"); do
    round=$((round + 1))
    start=$(now_ms)
    in_ns iptables-nft-restore --noflush <"$W/sync-$round"
    left=$((1000 - ($(now_ms) - start)))
    if [ "$left" -gt 0 ]; then sleep "$(printf "0.%03d" "$left")"; fi
  done
  # The last sync's check.
  sleep 1
  read -r u2 s2 cu2 cs2 < <(cpu "$PID"); t2=$(now_ms)
  checks=$({ in_ns curl -sf --max-time 5 http://127.0.0.1:9253/metrics || true; } |
    awk '/^localdns_rules_checks_total/ { s = s $0 " " } END { gsub(/localdns_rules_checks_total/, "", s); print (s == "" ? "-" : s) }')
  awk -v name="$(basename "$bin")" -v u0="$u0" -v s0="$s0" -v c0="$cu0" -v d0="$cs0" \
    -v u1="$u1" -v s1="$s1" -v c1="$cu1" -v d1="$cs1" -v u2="$u2" -v s2="$s2" -v c2="$cu2" -v d2="$cs2" \
    -v t0="$t0" -v t1="$t1" -v t2="$t2" -v n="$SECS" -v checks="$checks" 'BEGIN {
      # Rates in ms of CPU per second; per sync: the CPU of the sync phase above the idle
      # rate, over the syncs.
      own_i = (u1 + s1 - u0 - s0) * 1000 / (t1 - t0); kid_i = (c1 + d1 - c0 - d0) * 1000 / (t1 - t0)
      own_s = (u2 + s2 - u1 - s1) * 1000 / (t2 - t1); kid_s = (c2 + d2 - c1 - d1) * 1000 / (t2 - t1)
      own = ((u2 + s2 - u1 - s1) - own_i * (t2 - t1) / 1000) / n
      kid = ((c2 + d2 - c1 - d1) - kid_i * (t2 - t1) / 1000) / n
      printf "%-40s %12.1f %12.1f %12.1f %5.1f+%-6.1f %s\n", name, own_i + kid_i, own_s + kid_s,
        own + kid, own, kid, checks
    }'
  kill "$PID"; wait "$PID" 2>/dev/null || true; PID=
  if [ -n "${LOGS:-}" ]; then mkdir -p "$LOGS" && cp "$W/log" "$LOGS/$(basename "$bin").log"; fi
  in_ns "$bin" teardown --config "$W/config.toml" >/dev/null 2>&1 || true
done
