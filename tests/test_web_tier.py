"""The shared web tier: replies are strict JSON and pass through a web process as bytes, and one
container cannot hold the web threads another container's calls need. End to end on real
servers (concurrency 1 goes straight to the function process, concurrency 4 is relayed by the
worker, async goes through the dispatcher), and the pure pieces (the reply frame's layout,
the thread share) on their own."""

from __future__ import annotations

import json
import threading
import time

import psutil
import pytest
import requests

from conftest import Server
from dockyard.app.invoke.sync import TooManyRequests, WebThreads
from dockyard.common.frames import (FrameError, RawJSON, encode_frame, loads, loads_strict,
                                    split_result)

MB = 1 << 20
NOT_STRICT = ("nan", "infinity", "minus_infinity", "surrogate", "surrogate_key")
BIG = (2**70, -2**80)


def record(server: Server, invocation_id: str, timeout: float = 30) -> dict:
    """The finished record of a call (records of synchronous calls land a moment after the
    answer)."""
    end = time.monotonic() + timeout
    while True:
        response = server.api("GET", f"/api/invocations/{invocation_id}")
        if response.status_code == 200 and response.json()["status"] not in ("queued",
                                                                               "running"):
            return response.json()
        assert time.monotonic() < end, (invocation_id, response.status_code, response.text)
        time.sleep(0.05)


def deploy(server: Server, pkg, name: str, concurrency: int = 1, extra: str = "") -> None:
    server.deploy(pkg("webtier", name=name,
                      manifest_extra=f"[limits]\nconcurrency = {concurrency}\n{extra}"))


# -- the pure pieces ------------------------------------------------------------------------

def test_a_reply_frame_keeps_its_result_raw_for_whoever_asks():
    frame = encode_frame({"type": "result", "id": "c1", "ok": True,
                          "result": {"n": [1, 2**70], "s": "é"}})
    body = frame[4:]
    # One JSON object for a reader that parses it whole …
    whole = loads(body)
    assert whole["result"] == {"n": [1, 2**70], "s": "é"} and whole["id"] == "c1"
    # … and the result as sent for one that keeps it raw, passed on unchanged.
    kept = split_result(body)
    assert isinstance(kept["result"], RawJSON) and kept["ok"] is True
    assert kept["result"].data == '{"n":[1,1180591620717411303424],"s":"é"}'.encode()
    assert encode_frame(kept) == frame
    assert split_result(encode_frame({"result": None})[4:])["result"].data == b"null"
    for lie in (b'{"result_bytes":5,"result":1}', b'{"result_bytes":99,"a":1,"result":1}',
                b'{"result_bytes":1x,"result":1}', b'{"result_bytes":1"a":2,"result":1}',
                b'{"result_bytes":1,"a":1,"result":11'):
        with pytest.raises(FrameError):
            split_result(lie)


def test_integers_beyond_64_bits_are_read_exact():
    assert loads(b"[1180591620717411303424,-1208925819614629174706176]") == list(BIG)
    assert loads('{"a":18446744073709551616}') == {"a": 2**64}
    assert loads(b'{"a":1.5,"b":"x"}') == {"a": 1.5, "b": "x"}


@pytest.mark.parametrize("text", [b"NaN", b"[1, Infinity]", b'{"a": -Infinity}',
                                  b'"\\ud800"', b'{"k": "x\\udc00"}',
                                  b'[18446744073709551616, NaN]',
                                  b'[18446744073709551616, "\\ud800"]'])
def test_an_event_must_be_strict_json(text):
    with pytest.raises(ValueError):
        loads_strict(text)


def test_json_nested_too_deeply_is_a_bad_document_whatever_reads_it():
    # A run of 19 digits sends the text to the standard library, which recursed past
    # Python's limit (a 500) where orjson refuses at 1024 levels.
    deep = b"[" * 100_000 + b"1234567890123456789" + b"]" * 100_000
    for read in (loads, loads_strict):
        with pytest.raises(ValueError):
            read(deep)


def test_a_strict_event_keeps_big_integers_and_pairs_of_surrogates():
    assert loads_strict(b'[18446744073709551616, "\\ud83d\\ude00"]') == [2**64, "\U0001F600"]
    assert loads_strict('{"a": 1.5}') == {"a": 1.5}


@pytest.mark.parametrize("body", ["NaN", '{"x": Infinity}', '"\\ud800"',
                                  '[18446744073709551616, NaN]'])
def test_a_call_with_an_event_that_is_not_strict_json_is_a_400(server, pkg, body):
    deploy(server, pkg, "wt-strict-in", 1)
    for params in ({}, {"async": "1"}):
        response = requests.post(f"{server.url}/invoke/wt-strict-in/echo", data=body,
                                 params=params, timeout=60)
        assert response.status_code == 400, response.text
        assert "not valid JSON" in response.json()["error"]["message"]


