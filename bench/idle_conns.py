#!/usr/bin/env python3
"""Opens N keep-alive connections to a server, sends one request on each,
reads the response, and then holds them idle so the server's memory per
idle connection can be read from /proc.

Prints `READY <open>` once every connection has had its response, then
waits until standard input closes and exits (closing them all).

Usage: idle_conns.py HOST PORT N [--tls] [--host bench.test]
"""

import argparse
import asyncio
import resource
import ssl
import sys

CONCURRENT_OPENS = 128
TIMEOUT = 30.0


async def open_one(args, context, sem, conns):
    async with sem:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                args.addr,
                args.port,
                ssl=context,
                server_hostname=args.host if context else None,
            ),
            TIMEOUT,
        )
        request = f"GET / HTTP/1.1\r\nHost: {args.host}\r\n\r\n".encode()
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
        await asyncio.wait_for(reader.readexactly(length), TIMEOUT)
        conns.append(writer)


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("addr")
    parser.add_argument("port", type=int)
    parser.add_argument("n", type=int)
    parser.add_argument("--tls", action="store_true")
    parser.add_argument("--host", default="bench.test")
    args = parser.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.n + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))

    context = None
    if args.tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols(["http/1.1"])

    sem = asyncio.Semaphore(CONCURRENT_OPENS)
    conns = []
    results = await asyncio.gather(
        *(open_one(args, context, sem, conns) for _ in range(args.n)),
        return_exceptions=True,
    )
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        print(f"FAILED {len(failures)} first={failures[0]!r}", flush=True)
    print(f"READY {len(conns)}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for writer in conns:
        writer.close()


if __name__ == "__main__":
    asyncio.run(main())
