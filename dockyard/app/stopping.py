"""The app as `serve` runs it in its web processes: in front of it, a gate that follows serve's
stop (see serve_state.py). While serve stops, a new call (`POST /invoke/…`, synchronous or
async) is answered 503 `Stopping` at once, with Retry-After, and `GET /healthz` says
`stopping` (api/health.py), so that a load balancer takes this server out; the calls under
way go on. The gate counts the synchronous calls it let through, and while serve stops a
thread writes their number and when the last is due to end into this process's line of the
page, which serve reads to say what it waits for."""

from __future__ import annotations

import itertools
import signal
import threading
import time

from ..errors import Unavailable
from . import create_app
from .invoke.execute import route
from .invoke.sync import PREFIX, error_answer, wants_async
from .serve_state import SERVING, InFlight, ServeState, current
from .store.db import get_db

REPORT_EVERY_S = 0.1
# What a caller refused during the stop is told to wait before trying again.
STOPPING_RETRY_AFTER_S = 5


class Stopping(Unavailable):
    """The server is stopping: nothing ran; retry elsewhere, or later."""

    type = "Stopping"


def served_app():
    """gunicorn's application under serve: the app, behind the gate. Ctrl-C is serve's to
    act on (it reaches the terminal's whole process group): this web process ignores it,
    and stops when serve stops it."""
    app = create_app()
    page = current()
    if page is not None:
        for signum in (signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        app.wsgi_app = StopGate(app.wsgi_app, page, app.extensions["dockyard"]["data"].db_target)
    return app


class StopGate:
    def __init__(self, wsgi_app, page: ServeState, db_target):
        self.inner = wsgi_app
        self.page = page
        self.db_target = db_target
        # The synchronous calls under way here: key -> (their path, started at).
        self.calls: dict[int, tuple[str, float]] = {}
        self.keys = itertools.count()
        self.timeouts: dict[str, float | None] = {}
        threading.Thread(target=self._report, name="stop-report", daemon=True).start()

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if environ.get("REQUEST_METHOD") != "POST" or not path.startswith(PREFIX):
            return self.inner(environ, start_response)
        if wants_async(environ):
            if self.page.state() != SERVING:
                return _refuse(start_response)
            return self.inner(environ, start_response)
        key = next(self.keys)
        # Counted before the state is read: a call the reporter does not count was refused.
        self.calls[key] = (path, time.time())
        try:
            if self.page.state() != SERVING:
                return _refuse(start_response)
            return self.inner(environ, start_response)
        finally:
            del self.calls[key]

    def _report(self) -> None:
        while True:
            state = self.page.state()
            if state != SERVING:
                try:
                    self.page.report(state, self.in_flight())
                except Exception:  # noqa: BLE001 - the next look tries again
                    pass
            time.sleep(REPORT_EVERY_S)

    def in_flight(self) -> InFlight:
        calls = list(self.calls.values())
        deadlines = []
        for path, started in calls:
            timeout = self._timeout(path[len(PREFIX):].partition("/")[0])
            if timeout is not None:
                deadlines.append(started + timeout)
        return InFlight(len(calls), max(deadlines) if deadlines else None)

    def _timeout(self, target: str) -> float | None:
        """The timeout of a call to `target` (CONTAINER[@VERSION] as the path has it)."""
        if target not in self.timeouts:
            # WSGI hands the path over as latin-1; names are UTF-8.
            name = target.encode("latin-1").decode("utf-8", "replace")
            container, _, version = name.partition("@")
            self.timeouts[target] = timeout_s(self.db_target, container, version or None)
        return self.timeouts[target]


def timeout_s(db_target, container: str, version: str | None) -> float | None:
    """The timeout of a call to `container` (@`version`), if it is known."""
    try:
        return float(route(get_db(db_target), container, version)[0].manifest.limits.timeout_s)
    except Exception:  # noqa: BLE001 - removed meanwhile, or never there: no deadline known
        return None


def _refuse(start_response):
    status, headers, body = error_answer(Stopping(
        "dockyard is stopping: this server takes no new calls; send the call to another "
        "server, or again once this one has started", retry_after=STOPPING_RETRY_AFTER_S))
    headers.append(("Content-Length", str(len(body))))
    start_response(status, headers)
    return [body]