def test_the_bootstrap_caps_replies_as_the_worker_does():
    from dockyard.runner import process
    from dockyard.sandbox import bootstrap
    assert bootstrap.REPLY_MAX_BYTES == process.REPLY_MAX_BYTES
    assert bootstrap.RESULT_MAX_BYTES < bootstrap.REPLY_MAX_BYTES
    # The bootstrap's layout is the one common/frames.py cuts.
    frame = bootstrap.encode_frame({"type": "result", "id": "x"}, b"[1]")
    assert split_result(frame[4:])["result"].data == b"[1]"


def test_a_container_takes_free_threads_but_never_the_reserve():
    threads = WebThreads(threads=12, reserve=4)
    for _ in range(8):
        threads.take("hog")
    with pytest.raises(TooManyRequests) as refused:
        threads.take("hog")
    assert refused.value.status == 429 and refused.value.retry_after >= 1
    # The reserve: one thread for each other container with nothing in flight …
    for other in ("a", "b", "c"):
        threads.take(other)
    with pytest.raises(TooManyRequests):
        threads.take("a")
    # … but never the very last thread.
    with pytest.raises(TooManyRequests):
        threads.take("d")
    threads.give_back("a")
    threads.take("d")
    # Once the hog lets go, anyone takes the free threads again.
    for _ in range(8):
        threads.give_back("hog")
    for _ in range(4):
        threads.take("a")
    assert threads.total == 7 and threads.held["a"] == 4
    unbounded = WebThreads(threads=8, reserve=0)
    for _ in range(8):
        unbounded.take("hog")


# -- strict JSON, whatever the path ---------------------------------------------------------

@pytest.mark.parametrize("concurrency", [1, 4], ids=["direct", "relayed"])
def test_a_result_that_is_not_strict_json_is_an_error_with_its_record(server, pkg, concurrency):
    name = f"wt-strict{concurrency}"
    deploy(server, pkg, name, concurrency)
    for function in NOT_STRICT:
        response = server.invoke(f"{name}/{function}")
        assert response.status_code == 500, (function, response.text)
        body = response.json()
        assert body["error"]["type"] == "ResultNotSerializable", body
        assert "not JSON-serialisable" in body["error"]["message"]
        if function.startswith("surrogate"):
            assert "lone surrogate" in body["error"]["message"]
        else:
            assert "Out of range float" in body["error"]["message"]
        invocation_id = response.headers["X-Dockyard-Invocation-Id"]
        assert body["invocation_id"] == invocation_id
        stored = record(server, invocation_id)
        assert stored["status"] == "failed" and stored["output"] is None
        assert stored["error"]["type"] == "ResultNotSerializable"
    # The process keeps serving.
    assert server.invoke(f"{name}/echo", {"still": "here"}).json() == {"still": "here"}


def test_an_async_result_that_is_not_strict_json_fails_its_record(server, pkg):
    deploy(server, pkg, "wt-strict-async", 4)
    for function in NOT_STRICT:
        response = server.invoke(f"wt-strict-async/{function}?async=1")
        assert response.status_code == 202, response.text
        stored = server.wait_invocation(response.json()["invocation_id"])
        assert stored["status"] == "failed", (function, stored)
        assert stored["error"]["type"] == "ResultNotSerializable" and stored["output"] is None


@pytest.mark.parametrize("concurrency", [1, 4], ids=["direct", "relayed"])
def test_integers_beyond_64_bits_round_trip_exactly(server, pkg, concurrency):
    name = f"wt-bigint{concurrency}"
    deploy(server, pkg, name, concurrency)
    for value in BIG:
        response = server.invoke(f"{name}/echo", value)
        assert response.status_code == 200, response.text
        assert response.content == str(value).encode()
        stored = record(server, response.headers["X-Dockyard-Invocation-Id"])
        assert stored["input"] == value and stored["output"] == value
    made = server.invoke(f"{name}/big_ints")
    expected = {"up": 2**70, "down": -2**80, "edge": [2**63 - 1, 2**64, -2**63 - 1]}
    assert made.status_code == 200 and json.loads(made.content) == expected
    assert record(server, made.headers["X-Dockyard-Invocation-Id"])["output"] == expected
    queued = server.invoke(f"{name}/echo?async=1", {"n": 2**70})
    stored = server.wait_invocation(queued.json()["invocation_id"])
    assert stored["status"] == "succeeded" and stored["output"] == {"n": 2**70}


@pytest.mark.parametrize("concurrency", [1, 4], ids=["direct", "relayed"])
def test_a_result_over_the_reply_cap_is_a_clear_error(server, pkg, concurrency):
    name = f"wt-cap{concurrency}"
    deploy(server, pkg, name, concurrency)
    response = server.invoke(f"{name}/huge", {"n": 6_000_000})    # 18 MB of JSON
    assert response.status_code == 500, response.text[:300]
    error = response.json()["error"]
    assert error["type"] == "ResultTooLarge" and "MB" in error["message"], error
    stored = record(server, response.headers["X-Dockyard-Invocation-Id"])
    assert stored["status"] == "failed" and stored["error"]["type"] == "ResultTooLarge"
    assert server.invoke(f"{name}/echo", 1).json() == 1


