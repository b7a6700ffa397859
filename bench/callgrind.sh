#!/usr/bin/env bash
# Instructions per proxied request, counted by callgrind (stable on a loaded machine, unlike time).
#
#   bench/callgrind.sh [N1] [N2]        # default 2000 6000
#
# Runs the release trellis-proxy under `valgrind --tool=callgrind` twice, once driven with N1 and
# once with N2 keep-alive HTTP/1.1 requests over one connection (h2load --h1 -c1, a fixed count),
# and prints (total(N2) - total(N1)) / (N2 - N1): start-up and shutdown cancel out.
# The upstream is nginx returning a 12-byte body; the proxy config is bench/run's `small` scenario
# (one listener, one `prefix: /` route, one http1 cluster) plus, optionally, the YAML lines in
# $EXTRA_ROUTE (added to the route, e.g. `retry: ...`) and $EXTRA_CLUSTER (added to the cluster).
#
# Environment: TRELLIS_BIN (default $CARGO_TARGET_DIR/release/trellis-proxy or target/release),
# OUT (directory for the profiles, default bench/.work/callgrind). The N2 profile is kept as
# $OUT/callgrind.N2.out for `callgrind_annotate --inclusive=yes`.
set -euo pipefail

N1=${1:-2000}
N2=${2:-6000}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
TGT=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=${TRELLIS_BIN:-$TGT/release/trellis-proxy}
OUT=${OUT:-$HERE/.work/callgrind}
mkdir -p "$OUT"
[ -x "$BIN" ] || { echo "no proxy binary at $BIN (cargo build --release -p trellis-proxy)" >&2; exit 1; }
for t in valgrind h2load nginx curl python3; do
    command -v "$t" >/dev/null || { echo "missing: $t" >&2; exit 1; }
done

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP_PORT=$(free_port)
PX_PORT=$(free_port)
ADMIN_PORT=$(free_port)

# The upstream: nginx, one worker, a fixed small body.
NGX="$OUT/nginx"
mkdir -p "$NGX/logs"
cat >"$NGX/nginx.conf" <<EOF
worker_processes 1;
pid $NGX/nginx.pid;
error_log $NGX/logs/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    client_body_temp_path $NGX/tmp;
    proxy_temp_path $NGX/tmp;
    fastcgi_temp_path $NGX/tmp;
    uwsgi_temp_path $NGX/tmp;
    scgi_temp_path $NGX/tmp;
    server {
        listen 127.0.0.1:$UP_PORT;
        location / { default_type text/plain; return 200 "hello world\n"; }
    }
}
EOF
nginx -p "$NGX" -c "$NGX/nginx.conf" -e "$NGX/logs/error.log"
cleanup() { kill "$(cat "$NGX/nginx.pid" 2>/dev/null)" 2>/dev/null || true; }
trap cleanup EXIT

cat >"$OUT/proxy.yaml" <<EOF
listeners:
  - name: bench
    address: 127.0.0.1:$PX_PORT
    protocol: http
    route_config: main
route_configs:
  - name: main
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - name: all
            match: { path: { prefix: / } }
            forward: { cluster: upstream }
${EXTRA_ROUTE:+$(printf '%s\n' "$EXTRA_ROUTE" | sed 's/^/            /')}
clusters:
  - name: upstream
    protocol: http1
    connect_timeout: 1s
    endpoints:
      - 127.0.0.1:$UP_PORT
${EXTRA_CLUSTER:+$(printf '%s\n' "$EXTRA_CLUSTER" | sed 's/^/    /')}
EOF

# One profiled run with $1 requests; prints the total instruction count.
run() {
    local n=$1 prof="$OUT/callgrind.$1.out"
    rm -f "$prof"
    RUST_LOG=warn valgrind --tool=callgrind --collect-atstart=yes --callgrind-out-file="$prof" \
        "$BIN" --config "$OUT/proxy.yaml" --workers 1 --admin "127.0.0.1:$ADMIN_PORT" \
        --drain-delay 0s --drain-timeout 1s >"$OUT/proxy.$n.log" 2>&1 &
    local pid=$!
    # Wait (bounded) for the listener; failed connects never reach the proxy's accept loop.
    local i=0
    until curl -s -o /dev/null "http://127.0.0.1:$PX_PORT/"; do
        i=$((i + 1))
        [ $i -lt 600 ] || { echo "proxy did not come up; see $OUT/proxy.$n.log" >&2; kill "$pid"; exit 1; }
        sleep 0.1
    done
    h2load --h1 -n "$n" -c 1 -m 1 "http://127.0.0.1:$PX_PORT/" >"$OUT/h2load.$n.log"
    grep -q "$n succeeded" "$OUT/h2load.$n.log" || { echo "h2load: not all $n requests succeeded" >&2; cat "$OUT/h2load.$n.log" >&2; }
    kill -INT "$pid"
    wait "$pid" || true
    awk '/^(summary|totals):/ { print $2; exit }' "$prof"
}

T1=$(run "$N1")
T2=$(run "$N2")
echo "total($N1)=$T1 total($N2)=$T2"
echo "instructions/request: $(( (T2 - T1) / (N2 - N1) ))"
echo "profile: $OUT/callgrind.$N2.out"
