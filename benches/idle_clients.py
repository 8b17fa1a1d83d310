#!/usr/bin/env python3
"""Opens N keep-alive HTTP/1.1 connections to 127.0.0.1:PORT, sends one
small chat completion on each and reads its answer, then holds them all
open and idle: prints `open N` and waits until stdin closes.

usage: benches/idle_clients.py PORT N MODEL   (benches/idle.sh runs it)
"""
import asyncio
import sys

PORT, N, MODEL = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
BODY = ('{"model":"%s","messages":[{"role":"user","content":"Say hi."}],"max_tokens":16}' % MODEL).encode()
REQUEST = (
    b"POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(BODY), BODY)
)


async def one(gate):
    async with gate:
        reader, writer = await asyncio.open_connection("127.0.0.1", PORT)
        writer.write(REQUEST)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status = head.split(b" ", 2)[1]
        if status != b"200":
            raise SystemExit(f"answer {status!r}: {head!r}")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
        return writer


async def main():
    gate = asyncio.Semaphore(100)
    writers = await asyncio.gather(*(one(gate) for _ in range(N)))
    print(f"open {len(writers)}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for w in writers:
        w.close()


asyncio.run(main())