# -- the shared web tier, on a server with one web process ----------------------------------

@pytest.fixture(scope="module")
def web(private_tmp, wheelhouse):
    """A server with one web process (so that the test knows which process served a call)
    and the default reserve said out loud."""
    data = private_tmp / "webtier" / "data"
    data.parent.mkdir()
    srv = Server(data, ["--find-links", str(wheelhouse), "--offline", "--web-workers", "1",
                        "--web-reserve", "4"])
    yield srv
    code = srv.stop()
    assert code == 0, srv.log_path.read_text()[-3000:]
    assert not srv.leftovers, srv.leftovers


def web_process(server: Server) -> psutil.Process:
    """The gunicorn worker process (a gunicorn process whose parent is gunicorn)."""
    found = [p for p in server.descendants() if "gunicorn" in " ".join(p.cmdline())
             and "gunicorn" in " ".join(p.parent().cmdline())]
    assert len(found) == 1, found
    return found[0]


class PeakRss:
    """The highest RSS a process reaches while this runs (sampled every few milliseconds)."""

    def __init__(self, process: psutil.Process):
        self.process = process
        self.peak = process.memory_info().rss
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample)

    def _sample(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.003)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


@pytest.mark.parametrize("concurrency", [1, 4], ids=["direct", "relayed"])
def test_a_15_mb_reply_passes_through_the_web_process_as_bytes(web, pkg, concurrency):
    big, fast = f"wt-big{concurrency}", f"wt-fast{concurrency}"
    deploy(web, pkg, big, concurrency, "memory_mb = 1024\n")
    deploy(web, pkg, fast)
    count = 4_900_000
    expected = b"[" + b",".join([b"{}"] * count) + b"]"
    # Warm: the web process has imported and connected all it needs before it is measured.
    assert web.invoke(f"{big}/huge", {"n": 3}).content == b"[{},{},{}]"
    assert web.invoke(f"{fast}/echo", 0).status_code == 200
    process = web_process(web)
    before = process.memory_info().rss
    answers = []
    with PeakRss(process) as rss:
        reply = threading.Thread(target=lambda: answers.append(
            web.invoke(f"{big}/huge", {"n": count})))
        reply.start()
        # Beside it, another container's calls are answered, and right.
        n = 0
        while reply.is_alive():
            response = web.invoke(f"{fast}/echo", {"n": n})
            assert response.status_code == 200 and response.json() == {"n": n}
            n += 1
        reply.join()
    response = answers[0]
    assert response.status_code == 200, response.text[:300]
    assert len(response.content) == len(expected) and response.content == expected
    growth = (rss.peak - before) / MB
    assert growth < 120, f"the web process grew by {growth:.0f} MB for a 15 MB reply"
    stored = record(web, response.headers["X-Dockyard-Invocation-Id"])
    assert stored["status"] == "succeeded" and str(stored["output"]).startswith("[{},{},")


def test_slow_calls_to_one_container_leave_threads_for_another(web, pkg):
    """16 slow calls to one container on a web process of 8 + 4 threads: 8 are taken, the
    other 8 get a 429 at once, and another container's call is answered while the slow ones
    still run."""
    deploy(web, pkg, "wt-slow", 16, "timeout_s = 60\n")
    deploy(web, pkg, "wt-quick")
    assert web.invoke("wt-quick/echo", 0).status_code == 200
    assert web.invoke("wt-slow/echo", 0).status_code == 200
    answers: list[tuple[float, requests.Response]] = []
    lock = threading.Lock()

    def slow() -> None:
        response = requests.post(f"{web.url}/invoke/wt-slow/sleep", json={"s": 6}, timeout=120)
        with lock:
            answers.append((time.monotonic(), response))

    callers = [threading.Thread(target=slow) for _ in range(16)]
    for caller in callers:
        caller.start()
    try:
        end = time.monotonic() + 60
        while True:
            with lock:
                refused = [(at, r) for at, r in answers if r.status_code == 429]
            if len(refused) >= 8:
                break
            assert time.monotonic() < end, [r.status_code for _, r in answers]
            time.sleep(0.02)
        quick = web.invoke("wt-quick/echo", {"quick": True})
        quick_at = time.monotonic()
        assert quick.status_code == 200 and quick.json() == {"quick": True}
    finally:
        for caller in callers:
            caller.join()
    done = [at for at, r in answers if r.status_code == 200]
    assert len(done) == 8 and len(refused) == 8, [r.status_code for _, r in answers]
    # Answered at once: every 429, and the other container's call, before any slow call ended.
    assert max(at for at, _ in refused) < min(done)
    assert quick_at < min(done)
    for _, response in refused:
        assert response.headers["Retry-After"] == "1"
        assert "X-Dockyard-Invocation-Id" not in response.headers
        assert response.json()["error"]["type"] == "TooManyRequests"
        assert "wt-slow" in response.json()["error"]["message"]
    assert all(r.json() == "slept" for _, r in answers if r.status_code == 200)
