"""Running one invocation: pick the version (serving, or pinned), pick a worker that has it
ready, forward the call, and turn the worker's answer into a record and an HTTP status."""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, replace
from functools import lru_cache

from ..store.engine import Database

from ...common.protocol import Frame, Status, VersionState
from ...common.manifest import Manifest
from ...errors import NotFound, Unavailable
from ..store.routing_hint import routing_hint
from ..store import routing
from ..store import workers as worker_store
from .direct_calls import DirectCalls
from .liveness import LOST, Liveness, WorkerView
from .worker_client import WORKER_DIED, NotAdmitted, WorkerConnections, WorkerGone

log = logging.getLogger("dockyard.invoke")

HTTP_STATUS = {Status.SUCCEEDED: 200, Status.FAILED: 500, Status.TIMED_OUT: 504,
               Status.CRASHED: 502, Status.UNAVAILABLE: 503, Status.CANCELLED: 409}
ERROR_STATUS = {"FunctionNotFound": 404}
# A call every instance stayed busy for, through its whole queue time: 429, as the web tier's
# own TooManyRequests (invoke/sync.py), with Retry-After (this many seconds).
BUSY_TYPE = "TooManyRequests"
BUSY_RETRY_AFTER_S = 1
# A pinned call may have to build and start its version first.
ON_DEMAND_GRACE_S = 300.0
ROUTE_ATTEMPTS = 4
# An acknowledged call on a worker that answers its pings is waited for this long past its own
# deadline (its start-by plus its timeout): the worker times it out and answers before then.
RELAY_GRACE_S = 15.0


@dataclass(frozen=True)
class Target:
    container: str
    version_id: int
    version: str
    manifest: Manifest
    pinned: bool
    # The container's traffic split, on its unpinned route: ((version, share), ...) of the
    # versions besides this one that take a share of the calls.
    split: tuple[tuple[str, float], ...] = ()


@lru_cache(maxsize=1024)
def _manifest(version_id: int, text: str) -> Manifest:
    # Versions are immutable, so each process parses a manifest once.
    return Manifest.from_dict(json.loads(text))


# Routes this process has looked up: (database, container, version) -> (routing hint, when,
# route). An entry is used while the hint is unchanged (any deploy, activation, removal or
# change of a worker's state raises it: see routing_hint.py) and for at most ROUTE_MAX_AGE_S,
# so that a worker whose heartbeats stopped drops out as the query would drop it.
_routes: dict[tuple, tuple[int, float, tuple[Target, list[dict]]]] = {}
ROUTE_MAX_AGE_S = 1.0
ROUTES_KEPT = 4096


def route(db: Database, container: str, version: str | None,
          fresh: bool = False) -> tuple[Target, list[dict]]:
    """The serving (or pinned) version of a container and the live workers that have it
    ready: this runs on every call, and a redeploy must be seen at once. One read of the
    routing hint when the route is in memory; `fresh` looks it up again."""
    key = (db.path, container, version)
    # Read before the query: a change committed in between raises the hint past this value,
    # so the next call looks again rather than trusting what this one found.
    hint = routing_hint(db.path).value()
    t = time.monotonic()
    kept = _routes.get(key)
    if kept is not None and not fresh and kept[0] == hint and t - kept[1] < ROUTE_MAX_AGE_S:
        return kept[2]
    found = routing.route(db, container, version)
    if found is None:
        _routes.pop(key, None)
        raise routing.missing(db, container, version)
    (vid, name, manifest), workers = found
    answer = (Target(container, vid, name, _manifest(vid, manifest), version is not None,
                     routing.split(db, container) if version is None else ()), workers)
    if len(_routes) >= ROUTES_KEPT:
        _routes.clear()
    _routes[key] = (hint, t, answer)
    return answer


def _pick_worker(db: Database, target: Target, routable: list[dict],
                 avoid: set[str], liveness: Liveness) -> dict:
    candidates = [w for w in routable if w["id"] not in avoid and liveness.usable(w)]
    if not candidates and target.pinned:
        # Not running anywhere: any live worker starts it on demand.
        candidates = [w for w in worker_store.live_workers(db)
                      if w["id"] not in avoid and liveness.usable(w)]
    if not candidates and any(not liveness.usable(w) for w in routable):
        raise Unavailable(f"every worker that has {target.container}@{target.version} ready "
                          "stopped answering or was tried", retry_after=1)
    if candidates:
        # Under the cap on calls in flight if any is; else the call waits for a place.
        candidates = [w for w in candidates if liveness.has_room(w)] or candidates
    if not candidates:
        if not worker_store.live_workers(db):
            stalled = [w["id"] for w in worker_store.recently_seen(db)
                       if w["state"] in ("suspect", "lost")]
            if stalled:
                raise Unavailable(f"no worker is answering: {', '.join(sorted(stalled))} "
                                  "stopped answering the control plane (see `dockyard "
                                  "workers`)", retry_after=1)
            local = worker_store.local_worker_state(db)
            if local and local.get("state") != "running":
                raise Unavailable(f"no worker is connected: the local worker {local['reason']}",
                                  retry_after=5)
            if local:
                raise Unavailable("no worker is connected yet: the local worker is starting",
                                  retry_after=2)
            raise Unavailable("no worker is connected; start one with `dockyard worker` "
                              "(or `dockyard serve` without --no-local-worker)", retry_after=5)
        raise no_ready_instance(db, target)
    return random.choice(candidates)


