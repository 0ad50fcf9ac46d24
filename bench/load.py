"""Load generation: keep-alive HTTP clients (http.client, one connection each), as processes
so the load generator is not held back by one interpreter's lock. A client that gets a 429
waits its Retry-After and sends the call again, as a well-behaved client does; the 429s are
counted (`throttled`), not measured."""

from __future__ import annotations

import http.client
import multiprocessing
import time
from urllib.parse import urlsplit

BODY = b'{"a": 1}'
# 429s the clients got, by URL, each retried after its Retry-After.
throttled: dict[str, int] = {}


def _retry_after(response) -> float:
    try:
        return max(0.0, float(response.getheader("Retry-After") or 1))
    except ValueError:
        return 1.0


def _connection(url: str) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)


def latencies(url: str, count: int, warmup: int = 200, body: bytes = BODY) -> list[float]:
    """Sequential calls on one keep-alive connection; seconds per call."""
    path = urlsplit(url).path
    conn = _connection(url)
    out = []
    i = 0
    while i < warmup + count:
        started = time.perf_counter()
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        if response.status == 429:
            throttled[url] = throttled.get(url, 0) + 1
            time.sleep(_retry_after(response))
            continue
        if response.status != 200:
            raise RuntimeError(f"{url} answered {response.status}")
        if i >= warmup:
            out.append(time.perf_counter() - started)
        i += 1
    conn.close()
    return out


def _client(url: str, seconds: float, body: bytes, start_at: float, queue) -> None:
    path = urlsplit(url).path
    conn = _connection(url)
    times, failed, refused = [], 0, 0
    while time.time() < start_at:
        time.sleep(0.001)
    end = start_at + seconds
    while True:
        started = time.perf_counter()
        if time.time() >= end:
            break
        try:
            conn.request("POST", path, body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            if response.status == 429:
                refused += 1
                time.sleep(_retry_after(response))
                continue
            ok = response.status == 200
        except (OSError, http.client.HTTPException):
            ok = False
            conn.close()
            conn = _connection(url)
        if not ok:
            failed += 1
        times.append((time.time(), time.perf_counter() - started, ok))
    queue.put((times, failed, refused))


def concurrent(url: str, clients: int, seconds: float, body: bytes = BODY):
    """`clients` processes calling for `seconds`. Returns (list of (wall time, latency, ok),
    failed count)."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    start_at = time.time() + 0.3
    procs = [ctx.Process(target=_client, args=(url, seconds, body, start_at, queue))
             for _ in range(clients)]
    for p in procs:
        p.start()
    samples, failed = [], 0
    for _ in procs:
        times, f, refused = queue.get(timeout=seconds + 300)
        samples += times
        failed += f
        throttled[url] = throttled.get(url, 0) + refused
    for p in procs:
        p.join()
    return samples, failed


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]
