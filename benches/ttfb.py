#!/usr/bin/env python3
"""Time to first SSE byte of streamed chat completions, stdlib only.

usage: ttfb.py HOST PORT MODEL CONCURRENCY ROUNDS [WARMUP]

WARMUP rounds (default 0) run first and are not counted: a process's
first burst of new connections pays for memory it has never touched and
upstream connections it has not yet pooled, once in its life. Each round opens CONCURRENCY connections at once; each sends one
`"stream": true` request (HTTP/1.1, Connection: close) and measures the time
from just before sending to the first `data:` line, then drains the stream.
Prints: n median_ms p90_ms p99_ms max_ms errors (over all streams of all rounds).
"""
import asyncio
import json
import sys
import time


async def one(host, port, body):
    reader, writer = await asyncio.open_connection(host, port)
    request = (
        "POST /v1/chat/completions HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body
    start = time.perf_counter()
    writer.write(request)
    await writer.drain()
    status = await reader.readline()
    if b" 200 " not in status:
        writer.close()
        raise RuntimeError(status.decode(errors="replace").strip())
    ttfb = None
    while True:
        line = await reader.readline()
        if not line:
            break
        # Chunked framing lines are skipped; the first SSE data line counts.
        if ttfb is None and b"data:" in line:
            ttfb = time.perf_counter() - start
    writer.close()
    if ttfb is None:
        raise RuntimeError("no data: line")
    return ttfb


async def main():
    host, port, model = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    concurrency, rounds = int(sys.argv[4]), int(sys.argv[5])
    warmup = int(sys.argv[6]) if len(sys.argv) > 6 else 0
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "Say hi."}],
            "max_tokens": 20,
            "stream": True,
        }
    ).encode()
    for _ in range(warmup):
        await asyncio.gather(
            *(one(host, port, body) for _ in range(concurrency)), return_exceptions=True
        )
    times, errors = [], 0
    for _ in range(rounds):
        results = await asyncio.gather(
            *(one(host, port, body) for _ in range(concurrency)), return_exceptions=True
        )
        for r in results:
            if isinstance(r, Exception):
                errors += 1
            else:
                times.append(r)
    if not times:
        print(f"0 nan nan nan nan {errors}")
        return
    times.sort()

    def q(p):
        return times[min(len(times) - 1, int(p * len(times)))] * 1000

    print(f"{len(times)} {q(0.5):.2f} {q(0.9):.2f} {q(0.99):.2f} {times[-1] * 1000:.2f} {errors}")


asyncio.run(main())
