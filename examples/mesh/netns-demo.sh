#!/usr/bin/env bash
# Mesh identity on one machine: a "node" network namespace and three "pods" (web, api, jobs) on
# veth pairs (10.200.0.0/24, inside the namespaces only), capture rules in each pod, a sidecar per
# pod as UID 1337 that proves its service account with a token and gets its certificate from
# trellis-control in the node namespace, over TLS. Then: web calls api over mTLS and api's
# application sees web's identity; api is strict, so plaintext from the node is refused; with
# policy.yaml, only web's GET /public passes. Needs root, iproute2, iptables, util-linux
# (setpriv), openssl, python3 and curl; removes everything it made when it exits.
#
#   sudo examples/mesh/netns-demo.sh            # builds release binaries first
#   sudo TRELLIS_BIN_DIR=target/debug examples/mesh/netns-demo.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "$(id -u)" = 0 ] || { echo "run as root: it creates network namespaces and iptables rules" >&2; exit 1; }
if [ -z "${TRELLIS_BIN_DIR:-}" ]; then
  cargo build --release -q -p trellis-control -p trellis-proxy
  TRELLIS_BIN_DIR=target/release
fi
bin=$(cd "$TRELLIS_BIN_DIR" && pwd)

node=trmnode
pods=(web api jobs)
work=$(mktemp -d)
chmod 755 "$work"
pids=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  for ns in $node "${pods[@]/#/trm}"; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# The hosts: pod N at 10.200.0.(4N+2) via the node at 10.200.0.(4N+1).
ip netns add $node; ip -n $node link set lo up
for i in 0 1 2; do
  ns=trm${pods[$i]} gw=10.200.0.$((4 * i + 1)) ip=10.200.0.$((4 * i + 2))
  ip netns add "$ns"; ip -n "$ns" link set lo up
  ip link add "trmveth$i" netns $node type veth peer name eth0 netns "$ns"
  ip -n $node addr add "$gw/30" dev "trmveth$i"; ip -n $node link set "trmveth$i" up
  ip -n "$ns" addr add "$ip/30" dev eth0; ip -n "$ns" link set eth0 up
  ip -n "$ns" route add default via "$gw"
  ip netns exec "$ns" "$bin/trellis-proxy" iptables >/dev/null
done
ip netns exec $node sysctl -qw net.ipv4.ip_forward=1

# The channel's TLS: a CA for the controller's certificate, which names the three node addresses
# the sidecars dial.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=demo-ca \
  -keyout "$work/ca-key.pem" -out "$work/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=trellis-control \
  -keyout "$work/control-key.pem" -out "$work/control.csr" 2>/dev/null
printf 'subjectAltName=IP:10.200.0.1,IP:10.200.0.5,IP:10.200.0.9\n' > "$work/san.ext"
openssl x509 -req -in "$work/control.csr" -CA "$work/ca.pem" -CAkey "$work/ca-key.pem" \
  -CAcreateserial -days 1 -extfile "$work/san.ext" -out "$work/control.pem" 2>/dev/null
chmod 644 "$work/ca.pem"

# Tokens in the layout of examples/mesh/tokens, fresh for this run: the controller's directory,
# and each sidecar's own copy, readable by it alone.
for sa in "${pods[@]}"; do
  mkdir -p "$work/tokens/shop"
  head -c 24 /dev/urandom | base64 > "$work/tokens/shop/$sa"
  install -m 600 -o 1337 -g 1337 "$work/tokens/shop/$sa" "$work/$sa.token"
done

mkdir "$work/manifests"
cp examples/mesh/{namespace,pods,services}.yaml "$work/manifests/"
ip netns exec $node "$bin/trellis-control" serve --manifests "$work/manifests" \
  --listen 0.0.0.0:18000 --admin 127.0.0.1:18001 --ca-dir "$work/mesh-ca" \
  --identity-tokens "$work/tokens" --tls-cert "$work/control.pem" \
  --tls-key "$work/control-key.pem" 2>"$work/control.log" &
pids+=($!)

# api's application answers with the identity its sidecar vouched for.
cat > "$work/app.py" <<'PY'
import http.server
class H(http.server.BaseHTTPRequestHandler):
    def answer(self):
        who = self.headers.get("x-trellis-client-identity", "(none: not a verified mesh caller)")
        body = f"api: {self.command} {self.path} from {who}\n".encode()
        self.send_response(200); self.send_header("content-length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
    do_GET = do_POST = answer
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
PY
# (As root: an interpreter under a user's home may not be readable by others. Connections it
# accepts are inbound, so its UID does not matter to the capture rules.)
ip netns exec trmapi python3 "$work/app.py" &
pids+=($!)

for i in 0 1 2; do
  sa=${pods[$i]} extra=()
  [ "$sa" = api ] && extra=(--label trellis.io/mtls=strict)
  ip netns exec "trm$sa" setpriv --reuid 1337 --regid 1337 --clear-groups \
    "$bin/trellis-proxy" --xds "10.200.0.$((4 * i + 1)):18000" --xds-ca-file "$work/ca.pem" \
    --role sidecar --namespace shop --service-account "$sa" \
    --identity-token-file "$work/$sa.token" --node-id "$sa" --label "app=$sa" \
    --label trellis.io/sidecar=true "${extra[@]}" 2>"$work/sidecar-$sa.log" &
  pids+=($!)
done

as_app() { ip netns exec "trm$1" setpriv --reuid 1000 --regid 1000 --clear-groups "${@:2}"; }
echo "== web → api (10.96.0.20) over mTLS"
for _ in $(seq 50); do
  as_app web curl -sf --max-time 2 http://10.96.0.20/public/index && break
  sleep 0.2
done
echo "== api's handshakes:"
ip netns exec trmapi curl -s http://127.0.0.1:15000/metrics | grep '^trellis_mesh_tls_handshakes_total' || true
echo "== plaintext from the node to api's pod (api is strict):"
ip netns exec $node curl -sS --max-time 2 http://10.200.0.6:8080/ || echo "(refused, as it should be)"

echo "== with examples/mesh/policy.yaml: only web's GET /public"
cp examples/mesh/policy.yaml "$work/manifests/"
sleep 1 # the controller's debounce and one push; a demo, not a test
for who in web jobs; do
  printf '%s GET  /public/index: ' $who; as_app $who curl -s -o /dev/null -w '%{http_code}\n' http://10.96.0.20/public/index
done
printf 'web POST /public/index: '; as_app web curl -s -o /dev/null -w '%{http_code}\n' -X POST http://10.96.0.20/public/index
echo "(logs were in $work, removed on exit)"
