"""`python -m bench.webpath [--calls N]`: the CPU the control plane's own code spends on one
warm synchronous call, without the HTTP server around it: a real `dockyard serve` runs the
worker and the function, and this process drives the same WSGI app gunicorn would (routing,
the worker round trip, the record) with one call at a time. Beside it, in the same run, the
bare Flask echo app the benchmark compares against, driven the same way. The figures are CPU
time of this process (its record-writing thread included), so a change to the web side of
the hot path can be judged without the noise of a loaded machine."""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time

from .servers import NOOP, Dockyard, package

BODY = b'{"a": 1}'


def environ(path: str) -> dict:
    return {"REQUEST_METHOD": "POST", "PATH_INFO": path, "QUERY_STRING": "",
            "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": str(len(BODY)),
            "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
            "wsgi.input": io.BytesIO(BODY), "wsgi.url_scheme": "http", "wsgi.errors": sys.stderr,
            "wsgi.multithread": True, "wsgi.multiprocess": True, "wsgi.run_once": False,
            "wsgi.version": (1, 0)}


def measure(app, path: str, calls: int, rounds: int = 5) -> tuple[float, float]:
    """(CPU µs per call, wall µs per call): the median of `rounds` rounds."""
    status = []

    def start_response(line, headers):
        status.append(line)

    for _ in range(200):
        b"".join(app(environ(path), start_response))
    if not status[-1].startswith("200"):
        raise RuntimeError(f"{path} answered {status[-1]}")
    cpu, wall = [], []
    for _ in range(rounds):
        envs = [environ(path) for _ in range(calls)]
        c0, w0 = time.process_time(), time.perf_counter()
        for env in envs:
            b"".join(app(env, start_response))
        cpu.append((time.process_time() - c0) / calls * 1e6)
        wall.append((time.perf_counter() - w0) / calls * 1e6)
        time.sleep(0.1)  # let the record writer catch up inside the round's window
    return statistics.median(cpu), statistics.median(wall)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.webpath")
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args()
    from bench.bare_app import app as bare

    from dockyard.app import create_app
    dockyard = Dockyard([])
    try:
        dockyard.deploy(package("webpath", NOOP, '[functions]\nf = "main:f"\n'))
        app = create_app({"DATA_DIR": str(dockyard.data)})
        ours = measure(app.wsgi_app, "/invoke/webpath/f", args.calls)
        base = measure(bare.wsgi_app, "/echo", args.calls)
        print(f"{'one warm call, this process only':<36} {'CPU us':>8} {'wall us':>8}")
        print(f"{'dockyard (route, worker, record)':<36} {ours[0]:8.1f} {ours[1]:8.1f}")
        print(f"{'bare Flask echo':<36} {base[0]:8.1f} {base[1]:8.1f}")
    finally:
        dockyard.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
