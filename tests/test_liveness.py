"""The control plane's per-process view of a worker (app/liveness.py): the cap on calls in
flight and what a suspect worker does to calls waiting for a place. No threads: the views are
built by hand (the pinger is exercised end to end in test_failover.py)."""

from __future__ import annotations

import threading
import time

from dockyard.app.invoke import liveness
from dockyard.app.invoke.liveness import SUSPECT, UP, Liveness, WorkerView


def _liveness(cap: int) -> tuple[Liveness, WorkerView]:
    watcher = Liveness(connections=None, cap=cap)
    view = WorkerView("wrk_a", "127.0.0.1:1")
    watcher.views[view.worker_id] = view
    return watcher, view


def test_calls_past_the_cap_wait_for_a_place_and_get_one_when_a_call_ends(monkeypatch):
    monkeypatch.setattr(liveness, "CAP_WAIT_S", 5.0)
    watcher, view = _liveness(cap=2)
    assert watcher.acquire(view) and watcher.acquire(view)
    assert not watcher.has_room({"id": "wrk_a"})
    got = []
    waiter = threading.Thread(target=lambda: got.append(watcher.acquire(view)))
    waiter.start()
    time.sleep(0.05)
    assert not got     # still waiting
    watcher.release(view)
    waiter.join(timeout=5)
    assert got == [True] and view.in_flight == 2


def test_a_call_past_the_cap_is_refused_after_the_wait(monkeypatch):
    monkeypatch.setattr(liveness, "CAP_WAIT_S", 0.05)
    watcher, view = _liveness(cap=1)
    assert watcher.acquire(view)
    started = time.monotonic()
    assert not watcher.acquire(view)
    assert time.monotonic() - started < 30 and view.in_flight == 1    # not held for ever


def test_a_worker_turning_suspect_releases_the_calls_waiting_for_a_place(monkeypatch):
    monkeypatch.setattr(liveness, "CAP_WAIT_S", 120.0)
    watcher, view = _liveness(cap=1)
    assert watcher.acquire(view)
    got = []
    waiter = threading.Thread(target=lambda: got.append(watcher.acquire(view)))
    waiter.start()
    time.sleep(0.05)
    watcher._change(view, SUSPECT, "test")     # no database: nothing to mark
    waiter.join(timeout=60)     # released now, not at the end of its two minutes
    assert not waiter.is_alive() and got == [False]
    assert not watcher.usable({"id": "wrk_a"})
    assert watcher.usable({"id": "wrk_unknown"})     # not watched yet: routable


def test_an_unacknowledged_call_makes_a_worker_suspect_for_a_while_whatever_its_pings_say():
    watcher, view = _liveness(cap=4)
    assert view.state == UP
    watcher.unacknowledged(view)
    # The pinger puts it back only once its answers come after this.
    assert view.state == SUSPECT and view.hold_until > time.monotonic() + 1.0


def _stuck_worker(answer_hello: bool = True):
    """A listening socket that answers the hello, then reads nothing more (a frozen worker's
    kernel keeps accepting bytes until its buffers fill)."""
    import socket
    from dockyard.common.frames import FrameSocket
    from dockyard.common.protocol import Frame
    listener = socket.create_server(("127.0.0.1", 0))
    held = []

    def serve():
        sock, _ = listener.accept()
        held.append(sock)
        conn = FrameSocket(sock)
        conn.recv()
        if answer_hello:
            conn.send({"type": Frame.HELLO})
    threading.Thread(target=serve, daemon=True).start()
    host, port = listener.getsockname()
    return f"{host}:{port}", listener, held


def test_a_call_to_a_suspect_worker_that_stops_reading_is_given_back_unrun_in_time():
    from dockyard.app.invoke.worker_client import WorkerConnections, WorkerGone
    address, listener, held = _stuck_worker()
    connections = WorkerConnections("token")
    view = WorkerView("wrk_stuck", address)
    connections.liveness.views[view.worker_id] = view
    # An event far larger than the socket buffers: the send itself must not hold the thread
    # once the worker is suspect (as its pinger finds it a moment later).
    frame = {"type": "invoke", "id": "inv_big", "event": "x" * (32 << 20)}
    threading.Timer(0.2, lambda: connections.liveness._change(view, SUSPECT, "test")).start()
    started = time.monotonic()
    try:
        connections.call(view, frame, start_within=60.0, timeout=60.0, grace=60.0)
    except WorkerGone as exc:
        assert exc.args[1] is False     # never acknowledged: it did not run
    else:
        raise AssertionError("a call to a worker that reads nothing was answered")
    finally:
        listener.close()
        for sock in held:
            sock.close()
    # Let go at the ack wait once suspect, not held for the call's minute to start.
    took = time.monotonic() - started
    assert took < 30, took
    assert view.state == SUSPECT
