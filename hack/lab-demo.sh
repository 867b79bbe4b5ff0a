#!/usr/bin/env bash
# `make lab`: the whole user journey in the lab. Bring the lab up, `helm install` ferrolb's
# chart with a pool, apply the demo (Deployment hostname + one Service of each kind), and show
# it working: the EXTERNAL-IPs, who announces them, and curl to every kind of address.
set -euo pipefail
cd "$(dirname "$0")/.."
LAB=${FERROLB_LAB_BIN:-target/debug/ferrolb-lab}
BIN=$(bash hack/k8s-bins.sh)
POOL_V4=192.0.2.200-192.0.2.250
POOL_V6=2001:db8:1::c8-2001:db8:1::fa

start=$(date +%s.%N)
since() { awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN{printf "%.1f", e-s}'; }
kubeconfig=$("$LAB" up)
export KUBECONFIG=$kubeconfig
printf '\n== lab up in %s s; kubeconfig: %s\n' "$(since)" "$kubeconfig"

k() { "$BIN/kubectl" "$@"; }

echo; echo "== helm install ferrolb deploy/chart -n ferrolb-system --create-namespace (pool $POOL_V4, $POOL_V6)"
"$BIN/helm" upgrade --install ferrolb deploy/chart -n ferrolb-system --create-namespace \
  --set "pools[0].name=lan" --set "pools[0].addresses[0]=$POOL_V4" --set "pools[0].addresses[1]=$POOL_V6" \
  --wait --timeout 120s
k -n ferrolb-system get pods -o wide

echo; echo '== the demo: Deployment hostname and its Services (deploy/demo)'
k apply -f deploy/demo/hostname.yaml -f deploy/demo/services.yaml
k rollout status deployment/hostname --timeout=120s
for s in hostname-svc-lb hostname-svc-lb-local; do
  for _ in $(seq 100); do
    [[ -n $(k get svc "$s" -o jsonpath='{.status.loadBalancer.ingress[0].ip}') ]] && break
    sleep 0.2
  done
done
# The announcements follow the EndpointSlices; give them a moment to settle.
for _ in $(seq 50); do
  [[ $(k -n ferrolb-system get servicel2statuses -o name | wc -l) -ge 2 ]] && break
  sleep 0.2
done
printf '\n== ready after %s s\n' "$(since)"

echo; echo '== kubectl get svc,endpointslices'
k get svc,endpointslices -o wide
echo; echo '== who announces each EXTERNAL-IP (kubectl get servicel2statuses -n ferrolb-system)'
k -n ferrolb-system get servicel2statuses

fail=0
try() { # host url
  local body
  if body=$("$LAB" exec "$1" -- curl -sS --max-time 3 "$2" 2>&1); then
    printf '%-8s curl %-34s -> %s\n' "$1" "$2" "$(echo "$body" | tr '\n' ' ')"
  else
    printf '%-8s curl %-34s FAILED: %s\n' "$1" "$2" "$body"; fail=1
  fi
}
url() { [[ $1 == *:* ]] && echo "http://[$1]:$2/" || echo "http://$1:$2/"; }

echo; echo '== curl from the client host (192.0.2.100) to the EXTERNAL-IPs and the NodePorts'
for s in hostname-svc-lb hostname-svc-lb-local; do
  for ip in $(k get svc "$s" -o jsonpath='{range .status.loadBalancer.ingress[*]}{.ip}{" "}{end}'); do
    try client "$(url "$ip" 80)"
  done
done
# The NodePort answers on the node addresses of the Service's families (IPv4 only, by default).
families=$(k get svc hostname-svc-nodeport -o jsonpath='{.spec.ipFamilies}')
for n in $(k get nodes -o jsonpath='{range .items[*]}{.status.addresses[?(@.type=="InternalIP")].address}{" "}{end}'); do
  [[ $n == *:* && $families != *IPv6* ]] && continue
  try client "$(url "$n" 31000)"
done
echo; echo '== curl from node-1 to the ClusterIP'
try node-1 "$(url "$(k get svc hostname-svc-clusterip -o jsonpath='{.spec.clusterIP}')" 8080)"
echo; echo '== external-svc (ExternalName my.database.com): no IP, no rules'
k get svc external-svc

cat <<MSG

The lab is up with ferrolb installed. Try:
  export KUBECONFIG=$kubeconfig PATH=$BIN:\$PATH
  kubectl get svc                                     EXTERNAL-IPs
  kubectl -n ferrolb-system get servicel2statuses     who announces them
  $LAB exec client -- curl http://192.0.2.200/
  $LAB drill cordon --announcer hostname-svc-lb       traffic keeps flowing; another node announces
  $LAB drill uncordon node-N
  $LAB drill crash --announcer hostname-svc-lb        the announcer "loses power"
  $LAB drill restore node-N
  make lab-down                                       removes everything the lab made
MSG
exit $fail
