#!/usr/bin/env python3
"""Writes a small seed corpus for each fuzz target into DIR/<target>/ (standard library only).

    fuzz/seeds.py DIR

The seeds are a few well-formed inputs of each kind, so that the fuzzer starts from inputs that
get past the first checks rather than spending its first minutes rediscovering the formats.
"""
import os
import struct
import sys

REQUEST_HEADS = [
    b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
    b"GET /public/./admin?x=1 HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
    b"GET /public/%61dmin/..%2fx//y HTTP/1.1\r\nHost: api.example.com:8080\r\n\r\n",
    b"GET /api/../admin HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
    b"GET /t/me HTTP/1.1\r\nHost: a.example.org\r\nx-user: 1\r\n\r\n",
    b"POST /p/%2E%2e/f/a%5cb HTTP/1.1\r\nHost: api.example.com\r\n"
    b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET http://api.example.com/re/123 HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
    b"OPTIONS * HTTP/1.0\r\n\r\n",
]

BOOTSTRAP = """listeners:
  - { name: web, address: 127.0.0.1:8080, protocol: http, route_config: main }
route_configs:
  - name: main
    virtual_hosts:
      - name: default
        domains: ["*", "*.example.com"]
        routes:
          - name: a
            match: { path: { template: "/t/{id}" }, headers: [{ name: x, regex: "a+" }] }
            filters: { rewrite: { prefix: / } }
            forward: { clusters: [{ name: c, weight: 3 }] }
          - { name: r, match: { path: { prefix: /old } }, redirect: { prefix: /new, status: 301 } }
          - { name: d, match: { path: { exact: / } }, direct_response: { status: 200, body: hi } }
clusters:
  - name: c
    protocol: http1
    connect_timeout: 1s
    endpoints: [127.0.0.1:8081]
"""

ALIASES = """a: &a [x, x]
b: &b [*a, *a]
c: [*b, *b, {k: [[[1]]]}]
"""


def client_hello(name, record_size):
    body = b"\x03\x03" + b"\x07" * 32 + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    exts = b""
    if name is not None:
        sni = b"\x00" + struct.pack(">H", len(name)) + name
        lst = struct.pack(">H", len(sni)) + sni
        exts += b"\x00\x00" + struct.pack(">H", len(lst)) + lst
    exts += b"\x00\x2b\x00\x03\x02\x03\x04"
    body += struct.pack(">H", len(exts)) + exts
    hs = b"\x01\x00" + struct.pack(">H", len(body)) + body
    out = b""
    for i in range(0, len(hs), record_size):
        chunk = hs[i : i + record_size]
        out += b"\x16\x03\x01" + struct.pack(">H", len(chunk)) + chunk
    return out


def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def field(tag, value):
    """A length-delimited field (string or message); an int is written as a varint."""
    if isinstance(value, int):
        return varint(tag << 3) + varint(value)
    if isinstance(value, str):
        value = value.encode()
    return varint(tag << 3 | 2) + varint(len(value)) + value


def response(type_url, resources, removed=()):
    out = field(1, "trellis.discovery.v1." + type_url)
    for name, kind_tag, msg in resources:
        out += field(2, field(1, name) + field(2, "1") + field(kind_tag, msg))
    for name in removed:
        out += field(3, name)
    return out + field(4, "n1")


def framed(*messages):
    """The discovery target's input: each message but the last prefixed by its u16 LE length."""
    out = b""
    for m in messages[:-1]:
        out += struct.pack("<H", len(m)) + m
    return out + messages[-1]


def discovery_seeds():
    cluster = response("Cluster", [("c", 5, field(1, "c"))])
    cla = response(
        "ClusterLoadAssignment",
        [("c", 6, field(1, "c") + field(2, field(1, "127.0.0.1:8081") + field(2, 1)))],
    )
    route = field(1, "r") + field(2, field(2, "/api")) + field(
        3, field(1, field(1, "c") + field(2, 1))
    )
    template = field(1, "t") + field(2, field(3, "/t/{id}")) + field(3, field(1, field(1, "x")))
    vhost = field(1, "vh") + field(2, "*") + field(3, route) + field(3, template)
    rc = response("RouteConfiguration", [("rc", 4, field(1, "rc") + field(2, vhost))])
    listener = response(
        "Listener",
        [("l", 3, field(1, "l") + field(2, "127.0.0.1:0") + field(3, field(1, "rc")))],
    )
    return {
        "cluster": cluster,
        "all": framed(cluster, cla, rc, listener),
        "removed": framed(cluster, response("Cluster", [], removed=["c"])),
        "mismatch": response("Listener", [("c", 5, field(1, "other"))]),
    }


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: fuzz/seeds.py DIR")
    root = sys.argv[1]
    seeds = {
        "request_head": {f"head{i}": h for i, h in enumerate(REQUEST_HEADS)},
        "client_hello": {
            # The first two bytes choose how the fuzz target cuts the rest into reads.
            "one_record": b"\x00\x07" + client_hello(b"api.example.com", 16384),
            "many_records": b"\x01\x33" + client_hello(b"API.example.com", 7),
            "no_name": b"\x02\x00" + client_hello(None, 16384),
        },
        "bootstrap_yaml": {"routes": BOOTSTRAP.encode(), "aliases": ALIASES.encode()},
        "discovery": discovery_seeds(),
        "protocol_detection": {
            "http1": b"GET /index.html HTTP/1.1\r\nHost: a\r\n\r\n",
            "h2c": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
            "tls": client_hello(b"api.example.com", 16384),
            "text": b"get key\r\n",
        },
    }
    for target, files in seeds.items():
        d = os.path.join(root, target)
        os.makedirs(d, exist_ok=True)
        for name, data in files.items():
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)


if __name__ == "__main__":
    main()
