#!/usr/bin/env bash
# `make lab`: bring the lab up and show the demo working: the hostname Deployment's pods
# Running on different nodes, each answering `curl` from the client host with its own name.
set -euo pipefail
cd "$(dirname "$0")/.."
LAB=${FERROLB_LAB_BIN:-target/debug/ferrolb-lab}

start=$(date +%s.%N)
kubeconfig=$("$LAB" up)
printf '\n== lab up in %s s; kubeconfig: %s\n' "$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN{printf "%.1f", e-s}')" "$kubeconfig"

k() { "$LAB" kubectl -- "$@"; }
k apply -f deploy/demo/hostname.yaml
k rollout status deployment/hostname --timeout=120s

echo; echo '== nodes'
k get nodes -o wide
echo; echo '== pods of the hostname Deployment'
k get pods -l app=webserver -o wide

echo; echo '== curl from the client host (192.0.2.100) to each pod'
fail=0
while read -r pod ips; do
  for ip in ${ips//,/ }; do
    [[ $ip == *:* ]] && url="http://[$ip]/" || url="http://$ip/"
    if body=$("$LAB" exec client -- curl -sS --max-time 3 "$url"); then
      printf '%-44s -> %s\n' "curl $url" "$(echo "$body" | tr '\n' ' ')"
      grep -q "hostname: $pod" <<<"$body" || { echo "   expected $pod to answer"; fail=1; }
    else
      echo "curl $url failed"; fail=1
    fi
  done
done < <(k get pods -l app=webserver -o jsonpath='{range .items[*]}{.metadata.name}{" "}{range .status.podIPs[*]}{.ip}{","}{end}{"\n"}{end}')

cat <<MSG

The lab is up. Try:
  $LAB status
  $LAB kubectl -- get pods -A -o wide       (or: kubectl --kubeconfig $kubeconfig ...)
  $LAB exec client -- curl http://<pod IP>/
  make lab-down                              (removes everything the lab made)
MSG
exit $fail
