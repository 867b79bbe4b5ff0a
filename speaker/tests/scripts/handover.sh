#!/bin/bash
# An in-flight TCP connection survives the client's neighbour entry moving from node A to node B
# when B carries the handover chain (rendered by the test, on stdin: "-" for none).
#   client ── LAN ── A, B (DNAT the LB address to srv, masquerade) ── srv (answers after 1.5 s)
# Prints "curl exit N" for a connection cut over from A to B mid-flight, then for a new one.
set -u
P=flbho$$
HANDOVER=$(cat)
cleanup() { for n in lan client a b srv; do ip netns del $P-$n 2>/dev/null; done; }
cleanup
trap cleanup EXIT
for n in lan client a b srv; do ip netns add $P-$n; done
ip -n $P-lan link add br0 type bridge; ip -n $P-lan link set br0 up
i=0
for n in client a b srv; do
  i=$((i+1)); v=fho$i$$
  ip link add $v type veth peer name eth0 netns $P-$n
  ip link set $v netns $P-lan
  ip -n $P-lan link set $v master br0 up
  ip -n $P-$n link set eth0 up; ip -n $P-$n link set lo up
done
ip -n $P-client addr add 198.18.200.100/24 dev eth0
ip -n $P-a addr add 198.18.200.11/24 dev eth0
ip -n $P-b addr add 198.18.200.12/24 dev eth0
ip -n $P-srv addr add 198.18.200.50/24 dev eth0
for n in a b; do ip netns exec $P-$n sysctl -qw net.ipv4.ip_forward=1; done
LB=198.18.200.250
rules() { # node
cat <<NFT
table ip t {
  chain pre { type nat hook prerouting priority dstnat; ip daddr $LB tcp dport 80 meta mark set 1 dnat to 198.18.200.50:80; }
  chain post { type nat hook postrouting priority srcnat; meta mark 1 masquerade; }
NFT
echo "}"
}
rules a | ip netns exec $P-a nft -f -
rules b | ip netns exec $P-b nft -f -
if [ "$HANDOVER" != "-" ]; then echo "$HANDOVER" | ip netns exec $P-b nft -f - || { cleanup; exit 3; }; fi
ip netns exec $P-srv python3 -c '
import http.server,time
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(s):
        time.sleep(1.5); s.send_response(200); s.end_headers(); s.wfile.write(b"slow ok\n")
    def log_message(*a): pass
http.server.HTTPServer(("0.0.0.0",80),H).serve_forever()' &
SRV=$!
sleep 0.5
MACA=$(ip -n $P-a -o link show eth0 | grep -o 'link/ether [^ ]*' | cut -d' ' -f2)
MACB=$(ip -n $P-b -o link show eth0 | grep -o 'link/ether [^ ]*' | cut -d' ' -f2)
ip -n $P-client neigh replace $LB lladdr $MACA dev eth0 nud permanent
(sleep 0.5; ip -n $P-client neigh replace $LB lladdr $MACB dev eth0 nud permanent) &
ip netns exec $P-client curl -sS -m 5 http://$LB/ ; echo "curl exit $?"
# and a new connection after the switch goes through B normally
ip netns exec $P-client curl -sS -m 5 http://$LB/ ; echo "curl exit $?"
kill $SRV; wait 2>/dev/null
