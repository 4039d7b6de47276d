"""The low-noise client for the tail at concurrency 1: one blocking keep-alive socket, no event loop,
pinned to one core (`--cpu`), so what it measures is the server's time rather than the client's own
scheduling. Closed loop (the next request leaves when the answer is in); JSON answers only. Prints JSON
results like loadgen.py, with every latency's percentiles and the raw latencies when asked (`--raw`).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from urllib.parse import urlsplit

import orjson
from loadgen import percentile


def request_bytes(url: str, token: str) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    body = orjson.dumps({"model": "bench", "messages": [{"role": "user", "content": "Say ten words."}]})
    head = [
        f"POST {parts.path} HTTP/1.1",
        f"Host: {parts.netloc}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    if token:
        head.append(f"Authorization: Bearer {token}")
    return parts.hostname or "127.0.0.1", parts.port or 80, ("\r\n".join(head) + "\r\n\r\n").encode() + body


def read_response(sock: socket.socket, buffer: bytearray) -> int:
    """Read one whole response (Content-Length or chunked) off the socket; returns its status."""
    while (end := buffer.find(b"\r\n\r\n")) < 0:
        buffer += sock.recv(65536) or _closed()
    head = bytes(buffer[:end]).lower()
    status = int(head[9:12])
    del buffer[: end + 4]
    if b"content-length:" in head:
        length = int(head.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
        while len(buffer) < length:
            buffer += sock.recv(65536) or _closed()
        del buffer[:length]
    else:  # chunked: the mock upstream's raw ASGI answers name no length
        while (end := buffer.find(b"\r\n0\r\n\r\n")) < 0 and not buffer.startswith(b"0\r\n\r\n"):
            buffer += sock.recv(65536) or _closed()
        del buffer[: (end + 7) if end >= 0 else 5]
    return status


def _closed() -> bytes:
    raise ConnectionError("the server closed the connection")


def run(url: str, token: str, seconds: float, warmup: float = 1.0) -> tuple[list[float], int, int]:
    host, port, payload = request_bytes(url, token)
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffer = bytearray()
    latencies: list[float] = []
    errors = sent = 0
    clock = time.perf_counter
    started = clock()
    measure_from, end = started + warmup, started + warmup + seconds
    while (now := clock()) < end:
        sock.sendall(payload)
        status = read_response(sock, buffer)
        elapsed = clock() - now
        sent += 1
        if now >= measure_from:
            if status == 200:
                latencies.append(elapsed * 1000)
            else:
                errors += 1
    sock.close()
    return latencies, errors, sent


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("--token", default="")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--cpu", type=int, default=-1, help="pin to this core (default: none)")
    p.add_argument("--raw", action="store_true", help="also print every latency, for pooling rounds")
    a = p.parse_args()
    if a.cpu >= 0:
        os.sched_setaffinity(0, {a.cpu})
    latencies, errors, sent = run(a.url, a.token, a.seconds)
    result: dict[str, object] = {
        "requests": len(latencies),
        "sent": sent,  # the warm-up's too: the server's CPU time covers them all
        "errors": errors,
        "rps": round(len(latencies) / a.seconds, 1),
        **{
            f"p{name}_ms": round(percentile(latencies, q), 3) for name, q in (("50", 0.5), ("99", 0.99), ("999", 0.999))
        },
    }
    if a.raw:
        result["latencies_ms"] = [round(x, 4) for x in latencies]
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
