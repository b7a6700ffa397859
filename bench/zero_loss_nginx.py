#!/usr/bin/env python3
"""POSTs through trellis-proxy to an nginx upstream that closes idle keep-alive connections after
1 s without saying so (`keepalive_timeout 1s`), in bursts separated by pauses of 0.9-1.1 s, so
that pooled upstream connections are closing just as the next burst is sent on them. Prints the
POSTs lost (any answer but 200, or no answer); 0 is expected.

    cargo build --release -p trellis-proxy
    bench/zero_loss_nginx.py --proxy target/release/trellis-proxy --requests 10000

Everything runs on 127.0.0.1; nginx and the proxy are children of this script and stopped at
its end. The test `posts_survive_nginx_closing_idle_connections` (proxy/tests/
upstream_keepalive_e2e.rs) is the short form of this run.
"""

import argparse
import http.client
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time


def free_port():
    # nginx binds its port itself: pick one the kernel hands out and release it.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nginx(work, keepalive):
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(nginx):
        sys.exit("nginx is not installed (apt-get install -y nginx-light)")
    port = free_port()
    conf = os.path.join(work, "nginx.conf")
    with open(conf, "w") as f:
        f.write(
            f"daemon off; master_process off; worker_processes 1; pid {work}/nginx.pid;\n"
            f"error_log {work}/error.log;\n"
            "events { worker_connections 1024; }\n"
            "http {\n"
            f"  access_log off; keepalive_timeout {keepalive}; keepalive_requests 100000;\n"
            f"  client_body_temp_path {work}/body;\n"
            f"  server {{ listen 127.0.0.1:{port}; location / {{ return 200 \"ok\\n\"; }} }}\n"
            "}\n"
        )
    proc = subprocess.Popen([nginx, "-c", conf, "-p", work], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    sys.exit("nginx did not start")


def start_proxy(binary, work, upstream_port):
    conf = os.path.join(work, "proxy.yaml")
    with open(conf, "w") as f:
        f.write(
            'listeners:\n  - { name: main, address: "127.0.0.1:0" }\n'
            "route_configs:\n  - name: rc\n    virtual_hosts:\n"
            '      - { name: all, domains: ["*"], routes: [{ name: up, forward: { cluster: up } }] }\n'
            f'clusters:\n  - {{ name: up, endpoints: ["127.0.0.1:{upstream_port}"] }}\n'
        )
    proc = subprocess.Popen(
        [binary, "--config", conf, "--admin", "127.0.0.1:0", "--log", "warn,trellis_proxy::listener=info"],
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stderr:
        m = re.search(r"local=(\S+)", line)
        if "listening" in line and m:
            host, port = m.group(1).rsplit(":", 1)
            # Keep reading stderr so the proxy never blocks on a full pipe.
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, int(port)
    sys.exit("the proxy did not start")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--proxy", required=True, help="the trellis-proxy binary")
    ap.add_argument("--requests", type=int, default=10000)
    ap.add_argument("--width", type=int, default=50, help="concurrent POSTs per burst")
    ap.add_argument("--keepalive", default="1s", help="nginx keepalive_timeout")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    random.seed(args.seed)

    work = tempfile.mkdtemp(prefix="trellis-zero-loss-")
    nginx, nginx_port = start_nginx(work, args.keepalive)
    proxy, proxy_port = start_proxy(args.proxy, work, nginx_port)
    bursts = (args.requests + args.width - 1) // args.width
    lost = []
    lock = threading.Lock()
    start = threading.Barrier(args.width + 1)
    done = threading.Barrier(args.width + 1)

    def client(k):
        # One keep-alive connection to the proxy per client: what is tested is the proxy's pool of
        # upstream connections, not the client's.
        conn = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=10)
        for b in range(bursts):
            start.wait()
            if b * args.width + k < args.requests:
                try:
                    conn.request("POST", "/submit", body=b"payload", headers={"content-type": "text/plain"})
                    resp = conn.getresponse()
                    resp.read()
                    if resp.status != 200:
                        with lock:
                            lost.append(f"burst {b}: {resp.status} {resp.getheader('x-trellis-error')}")
                except Exception as e:  # noqa: BLE001 - every failure is a lost POST
                    with lock:
                        lost.append(f"burst {b}: {e!r}")
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=10)
            done.wait()

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(args.width)]
    for t in threads:
        t.start()
    began = time.monotonic()
    try:
        for b in range(bursts):
            start.wait()
            done.wait()
            # The first pause lets nginx close every connection; then pauses straddle its timeout.
            time.sleep(1.5 if b == 0 else random.uniform(0.9, 1.1))
    finally:
        proxy.terminate()
        nginx.terminate()
        proxy.wait(timeout=40)
        nginx.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"{args.requests} POSTs in {bursts} bursts of {args.width}, pauses 0.9-1.1 s, nginx "
        f"keepalive_timeout {args.keepalive}: {len(lost)} lost ({time.monotonic() - began:.0f} s)"
    )
    for line in lost[:20]:
        print("  " + line)
    sys.exit(1 if lost else 0)


if __name__ == "__main__":
    main()
