"""Each control-plane process's own view of the workers it talks to, kept apart from calls and
from web threads: one small thread per worker pings it on a connection of its own every few
hundred milliseconds; a worker that stops answering (frozen, or a host gone without a word) is
`suspect`, one whose connection closes or cannot be made is `lost`. Either way it is out of
this process's routing at once, and marked so in the database for everyone (which raises the
routing hint: every process on the host looks its routes up again). Calls feed the same view
(a call frame a worker leaves unacknowledged makes it suspect), and the view counts the calls
this process has in flight on each worker, up to a cap.

A worker leaves `suspect`/`lost` in the database through its own heartbeat (it says `up`);
this process routes to it again once it answers the pings here."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from ...common.protocol import Frame

log = logging.getLogger("dockyard.liveness")

# A ping this often on each worker's liveness connection...
PING_INTERVAL_S = 0.2
# ...and a worker that has answered none of them for this long is suspect.
PING_MISSED_S = 0.5
# A lost or suspect worker is dialled again this often (it may come back).
REDIAL_S = 0.5
# A worker that left a call frame unacknowledged stays suspect this long, pings or not.
SUSPECT_HOLD_S = 2.0
# The workers to watch are read from the database this often.
WATCH_REFRESH_S = 1.0
# Calls in flight on one worker from one process (the environment's
# DOCKYARD_WORKER_CALLS_IN_FLIGHT, read by every process that calls workers).
try:
    DEFAULT_CALLS_IN_FLIGHT = max(1, int(os.environ.get("DOCKYARD_WORKER_CALLS_IN_FLIGHT",
                                                        "16")))
except ValueError:
    DEFAULT_CALLS_IN_FLIGHT = 16
# How long a call waits for a place under the cap before it is answered 503.
CAP_WAIT_S = 1.0

UP = "up"
SUSPECT = "suspect"
LOST = "lost"


class WorkerView:
    """What this process knows of one worker: its state here and its calls in flight."""

    def __init__(self, worker_id: str, address: str):
        self.worker_id = worker_id
        self.address = address
        self.state = UP
        self.since = time.monotonic()
        self.in_flight = 0
        self.db_state: str | None = None     # as the database said when last read
        self.hold_until = 0.0                # suspect at least until then, pings or not
        self.thread: threading.Thread | None = None
        self.stopped = False

    @property
    def usable(self) -> bool:
        return self.state == UP


class Liveness:
    def __init__(self, connections, cap: int = DEFAULT_CALLS_IN_FLIGHT):
        self.connections = connections
        self.cap = max(1, int(cap))
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        # A forked process starts with no threads and no views: it watches for itself.
        self.views: dict[str, WorkerView] = {}
        self.lock = threading.Lock()
        self.room = threading.Condition(self.lock)
        self.db_target: str | None = None
        self.watcher: threading.Thread | None = None

    # -- from the call path ---------------------------------------------------------------

    def start(self, db_target: str) -> None:
        """Watch the workers of the database at `db_target` (once per process; cheap after)."""
        if self.watcher is not None:
            return
        with self.lock:
            if self.watcher is not None:
                return
            self.db_target = db_target
            self.watcher = threading.Thread(target=self._watch, name="liveness-watch",
                                            daemon=True)
            self.watcher.start()

    def view(self, worker_id: str, address: str) -> WorkerView:
        """The view of a worker, pinged from now on."""
        view = self.views.get(worker_id)
        if view is not None and view.address == address:
            return view
        with self.lock:
            view = self.views.get(worker_id)
            if view is None or view.address != address:
                if view is not None:
                    view.stopped = True
                view = self.views[worker_id] = WorkerView(worker_id, address)
                self._ping_in_background(view)
        return view

    def view_at(self, address: str) -> WorkerView | None:
        """The view of the worker at `address`, if this process watches it."""
        for view in list(self.views.values()):
            if view.address == address:
                return view
        return None

    def usable(self, worker: dict) -> bool:
        view = self.views.get(worker["id"])
        return view is None or view.usable

    def has_room(self, worker: dict) -> bool:
        view = self.views.get(worker["id"])
        return view is None or view.in_flight < self.cap

    def acquire(self, view: WorkerView) -> bool:
        """A place for one call under the cap; False if none came within CAP_WAIT_S."""
        end = time.monotonic() + CAP_WAIT_S
        with self.room:
            while view.in_flight >= self.cap:
                left = end - time.monotonic()
                if left <= 0 or not view.usable:
                    return False
                self.room.wait(left)
            view.in_flight += 1
            return True

    def release(self, view: WorkerView) -> None:
        with self.room:
            view.in_flight -= 1
            self.room.notify()

    def unacknowledged(self, view: WorkerView) -> None:
        """A call frame the worker did not take in time: suspect, as a missed ping is, and for
        at least SUSPECT_HOLD_S even if it answers pings (its calls are stuck, not it)."""
        view.hold_until = time.monotonic() + SUSPECT_HOLD_S
        self._change(view, SUSPECT, "a call frame was not acknowledged in time")

    def closed(self, view: WorkerView, why: str) -> None:
        self._change(view, LOST, why)

    # -- state ------------------------------------------------------------------------------

    def _change(self, view: WorkerView, state: str, why: str) -> None:
        with self.room:
            if view.state == state or (state == SUSPECT and view.state == LOST):
                return
            was, view.state, view.since = view.state, state, time.monotonic()
            self.room.notify_all()     # calls waiting for a place look elsewhere
        if state == UP:
            log.info("worker %s at %s answers again", view.worker_id, view.address)
            if was == SUSPECT:
                # A stall that passed (a suspicion, never a closed connection) need not wait
                # for the worker's next heartbeat to be routed to again.
                self._mark(view, UP)
            return
        if self._said_it_stops(view):
            # Its last heartbeat said it stops (a clean stop, which it logs itself): out of
            # routing here, nothing to mark.
            log.debug("worker %s at %s stopped (%s)", view.worker_id, view.address, why)
            return
        log.warning("worker %s at %s is %s: %s", view.worker_id, view.address, state, why)
        if was == UP:
            self._mark(view, state)

    def _said_it_stops(self, view: WorkerView) -> bool:
        """Whether the worker told the control plane it stops (its last heartbeat): it is no
        longer among the workers heard from that have not. A fresh read (the watcher's is up
        to a second old), only when a worker leaves this process's routing."""
        if self.db_target is None:
            return False
        from ..store.db import get_db
        from ..store import workers as worker_store
        try:
            seen = worker_store.recently_seen(get_db(self.db_target))
        except Exception:  # noqa: BLE001 - unknown: it is said as a loss
            return False
        return all(row["id"] != view.worker_id for row in seen)

    def _mark(self, view: WorkerView, state: str) -> None:
        """Out of routing for every process (best effort: the heartbeat's expiry is the
        backstop)."""
        if self.db_target is None:
            return
        from ..store.db import get_db
        from ..store import workers as worker_store
        try:
            if state == UP:
                worker_store.mark_answering(get_db(self.db_target), view.worker_id)
            else:
                worker_store.mark_unreachable(get_db(self.db_target), view.worker_id, state)
            view.db_state = state
        except Exception:  # noqa: BLE001 - the database may be busy; the next refresh retries
            log.exception("could not mark worker %s %s", view.worker_id, state)

    # -- the threads ------------------------------------------------------------------------

    def _ping_in_background(self, view: WorkerView) -> None:
        view.thread = threading.Thread(target=self._ping, args=(view,), daemon=True,
                                       name=f"liveness-{view.worker_id}")
        view.thread.start()

    def _ping(self, view: WorkerView) -> None:
        """Ping one worker until it is no longer watched: a connection of its own, one small
        frame each way, never behind a call."""
        while not view.stopped:
            try:
                self._ping_until_broken(view)
            except Exception:  # noqa: BLE001 - a view nobody updates would be stuck
                log.exception("pinging worker %s failed", view.worker_id)
                time.sleep(REDIAL_S)

    def _ping_until_broken(self, view: WorkerView) -> None:
        from .worker_client import NotAdmitted, WorkerGone
        while not view.stopped:
            try:
                conn = self.connections.dial(view.address, PING_MISSED_S)
            except NotAdmitted:
                # Its gate closed this one connection (anyone can make it do so): no verdict.
                time.sleep(REDIAL_S)
                continue
            except WorkerGone as exc:
                timed_out = isinstance(exc.__cause__, (TimeoutError, socket.timeout))
                self._change(view, SUSPECT if timed_out else LOST, str(exc))
                time.sleep(REDIAL_S)
                continue
            try:
                answered = time.monotonic()
                while not view.stopped:
                    sent = time.monotonic()
                    conn.send({"type": Frame.PING})
                    # Suspect once PING_MISSED_S passed since the last answer (not since this
                    # ping): a worker that froze just after answering is caught as soon.
                    conn.set_recv_timeout(max(0.01, round(answered + PING_MISSED_S - sent, 2)))
                    try:
                        reply = conn.recv()
                    except TimeoutError:
                        self._change(view, SUSPECT, f"no answer to its pings for "
                                                    f"{time.monotonic() - answered:.2f}s")
                        break
                    answered = time.monotonic()
                    if reply is None:
                        self._change(view, LOST, "it closed its connection")
                        break
                    if view.state != UP and answered >= view.hold_until:
                        self._change(view, UP, "")
                    time.sleep(max(0.0, PING_INTERVAL_S - (time.monotonic() - sent)))
            except (OSError, ValueError) as exc:
                self._change(view, LOST, f"its connection failed: {exc}")
            finally:
                conn.close()
            if not view.stopped:
                time.sleep(REDIAL_S if view.state != UP else 0)

    def _watch(self) -> None:
        """Keep a pinger on every worker seen lately, and the database in step with what the
        pings say (a heartbeat that was on its way when a worker froze says `up` again)."""
        from ..store.db import get_db
        from ..store import workers as worker_store
        while True:
            try:
                rows = worker_store.recently_seen(get_db(self.db_target))
                seen = set()
                for row in rows:
                    view = self.view(row["id"], row["address"])
                    seen.add(row["id"])
                    view.db_state = row["state"]
                    if row["state"] == UP and not view.usable and \
                            time.monotonic() - view.since > PING_MISSED_S:
                        self._mark(view, view.state)
                with self.lock:
                    for worker_id in [w for w in self.views if w not in seen]:
                        self.views.pop(worker_id).stopped = True
            except Exception:  # noqa: BLE001 - the watcher must outlive any one failure
                log.exception("liveness watch failed")
            time.sleep(WATCH_REFRESH_S)
