#!/usr/bin/env python3
"""What a client that stops reading a stream costs weir in memory (SPEC,
"Slow clients": weir holds at most a few tens of KiB per stream).

usage: benches/slow_readers.py [WEIR_BIN] [STREAMS]

Starts a backend (stdlib, in this process) that streams 4 KiB SSE events
as fast as the socket takes them, and weir (default target/dist/weir) in
front of it; opens STREAMS (default 200) streamed requests over HTTP/1.1
whose clients never read (32 KiB receive buffers), waits until weir's RSS
settles, and prints weir's RSS before and with them, per stream.
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

WEIR = sys.argv[1] if len(sys.argv) > 1 else "target/dist/weir"
STREAMS = int(sys.argv[2]) if len(sys.argv) > 2 else 200
EVENT = b"data: " + json.dumps({"choices": [{"delta": {"content": "x" * 4000}}]}).encode() + b"\n\n"
CHUNK = b"%x\r\n%s\r\n" % (len(EVENT), EVENT)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend(listener):
    """Answers every request with an endless SSE stream, written as fast as
    the connection takes it (so weir's back-pressure is what slows it)."""

    def serve(conn):
        try:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            while True:
                conn.sendall(CHUNK)
        except OSError:
            conn.close()

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS"))


def settle(pid):
    """RSS once it has stopped changing for a second (at most 20 s)."""
    last, stable = rss_kb(pid), 0
    for _ in range(200):
        time.sleep(0.1)
        now = rss_kb(pid)
        stable = stable + 1 if now == last else 0
        last = now
        if stable >= 10:
            break
    return last


def open_streams(port, n):
    body = json.dumps({"model": "m", "stream": True, "messages": []}).encode()
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
        s.connect(("127.0.0.1", port))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        # The stream must be flowing (a 200) before its client stops reading.
        status = s.recv(12)
        if status != b"HTTP/1.1 200":
            sys.exit(f"a stream was answered {status!r}, not 200: no figure")
        socks.append(s)
    return socks


def main():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    threading.Thread(target=backend, args=(listener,), daemon=True).start()
    port = free_port()
    up = listener.getsockname()[1]
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(f'[server]\nlisten = "127.0.0.1:{port}"\n\n[health]\nenabled = false\n\n'
                f'[[models]]\nname = "m"\nmax_concurrent = 100000\n\n'
                f'[[backends]]\nname = "flood"\nurl = "http://127.0.0.1:{up}/v1"\nmodels = ["m"]\n')
        config = f.name
    weir = subprocess.Popen([WEIR, "--config", config], env={**os.environ, "RUST_LOG": "warn"})
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            sys.exit(f"weir did not listen on 127.0.0.1:{port}")
        base = settle(weir.pid)
        stalled = open_streams(port, STREAMS)
        held = settle(weir.pid)
        for s in stalled:
            s.close()
        print(f"weir RSS idle {base} kB; {STREAMS} streams not read: {held} kB, "
              f"{(held - base) / STREAMS:.1f} kB per stream")
    finally:
        weir.terminate()
        weir.wait()
        os.unlink(config)


if __name__ == "__main__":
    main()