def no_ready_instance(db: Database, target: Target) -> Unavailable:
    """The 503 for a version no live worker has ready, saying what the workers report."""
    what = f"{target.container}@{target.version}"
    states = routing.version_states(db, target.version_id)
    failed = [s for s in states if s["state"] == VersionState.FAILED]
    if states and len(failed) == len(states):
        reason = (failed[0]["error"] or "its processes did not start").splitlines()[0]
        return Unavailable(f"{what} failed to deploy: {reason} (see `dockyard deployments "
                           f"{target.container}`)", retry_after=30)
    if states:
        counts: dict[str, int] = {}
        for s in states:
            counts[s["state"]] = counts.get(s["state"], 0) + 1
        doing = ", ".join(f"{state} on {n} worker(s)" for state, n in sorted(counts.items()))
        return Unavailable(f"{what} is not ready yet: {doing}", retry_after=2)
    return Unavailable(f"{what} is not ready yet: no worker has taken it up (it does within a "
                       "heartbeat; see `dockyard status`)", retry_after=2)


def execute(db: Database, connections: WorkerConnections, invocation_id: str,
            container: str, version: str | None, function: str, event, trigger: str,
            queue_wait: float | None = None, direct: DirectCalls | None = None,
            on_start=None, on_handoff=None) -> dict:
    """Run one call to completion and return the worker's outcome as a result dict with
    `status` and everything the invocation record needs. Raises NotFound / Unavailable
    before anything ran. With `direct`, a call to a worker on this host goes straight to a
    free process of the version when it can (see direct_calls.py). `on_start(target,
    worker)` is called once, as the call is first handed to a worker; `on_handoff(target,
    worker)` each time it is handed to one (a worker that turned it away, unstarted, is
    followed by another)."""
    avoid: set[str] = set()
    last_error = None
    liveness = connections.liveness
    liveness.start(db.path)
    drawn: str | None = None
    for attempt in range(ROUTE_ATTEMPTS):
        # A retry follows a worker that was gone or no longer ran the version: look again.
        target, routable = route(db, container, version, fresh=attempt > 0)
        if target.split:
            if attempt == 0:
                drawn = draw(target.split)
            if drawn is not None:
                target, routable = _split_route(db, target, routable, drawn, attempt > 0,
                                                avoid, liveness)
        target.manifest.resolve_function(function)
        try:
            worker = _pick_worker(db, target, routable, avoid, liveness)
        except Unavailable:
            reply = _past_a_stalled_agent(direct, liveness, target, invocation_id, function,
                                          event, queue_wait, avoid)
            if reply is None:
                raise
            return reply
        view = liveness.view(worker["id"], worker["address"])
        if not liveness.acquire(view):
            last_error = (f"worker {worker['id']} has {liveness.cap} calls in flight from "
                          "this process, or stopped answering")
            avoid.add(worker["id"])
            continue
        if on_start is not None:
            on_start(target, worker)
            on_start = None
        if on_handoff is not None:
            on_handoff(target, worker)
        try:
            reply = _run_on(connections, direct, view, target, invocation_id, function, event,
                            trigger, queue_wait)
        except WorkerGone as exc:
            started = len(exc.args) > 1 and exc.args[1]
            log.warning("%s worker %s: %s", invocation_id, worker["id"], exc)
            if started:
                error = exc.args[2] if len(exc.args) > 2 else WORKER_DIED
                return {"status": Status.CRASHED, "version": target.version,
                        "worker_id": worker["id"], "error": dict(error)}
            last_error = str(exc)
            if isinstance(exc, NotAdmitted):
                # It is there and closed this one connection at accept: never marked
                # lost for it (anyone can make a worker close connections); this call
                # tries again, and is answered 503 if it never gets in.
                time.sleep(0.05 * (attempt + 1))
                continue
            # It never started there: another worker takes it. Its liveness view has it
            # suspect or lost already (and so does the database, for everyone).
            if view.usable:
                liveness.unacknowledged(view)
            avoid.add(worker["id"])
            continue
        finally:
            liveness.release(view)
        status = reply.get("status")
        if status == Status.NOT_STARTED:
            # It reached the worker too late to be taken (a stall): it ran nothing there.
            last_error = "the worker took the call too late and ran nothing"
            avoid.add(worker["id"])
            continue
        if status == Status.NOT_RUNNING:
            # The version was swapped out between routing and arrival: route again.
            last_error = reply.get("error", {}).get("message")
            time.sleep(0.02 * (attempt + 1))
            continue
        return _finish(reply, target, worker["id"], queue_wait)
    raise Unavailable(f"no worker could take the call to '{container}': {last_error}",
                      retry_after=1)


