#!/usr/bin/env python3
"""Open N keep-alive HTTP/1.1 connections to HOST:PORT, send one request on
each, keep them all open, and wait to be told to close them.

Used by `bench/run` for the memory scenario.  Protocol on stdout/stdin:

    -> prints  "READY ok=<n> failed=<n> pending=<n>"   once every connection
               has either received its response or given up
    <- reads   one line (or EOF) from stdin, then closes everything
    -> prints  "CLOSED"

Everything is bounded: connecting + the first request must finish within
--timeout seconds, and the hold phase ends after --hold-max seconds even if
nothing is written to stdin.  Only loopback addresses are accepted.
"""

import argparse
import asyncio
import ipaddress
import resource
import sys
import time


async def one(host, port, path, sem, timeout, conns, stats):
    async with sem:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), timeout)
        except Exception:
            stats["failed"] += 1
            return
        conns.append(writer)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
            status = int(head.split(b" ", 2)[1])
            length = None
            chunked = False
            for line in head.split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                k = k.strip().lower()
                if k == b"content-length":
                    length = int(v.strip())
                elif k == b"transfer-encoding" and b"chunked" in v.lower():
                    chunked = True
            if chunked:
                await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), timeout)
            elif length:
                await asyncio.wait_for(reader.readexactly(length), timeout)
            if 200 <= status < 300:
                stats["ok"] += 1
            else:
                stats["failed"] += 1
        except asyncio.TimeoutError:
            stats["pending"] += 1
        except Exception:
            stats["failed"] += 1


async def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--conns", type=int, default=10000)
    ap.add_argument("--path", default="/")
    ap.add_argument("--concurrency", type=int, default=200,
                    help="connections being opened / awaiting their response at once")
    ap.add_argument("--timeout", type=float, default=20.0)
    ap.add_argument("--hold-max", type=float, default=120.0)
    a = ap.parse_args()
    if not ipaddress.ip_address(a.host).is_loopback:
        sys.exit("idle_conns.py only talks to loopback addresses")

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, a.conns + 256))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < a.conns + 64:
        print(f"WARN fd limit {want} < {a.conns}+64", file=sys.stderr)

    stats = {"ok": 0, "failed": 0, "pending": 0}
    conns = []
    sem = asyncio.Semaphore(a.concurrency)
    t0 = time.monotonic()
    await asyncio.gather(*(one(a.host, a.port, a.path, sem, a.timeout, conns, stats)
                           for _ in range(a.conns)))
    print(f"READY ok={stats['ok']} failed={stats['failed']} pending={stats['pending']} "
          f"open={sum(1 for w in conns if not w.is_closing())} secs={time.monotonic() - t0:.1f}",
          flush=True)

    loop = asyncio.get_running_loop()
    told = asyncio.Event()
    loop.add_reader(sys.stdin.fileno(), told.set)  # a line or EOF both wake us
    try:
        await asyncio.wait_for(told.wait(), a.hold_max)
    except asyncio.TimeoutError:
        pass
    loop.remove_reader(sys.stdin.fileno())
    for w in conns:
        w.close()
    print("CLOSED", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
