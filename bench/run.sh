#!/usr/bin/env bash
# bench/run.sh - localdns against the floor, unbound and dnsmasq with the shared harness
# (../shared/bench, see its README.md): same NSD upstream, same query sets, one run, then a
# side-by-side table and the hit-path ratios localdns/unbound and localdns - floor.
#
#   bench/run.sh [extra bench.sh options, e.g. --duration 10]
#
# Environment:
#   SHARED_BENCH  the harness folder [REPO/../shared/bench]
#   PEERS         which servers, in order [floor unbound dnsmasq localdns]
#   HIT_REPEATS   max-throughput cache-hit repeats per server [3]
#   OUT           TSV the rows are appended to [target/bench/results-DATE.tsv]
# Needs root (apt-get, taskset) and loopback only. Takes about 2-4 minutes per server (longer
# when other processes keep the machine busy: the harness waits for quiet). Do not run two
# benchmarks at once (also not the shared harness by hand): they share /tmp/bench and the CPUs.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED_BENCH=$(cd "${SHARED_BENCH:-$ROOT/../shared/bench}" && pwd)
PEERS=${PEERS:-"floor unbound dnsmasq localdns"}
HIT_REPEATS=${HIT_REPEATS:-3}
OUT=${OUT:-$ROOT/target/bench/results-$(date +%Y%m%d-%H%M%S).tsv}
B=/tmp/bench                        # the harness runs from this copy (its configs expect it)
FLOOR_TARGET=/tmp/floor-target
mkdir -p "$(dirname "$OUT")"

# Two benchmarks at once share /tmp/bench, the addresses and the CPUs: both would be wrong.
exec 9>/tmp/bench-run.lock
flock -n 9 || { echo "# another bench/run.sh is running; waiting for it" >&2; flock 9; }

# ---------- tools ----------
need=()
for t in dnsperf:dnsperf dig:bind9-dnsutils nsd:nsd nsd-control:nsd taskset:util-linux; do
  command -v "${t%%:*}" >/dev/null || need+=("${t##*:}")
done
case " $PEERS " in *" unbound "*) command -v unbound >/dev/null || need+=(unbound);; esac
case " $PEERS " in *" dnsmasq "*) command -v dnsmasq >/dev/null || need+=(dnsmasq-base);; esac
if [ ${#need[@]} -gt 0 ]; then
  echo "# installing: ${need[*]}" >&2
  apt-get -o DPkg::Lock::Timeout=300 install -y --no-install-recommends "${need[@]}" >&2
fi

# ---------- the harness copy, the floor, localdns ----------
mkdir -p "$B" && cp -rf "$SHARED_BENCH"/. "$B"/ && chmod -R u+w "$B"
case " $PEERS " in *" floor "*)
  echo "# building the floor" >&2
  # Its own workspace root, so cargo does not look for one in the folders above /tmp/bench.
  grep -q '^\[workspace\]' "$B/floor/Cargo.toml" || printf '\n[workspace]\n' >> "$B/floor/Cargo.toml"
  cargo build --release --quiet --manifest-path "$B/floor/Cargo.toml" --target-dir "$FLOOR_TARGET" >&2 ;;
esac
case " $PEERS " in *" localdns "*)
  echo "# building localdns" >&2
  (cd "$ROOT" && cargo build --release --quiet) >&2
  "$ROOT/target/release/localdns" check-config --config "$ROOT/bench/localdns.toml" >/dev/null ;;
esac

# ---------- one upstream for every server ----------
UP_STARTED=0
# Without the lock (fd 9): NSD runs in a session of its own and may outlive this script.
if ! "$B/upstream.sh" status >/dev/null 2>&1; then "$B/upstream.sh" start 0 9>&-; UP_STARTED=1; fi
trap '[ "$UP_STARTED" = 1 ] && "$B/upstream.sh" stop' EXIT
{ date -Is; uname -r; nproc; dnsperf -h 2>&1 | grep Version || true; unbound -V 2>&1 | head -1 || true
  dnsmasq -v 2>&1 | head -1 || true; nsd -v 2>&1 | head -1 || true; (cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null) || true
} | sed 's/^/# /' >&2

