#!/usr/bin/env bash
# Sidecar mode on one machine: a "node" network namespace and two "pods" joined by veth pairs
# (10.200.0.0/24, inside the namespaces only), the capture rules of `trellis-proxy iptables` in
# each pod, a sidecar per pod running as UID 1337 and trellis-control in the node namespace. Pod
# A's application calls service B by a ClusterIP (10.96.0.10) that exists nowhere but in
# Trellis's tables. Needs root, iproute2, iptables, util-linux (setpriv), python3 and curl;
# removes everything it made when it exits.
#
#   sudo examples/sidecar/netns-demo.sh            # builds release binaries first
#   sudo TRELLIS_BIN_DIR=target/debug examples/sidecar/netns-demo.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "$(id -u)" = 0 ] || { echo "run as root: it creates network namespaces and iptables rules" >&2; exit 1; }
if [ -z "${TRELLIS_BIN_DIR:-}" ]; then
  cargo build --release -q -p trellis-control -p trellis-proxy
  TRELLIS_BIN_DIR=target/release
fi
bin=$(cd "$TRELLIS_BIN_DIR" && pwd)

node=trlnode pa=trlpoda pb=trlpodb
work=$(mktemp -d)
chmod 755 "$work"
pids=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  for ns in $node $pa $pb; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# The hosts: node, pod A (10.200.0.2 via 10.200.0.1), pod B (10.200.0.6 via 10.200.0.5).
for ns in $node $pa $pb; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
link() { # pod node-ip pod-ip veth
  ip link add "$4" netns $node type veth peer name eth0 netns "$1"
  ip -n $node addr add "$2/30" dev "$4"; ip -n $node link set "$4" up
  ip -n "$1" addr add "$3/30" dev eth0; ip -n "$1" link set eth0 up
  ip -n "$1" route add default via "$2"
}
link $pa 10.200.0.1 10.200.0.2 trlveth-a
link $pb 10.200.0.5 10.200.0.6 trlveth-b
ip netns exec $node sysctl -qw net.ipv4.ip_forward=1

# What the init containers do: the capture rules (print them with --dry-run).
for ns in $pa $pb; do ip netns exec "$ns" "$bin/trellis-proxy" iptables; done
echo "== pod A's rules"; ip netns exec $pa iptables-save -t nat | grep TRELLIS

# The controller, with service B's ClusterIP and its endpoint (pod B).
mkdir "$work/manifests"
cat > "$work/manifests/b.yaml" <<'YAML'
kind: Service
metadata: {name: b, namespace: demo}
spec:
  clusterIP: 10.96.0.10
  selector: {app: b}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
kind: EndpointSlice
metadata: {name: b-1, namespace: demo, labels: {kubernetes.io/service-name: b}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.200.0.6]}]
YAML
ip netns exec $node "$bin/trellis-control" serve --manifests "$work/manifests" \
  --listen 0.0.0.0:18000 --admin 127.0.0.1:18001 2>"$work/control.log" &
pids+=($!)

# Pod B's application, and the two sidecars as UID 1337.
mkdir "$work/www" && echo "hello from pod B" > "$work/www/index.html"
ip netns exec $pb python3 -m http.server 8080 --directory "$work/www" >/dev/null 2>&1 &
pids+=($!)
sidecar() { # ns gateway node-id app
  ip netns exec "$1" setpriv --reuid 1337 --regid 1337 --clear-groups \
    "$bin/trellis-proxy" --xds "$2:18000" --role sidecar --namespace demo --node-id "$3" \
    --label "app=$4" 2>"$work/$3.log" &
  pids+=($!)
}
sidecar $pa 10.200.0.1 pod-a a
sidecar $pb 10.200.0.5 pod-b b

# Pod A's application is curl, as an ordinary user: it knows nothing of the sidecars.
as_app() { ip netns exec $pa setpriv --reuid 1000 --regid 1000 --clear-groups "$@"; }
for _ in $(seq 100); do as_app curl -sf -o /dev/null --max-time 2 http://10.96.0.10/ && break; sleep 0.2; done
echo "== curl http://10.96.0.10/ from pod A"
as_app curl -sS --max-time 5 http://10.96.0.10/
echo "== pod A's sidecar: outbound capture listener"
ip netns exec $pa curl -s http://127.0.0.1:15000/metrics | grep -E 'capture/outbound|protocol_detection' | grep -v '^#' | head -5
echo "== pod B's sidecar: inbound capture listener"
ip netns exec $pb curl -s http://127.0.0.1:15000/metrics | grep -E 'capture/inbound|protocol_detection' | grep -v '^#' | head -5
