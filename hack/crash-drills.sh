#!/usr/bin/env bash
# Crash drills, RUNS times (default 5) for each LoadBalancer Service of the demo (Cluster and
# Local) and each family: a fresh lab with ferrolb and the demo (hack/lab-demo.sh), then
# `ferrolb-lab drill crash --announcer SERVICE` under 100 req/s, `drill restore`, and a wait
# until the lab is whole and the address is back on the restored node. Prints each drill and,
# per stream, the longest gaps, their median and the failed requests; OUT (default
# $TMPDIR/ferrolb-crash-drills.jsonl) keeps every drill's JSON. Takes the lab down at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-5}
OUT=${OUT:-${TMPDIR:-/tmp}/ferrolb-crash-drills.jsonl}
export FERROLB_LAB_BIN=${FERROLB_LAB_BIN:-$PWD/target/debug/ferrolb-lab}
L=$FERROLB_LAB_BIN
BIN=$(bash hack/k8s-bins.sh)
export KUBECONFIG=/run/ferrolb-lab/kubeconfig
k() { "$BIN/kubectl" "$@"; }
ready() { k get pods -A -l "$1" -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | grep -c True; }
announcer() { k -n ferrolb-system get servicel2statuses "default.$1" -o jsonpath='{.status.node}' 2>/dev/null; }
field() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"; }

"$L" down >/dev/null 2>&1
trap '"$L" down >/dev/null 2>&1' EXIT
bash hack/lab-demo.sh > "${OUT%.jsonl}-demo.log" 2>&1 || { echo "crash-drills: the lab with the demo did not come up, see ${OUT%.jsonl}-demo.log" >&2; exit 1; }
: > "$OUT"
for run in $(seq "$RUNS"); do
  for svc in hostname-svc-lb hostname-svc-lb-local; do
    for fam in "" --ipv6; do
      out=$("$L" drill crash --announcer "$svc" --json --seconds 6 $fam) || { echo "crash-drills: drill failed" >&2; exit 1; }
      echo "{\"run\":$run,\"service\":\"$svc\",\"ipv6\":$([[ -n $fam ]] && echo true || echo false),\"drill\":$out}" >> "$OUT"
      node=$(field "$out" announcer_before)
      printf 'run %d %-22s %s: %s -> %s, %s requests, %s failed, longest gap %s ms\n' "$run" "$svc" "${fam:-ipv4}" \
        "$node" "$(field "$out" announcer_after)" "$(field "$out" requests)" "$(field "$out" failed)" "$(field "$out" max_gap_ms)"
      "$L" drill restore "$node" >/dev/null
      for _ in $(seq 600); do
        [[ $(ready app.kubernetes.io/component=speaker) == 3 && $(ready app=webserver) == 3 && $(announcer "$svc") == "$node" ]] && break
        sleep 0.2
      done
      sleep 2
    done
  done
done
python3 - "$OUT" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("\n| stream | longest gaps (ms) | median | failed | requests |\n|---|---|---:|---:|---:|")
for svc, policy in [("hostname-svc-lb", "Cluster"), ("hostname-svc-lb-local", "Local")]:
    for v6 in (False, True):
        r = [x["drill"] for x in rows if x["service"] == svc and x["ipv6"] == v6]
        gaps = sorted(d["max_gap_ms"] for d in r)
        print(f"| {policy} {'IPv6' if v6 else 'IPv4'} | {', '.join(map(str, gaps))} | {statistics.median(gaps):.0f} ms "
              f"| {sum(d['failed'] for d in r)} | {sum(d['requests'] for d in r)} |")
PY
