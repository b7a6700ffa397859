#!/usr/bin/env bash
# Live reconfiguration demo: trellis-control watches a copy of these manifests and feeds a
# gateway proxy on 127.0.0.1:8080 (HTTPS on 8443, TLS to TCP on 9443); editing the HTTPRoute
# moves traffic from v1 to v2.
#
#   examples/cluster/demo.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -q -p trellis-control -p trellis-proxy
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

cp examples/cluster/*.yaml "$work/"
for v in 1 2; do
  mkdir -p "$work/www-v$v" && echo "hello from v$v" > "$work/www-v$v/index.html"
  python3 -m http.server "910$v" --bind 127.0.0.1 --directory "$work/www-v$v" >/dev/null 2>&1 &
  pids+=($!)
done
target/release/trellis-control serve --manifests "$work" --listen 127.0.0.1:18000 \
  --admin 127.0.0.1:18001 2>"$work/control.log" &
pids+=($!)
target/release/trellis-proxy --xds 127.0.0.1:18000 --role gateway --gateway ingress \
  --namespace demo --node-id demo-gateway --label trellis.io/bind-ip=127.0.0.1 \
  --admin 127.0.0.1:15000 2>"$work/proxy.log" &
pids+=($!)

# Wait (bounded) until the gateway serves.
for _ in $(seq 50); do curl -sf -o /dev/null http://127.0.0.1:8080/ && break; sleep 0.2; done

count() { for _ in $(seq 20); do curl -s http://127.0.0.1:8080/; done | sort | uniq -c; }
echo "== route.yaml: 100% v1"; count
echo "== editing route.yaml: 50/50"
sed -i 's/weight: 100}/weight: 50}/; s/weight: 0}/weight: 50}/' "$work/route.yaml"
sleep 1; count
echo "== editing route.yaml: 100% v2"
sed -i 's/hello-v1, port: 8080, weight: 50}/hello-v1, port: 8080, weight: 0}/; s/hello-v2, port: 8080, weight: 50}/hello-v2, port: 8080, weight: 100}/' "$work/route.yaml"
sleep 1; count
echo "== HTTPS on 8443 (the test-only certificate of tls-secret.yaml, hence -k)"
curl -sk --resolve hello.demo.example:8443:127.0.0.1 https://hello.demo.example:8443/
echo "== TLS on 9443, terminated, then TCP to hello-v1 (tcp-route.yaml)"
curl -sk --resolve hello.demo.example:9443:127.0.0.1 https://hello.demo.example:9443/
echo "== controller status"
target/release/trellis-control status --admin 127.0.0.1:18001