run() { # name tag addr command...
  local name=$1 tag=$2 addr=$3; shift 3
  echo "### $(date +%T) $name" >&2
  "$SHARED_BENCH/bench.sh" --name "$name" --tag "$tag" --addr "$addr" --port 5300 \
      --hit-repeats "$HIT_REPEATS" --out "$OUT" "${EXTRA[@]}" -- "$@" >/dev/null \
    || echo "# FAILED: $name (see $B/logs)" >&2
}
EXTRA=("$@")
for p in $PEERS; do
  case "$p" in
    floor)    run floor mmsg 127.0.0.15 "$FLOOR_TARGET/release/floor" mmsg 127.0.0.15:5300 ;;
    unbound)  run unbound t1 127.0.0.10 unbound -d -c "$B/conf/unbound-t1.conf" ;;
    dnsmasq)  run dnsmasq t1 127.0.0.11 dnsmasq -C "$B/conf/dnsmasq.conf" ;;
    localdns) run localdns default 127.0.0.20 "$ROOT/target/release/localdns" run --config "$ROOT/bench/localdns.toml" ;;
    *) echo "unknown peer $p (floor unbound dnsmasq localdns)" >&2; exit 2 ;;
  esac
done

# ---------- summary ----------
echo
echo "rows: $OUT"
echo
"$B/summarize.sh" "$OUT"
echo
# One line per server: server CPU us per answered query per workload (hit = median of the
# repeats), throughput, tail latency, losses, memory. Lower us/q is better.
awk -F'\t' '
function med(s,  a,n,i,j,t){ n=split(s,a," "); if(n==0) return "-"; for(i=1;i<=n;i++) for(j=i+1;j<=n;j++) if(a[j]+0<a[i]+0){t=a[i];a[i]=a[j];a[j]=t}
  return (n%2)? a[(n+1)/2] : (a[n/2]+a[n/2+1])/2 }
function g(k,w,f){ return ((k,w,f) in V)? V[k,w,f] : "-" }
/^#/ {next}
{ k=$1; if(!(k in seen)){seen[k]=1; order[++n]=k}
  if($4 ~ /^hit/){ HU[k]=HU[k]" "$21; HQ[k]=HQ[k]" "$5 }
  for(i=5;i<=26;i++) V[k,$4,i]=$i
  if($15 ~ /^[0-9]+$/) LOST[k]+=$15
  if($26 ~ /^[0-9]+$/ && $26+0>PEAK[k]) PEAK[k]=$26 }
END{
  printf "%-9s %9s %9s %10s %10s %9s %9s %10s %10s %9s %10s %6s %8s\n", "server", "hit_us/q", "hit_qps", "steady_us", "steady_p99", "miss_us", "miss_p99", "recheck_us", "nxcold_us", "nxhot_us", "nxhot_upq", "lost", "peakMiB"
  for(i=1;i<=n;i++){ k=order[i]; hu[k]=med(HU[k])
    printf "%-9s %9s %9s %10s %10s %9s %9s %10s %10s %9s %10s %6d %8.1f\n", k, hu[k], (HQ[k]==""?"-":sprintf("%.0f",med(HQ[k]))),
      g(k,"steady",21), g(k,"steady",12), g(k,"miss",21), g(k,"miss",12), g(k,"miss-recheck",21), g(k,"nx-cold",21), g(k,"nx-hot",21),
      g(k,"nx-hot",19), LOST[k], PEAK[k]/1024 }
  print ""
  if(("localdns" in hu) && ("unbound" in hu) && hu["unbound"]+0>0)
    printf "hit path: localdns/unbound = %.2f (%s / %s us per query)\n", hu["localdns"]/hu["unbound"], hu["localdns"], hu["unbound"]
  if(("localdns" in hu) && ("floor" in hu))
    printf "hit path: localdns - floor = %.2f us per query (userspace work per cache hit)\n", hu["localdns"]-hu["floor"]
  if(("unbound" in hu) && ("floor" in hu))
    printf "hit path: unbound - floor  = %.2f us per query (reference)\n", hu["unbound"]-hu["floor"]
}' "$OUT"