def draw(split: tuple[tuple[str, float], ...], pick=random.random) -> str | None:
    """The version of a traffic split one call goes to (None: the serving version)."""
    point, upto = pick(), 0.0
    for version, share in split:
        upto += share
        if point < upto:
            return version
    return None


def _split_route(db: Database, serving: Target, routable: list[dict], version: str,
                 fresh: bool, avoid: set[str], liveness: Liveness
                 ) -> tuple[Target, list[dict]]:
    """The route of the split's version a call drew, as the container's own route (its
    calls queue and wait as unpinned calls do). While no worker has that version ready (it
    is still being built or started, or it failed) the serving version takes the call."""
    try:
        target, workers = route(db, serving.container, version, fresh=fresh)
    except NotFound:    # gone meanwhile (the container's route changes at once): serving runs it
        return serving, routable
    if not any(w["id"] not in avoid and liveness.usable(w) for w in workers):
        return serving, routable
    return replace(target, pinned=False), workers


def _past_a_stalled_agent(direct: DirectCalls | None, liveness: Liveness, target: Target,
                          invocation_id: str, function: str, event, queue_wait: float | None,
                          avoid: set[str]) -> dict | None:
    """With no worker to route to, a call still goes straight to a process of the version
    this thread holds channels to, on a worker that is only suspect (its agent stalled: it
    left routing, yet its processes answer); never to one whose connection closed (lost).
    Its reply, or None if it could not go so (no such channels, or not sent)."""
    if direct is None:
        return None
    for address in direct.held(target.version_id):
        view = liveness.view_at(address)
        if view is None or view.state == LOST or view.worker_id in avoid:
            continue
        if not liveness.acquire(view):
            continue
        try:
            reply = direct.call(address, target.version_id, invocation_id, function, event,
                                float(target.manifest.limits.timeout_s),
                                queue_time(target, queue_wait))
        finally:
            liveness.release(view)
        if reply is None:
            continue
        log.info("%s went straight to a process on worker %s, which is %s", invocation_id,
                 view.worker_id, view.state)
        return _finish(reply, target, view.worker_id, queue_wait)
    return None


def _finish(reply: dict, target: Target, worker_id: str, queue_wait: float | None) -> dict:
    """A worker's (or process's) reply as the call's result."""
    status = reply.get("status")
    if status == Status.CRASHED and isinstance(reply.get("error"), dict):
        # The process died with the call in hand: it may have run (part of) it.
        reply["error"].setdefault("may_have_run", True)
    if status == Status.UNAVAILABLE and (reply.get("error") or {}).get("busy"):
        reply["error"] = busy_error(target, queue_time(target, queue_wait))
    reply["version"] = target.version
    reply["worker_id"] = worker_id
    return reply


def queue_time(target: Target, queue_wait: float | None) -> float:
    """How long a call waits for a free instance: `queue_wait` (the dispatcher's, shorter:
    a queued call goes back to its queue), at most the container's queue_timeout_s."""
    limit = float(target.manifest.limits.queue_timeout_s)
    return limit if queue_wait is None else min(max(0.0, queue_wait), limit)


def busy_error(target: Target, waited: float) -> dict:
    """The 429's error for a call every instance stayed busy for, through its queue time."""
    return {"type": BUSY_TYPE,
            "message": f"every instance of {target.container}@{target.version} stayed busy "
                       f"for {waited:g}s, the call's queue time; retry after "
                       f"{BUSY_RETRY_AFTER_S}s, or raise `instances` or `queue_timeout_s` "
                       "under [limits] in dockyard.toml"}


def _run_on(connections: WorkerConnections, direct: DirectCalls | None, view: WorkerView,
            target: Target, invocation_id: str, function: str, event, trigger: str,
            queue_wait: float | None) -> dict:
    """One attempt of a call on one worker: straight to a process on this host when it can,
    else relayed through the worker, fenced (see WorkerConnections.call). WorkerGone as
    `call` raises it."""
    timeout = float(target.manifest.limits.timeout_s)
    wait = queue_time(target, queue_wait)
    if direct is not None:
        reply = direct.call(view.address, target.version_id, invocation_id, function, event,
                            timeout, wait)
        if reply is not None:
            return reply
    # Relayed through the worker (which queues, and starts processes on demand).
    frame = {"type": Frame.INVOKE, "id": invocation_id, "version_id": target.version_id,
             "container": target.container, "version": target.version,
             "function": function, "event": event, "timeout": timeout, "trigger": trigger,
             "pinned": target.pinned, "queue_wait": wait}
    # It must start by then: after its wait for a free instance (or its on-demand start).
    start_within = ON_DEMAND_GRACE_S if target.pinned else wait
    return connections.call(view, frame, start_within, timeout, RELAY_GRACE_S)


def http_status(result: dict) -> int:
    error = result.get("error") or {}
    if result["status"] == Status.UNAVAILABLE and error.get("type") == BUSY_TYPE:
        return 429
    return ERROR_STATUS.get(error.get("type"), HTTP_STATUS.get(result["status"], 500))
