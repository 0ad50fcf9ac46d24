"""The worker agent: registers with the control plane, heartbeats, reconciles the desired set
of versions, serves calls on its invoke endpoint, and on SIGTERM (or Ctrl-C) drains and stops
everything; a second one (or SIGUSR1, serve's way of asking) stops the calls under way at
once. One main loop does all of it; signal handlers only enqueue and wake the loop
(gunicorn's arbiter does the same)."""

from __future__ import annotations

import logging
import os
import secrets
import select
import shutil
import signal
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import requests

from ..common.protocol import Frame, Role, Status
from ..sandbox.isolation import Isolation
from .diff import diff_versions, identity
from .failures import FailureMemory
from .pool import find_child, live_pools
from .process import crashed
from .server import InvokeServer
from .servers import ControlPlanes, Unreachable
from .spares import spares
from .tree import kill_strays
from .states import VersionState
from .venvs import Builder, UvOptions
from .versions import VersionRuntime, child_spec_factory

log = logging.getLogger("dockyard.worker")

CANCEL_MEMORY_S = 600.0
WATCH_S = 0.025
BOOTSTRAP = Path(__file__).resolve().parent.parent / "sandbox" / "bootstrap.py"
# A registration a control plane may have handled before it went away may have left a row
# under this worker's name, live for the worker TTL (15 s): until then a 409 from the next
# one may be that row, and registering is tried again (it then takes the row over).
REGISTER_LANDED_S = 20.0
# Stopping the calls at once: each process is stopped within HALT_GRACE_S (killed if it has
# not exited), and a call it had in hand is answered cancelled with the reason, which is
# DOCKYARD_STOP_REASON (serve gives its worker "server stopped") or "worker stopped". The
# web threads whose direct call ended ask what became of it: they are answered until none
# has asked for HALT_QUIET_S (at most HALT_LINGER_S).
HALT_GRACE_S = 0.3
HALT_QUIET_S = 0.3
HALT_LINGER_S = 2.0
STOP_REASON_ENV = "DOCKYARD_STOP_REASON"


@dataclass
class WorkerConfig:
    servers: Sequence[str]      # control plane URLs, in the order they are tried
    token: str
    worker_dir: Path
    uv: UvOptions
    isolation: Isolation
    listen: tuple[str, int] = ("127.0.0.1", 0)
    advertise: str | None = None
    name: str = field(default_factory=socket.gethostname)


class WorkerRefused(Exception):
    """The control plane refuses this worker's token: retrying cannot help."""


class RegisterPending(requests.RequestException):
    """A 409 that may be this worker's own registration, handled by a control plane that
    went away before it answered: tried again."""


class Agent:
    def __init__(self, config: WorkerConfig):
        self.config = config
        self.worker_id: str | None = None
        self.interval = 2.0
        self.runtimes: dict[int, VersionRuntime] = {}
        self.calls: dict[str, VersionRuntime] = {}     # calls in flight, by id (for cancel)
        self.cancelled: dict[str, float] = {}          # cancelled call ids, until (monotonic)
        self.cancel_lock = threading.Lock()
        # Names this run of the worker to web threads (process numbers start again at 1).
        self.nonce = secrets.token_hex(8)
        self.signals: list[int] = []
        self.stopping = False
        self.halted: str | None = None    # why the calls were stopped at once, once they were
        self.halt_until = 0.0             # how long after that this worker lingers at most
        self.last_lost = 0.0              # when a web thread last asked about a call it lost
        self.ctrl_c = True                # whether Ctrl-C stops this worker (not under serve)
        self.swept = False      # the start's sweep of what removed versions left
        self.wake_read, self.wake_write = os.pipe()
        os.set_blocking(self.wake_read, False)
        os.set_blocking(self.wake_write, False)
        # From here on a stop signal is a clean stop, even one that comes while this worker
        # is still starting (run() acts on it at once).
        self._handle_signals()
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {config.token}"
        # Requests go to one control plane at a time, the next one when it stops answering.
        self.servers = ControlPlanes(config.servers, self.http)
        self.register_landed_until = 0.0
        isolation = config.isolation
        private = isolation.view is not None
        config.worker_dir.mkdir(parents=True, exist_ok=True)
        # Versions whose code failed to load, kept across restarts (see failures.py).
        self.failed_versions = FailureMemory(config.worker_dir / "failed-versions.json")
        os.chmod(config.worker_dir, 0o700 if private else 0o711)
        # The bootstrap must be readable by the children's uid wherever dockyard is installed.
        self.bootstrap = config.worker_dir / ".bootstrap.py"
        shutil.copyfile(BOOTSTRAP, self.bootstrap)
        os.chmod(self.bootstrap, 0o644)
        # Each child mounts its private root here, in its own mount namespace.
        view_root = config.worker_dir / ".view"
        view_root.mkdir(exist_ok=True)
        os.chmod(view_root, 0o700)
        kill_strays(config.worker_dir)
        if private:
            spares.refill()   # the first child then starts from a launcher that is ready
        self.builder = Builder(config.worker_dir, config.uv, self._download,
                               lambda spec: isolation.identity(spec["uid_key"])[1],
                               private=private, isolation=isolation)
        self.make_child_spec = child_spec_factory(isolation, str(self.bootstrap), view_root)
        self.server = InvokeServer(config.listen, config.token, self.handle_frame)

    # -- wake-ups and signals -------------------------------------------------------------

    def wake(self) -> None:
        try:
            os.write(self.wake_write, b".")
        except BlockingIOError:
            pass

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        self.signals.append(signum)
        self.wake()

    def _handle_signals(self) -> None:
        """SIGTERM, Ctrl-C and SIGHUP stop the worker, SIGUSR1 stops it with its calls at
        once. A SIGINT or SIGHUP it was started with ignored stays ignored (serve starts its
        worker so: the terminal's Ctrl-C reaches serve's whole process group, and serve acts
        on it), with a handler that does nothing rather than SIG_IGN, so that the processes
        this worker starts get the default again."""
        for signum in (signal.SIGINT, signal.SIGHUP):
            if signal.getsignal(signum) == signal.SIG_IGN:
                signal.signal(signum, _ignored)
                self.ctrl_c = self.ctrl_c and signum != signal.SIGINT
            else:
                signal.signal(signum, self._on_signal)
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, self._on_signal)

    @property
    def halt_asked(self) -> bool:
        """A second stop signal came, or SIGUSR1."""
        signals = list(self.signals)
        return len(signals) > 1 or signal.SIGUSR1 in signals

    def _sleep(self, seconds: float) -> None:
        ready, _, _ = select.select([self.wake_read], [], [], seconds)
        if ready:
            try:
                while os.read(self.wake_read, 4096):
                    pass
            except BlockingIOError:
                pass

    # -- control plane --------------------------------------------------------------------

    def _download(self, sha256: str, dest: Path) -> None:
        # The path names the package, not a host: every control plane serves every package.
        self.servers.download(f"/api/artifacts/{sha256}", dest, timeout=60)

    def register(self) -> None:
        # The id this worker folder had (a restart takes its row over, and keeps its name).
        id_file = self.config.worker_dir / ".worker-id"
        try:
            previous = id_file.read_text().strip()
        except OSError:
            previous = ""
        body = {"name": self.config.name, "hostname": socket.gethostname(), "pid": os.getpid(),
                "address": self.config.advertise or self.server.address,
                "isolation": self.config.isolation.summary(),
                "previous_id": self.worker_id or previous}
        response = self.servers.request("POST", "/api/workers/register", json=body,
                                        timeout=10)
        if any(f.may_have_arrived for f in response.failures):
            self.register_landed_until = time.monotonic() + REGISTER_LANDED_S
        if response.status_code in (401, 403):
            raise WorkerRefused(f"the control plane at {response.server} refuses this "
                                "worker's token; give the token in <data>/tokens/worker of "
                                "the control plane (--token-file or DOCKYARD_TOKEN)")
        if response.status_code == 409:
            if time.monotonic() < self.register_landed_until:
                raise RegisterPending(f"{_error_message(response)} (perhaps this worker's own "
                                      "registration, cut off by a failover: trying again)")
            raise WorkerRefused(_error_message(response))
        response.raise_for_status()
        data = response.json()
        self.worker_id = data["id"]
        if data["id"] != previous:
            id_file.write_text(data["id"] + "\n")
        self.interval = float(data.get("heartbeat_interval", self.interval))
        log.info("registered as %s; invoke endpoint %s", self.worker_id, body["address"])

    def heartbeat(self, stopping: bool = False) -> list[dict] | None:
        body = {"versions": [r.report() for r in list(self.runtimes.values())
                             if r.state is not VersionState.STOPPED],
                "stopping": stopping,
                # Calls in this worker's processes now, the direct ones included.
                "in_flight": sum(pool.busy() for pool in live_pools())}
        # The id is the same on every control plane (they share one store).
        response = self.servers.request("POST", f"/api/workers/{self.worker_id}/heartbeat",
                                        json=body, timeout=10)
        if response.status_code == 404:
            log.warning("the control plane forgot this worker; registering again")
            self.register()
            return None
        response.raise_for_status()
        data = response.json()
        self.interval = float(data.get("heartbeat_interval", self.interval))
        return data["desired"]

    # -- reconcile ------------------------------------------------------------------------

    def reconcile(self, desired: list[dict]) -> None:
        held = {vid: r.role for vid, r in self.runtimes.items()}
        deployments = {vid: r.spec.get("deployment") for vid, r in self.runtimes.items()}
        identities = {vid: identity(r.spec) for vid, r in self.runtimes.items()}
        diff = diff_versions(desired, held, deployments, identities)
        for spec in diff.replaced:
            # The id of a version deleted here now names another one: the old one drains and
            # goes, the new one is started like any added version.
            old = self.runtimes.pop(spec["version_id"])
            self._background(self._remove, old)
        for spec in [*diff.replaced, *diff.added]:
            runtime = VersionRuntime(spec, self.builder, self.make_child_spec, self.wake,
                                     self.failed_versions)
            self.runtimes[spec["version_id"]] = runtime
            if spec["role"] == Role.SERVE:
                self._background(runtime.serve)
        for spec in diff.changed:
            runtime = self.runtimes[spec["version_id"]]
            runtime.spec["deployment"] = spec.get("deployment")
            if spec["role"] == Role.SERVE:
                runtime.role = Role.SERVE
                runtime.start_over()   # a new deployment: tried at once, its backoff reset
                self._background(runtime.serve)
            else:
                self._background(runtime.to_standby)
        for version_id in diff.removed:
            runtime = self.runtimes.pop(version_id)
            self.failed_versions.forget(version_id)
            self._background(self._remove, runtime)

    def retry_failed(self) -> None:
        """Serve again each version that failed here and whose backoff is over."""
        now = time.monotonic()
        for runtime in list(self.runtimes.values()):
            if runtime.retry_due(now):
                log.info("%s: trying again after %d failure(s)", runtime.what, runtime.failures)
                self._background(runtime.serve)

    def _remove(self, runtime: VersionRuntime) -> None:
        runtime.stop()
        self.builder.remove(runtime.spec, in_use=lambda folder: any(
            self.builder.folder(r.spec) == folder for r in list(self.runtimes.values())))
        # The container's last version gone: its folder goes, with anything a build left.
        name = runtime.spec["container"]
        self.builder.forget_container(runtime.spec, in_use=lambda: any(
            r.spec["container"] == name for r in list(self.runtimes.values())))
        sha256 = runtime.spec.get("artifact_sha256")
        if sha256:
            self.builder.forget_artifact(sha256, in_use=lambda: any(
                r.spec.get("artifact_sha256") == sha256 for r in list(self.runtimes.values())))

    @staticmethod
    def _background(target, *args) -> None:
        threading.Thread(target=target, args=args, daemon=True).start()

    # -- calls ----------------------------------------------------------------------------

    def handle_frame(self, frame: dict) -> dict | None:
        kind = frame.get("type")
        if kind == Frame.POKE:
            self.wake()
            return None
        if kind == Frame.CANCEL:
            return self.cancel(str(frame.get("id")))
        if kind == Frame.OUTPUT:
            return self.output(str(frame.get("id")), str(frame.get("what") or ""))
        if kind == Frame.CHANNELS:
            return self.channels(frame)
        if kind == Frame.LOST:
            return self.lost(frame)
        if kind != Frame.INVOKE:
            return {"type": Frame.ERROR,
                    "error": {"type": "BadFrame", "message": f"unknown {kind}"}}
        runtime = self.runtimes.get(frame.get("version_id"))
        call_id = frame.get("id")
        if runtime is None or self.stopping:
            reply = {"status": Status.NOT_RUNNING, "error": {
                "type": "NotRunning",
                "message": f"{frame.get('container')}@{frame.get('version')} is not on this "
                           "worker"}}
        else:
            self.calls[call_id] = runtime
            try:
                if call_id in self.cancelled:
                    reply = {}   # cancelled before it got here: not run at all
                else:
                    timeout = float(frame.get("timeout") or runtime.manifest.limits.timeout_s)
                    child_frame = {"type": Frame.INVOKE, "id": call_id, "invocation_id": call_id,
                                   "function": frame["function"], "event": frame.get("event"),
                                   "deadline": time.time() + timeout}
                    queue_wait = _queue_wait(frame, runtime.manifest.limits.queue_timeout_s)
                    if "start_by" in frame:
                        # A fenced call (see runner/fence.py): the process refuses it past
                        # its start-by, and it waits for a free one no longer than that.
                        child_frame["start_by"] = frame["start_by"]
                        if not frame.get("pinned"):
                            queue_wait = min(queue_wait, max(0.0, frame["start_by"] -
                                                             time.monotonic()))
                    reply = runtime.invoke(child_frame, timeout,
                                           pinned=bool(frame.get("pinned")),
                                           queue_wait=queue_wait)
            finally:
                self.calls.pop(call_id, None)
            reply = self._if_stopped(call_id, reply)
        reply["type"] = Frame.RESULT
        reply["id"] = call_id
        return reply

    # -- direct channels (a web process on this host calls a process straight) ------------

    def channels(self, frame: dict) -> dict:
        """The pool page and a new channel to each running one-at-a-time process of a
        version, for one web thread: descriptors passed with the reply (only over a Unix
        socket: the caller is on this host). None while the version does not take calls
        here."""
        runtime = self.runtimes.get(frame.get("version_id"))
        pool = runtime.pool if runtime is not None and not self.stopping else None
        reply = {"type": Frame.CHANNELS, "epoch": 0, "children": []}
        if pool is None or self.server.unix_path is None:
            return reply
        page_fd, epoch, channels = pool.channels()
        close = [item for _, (channel, slot_fd) in channels
                 for item in (channel, _Fd(slot_fd))]
        if page_fd >= 0:
            close.append(_Fd(page_fd))
        if page_fd < 0 or not channels:
            for item in close:
                item.close()
            return reply
        reply["children"] = [{"number": child.number} for child, _ in channels]
        reply["epoch"] = epoch
        reply["agent"] = self.nonce
        reply["_fds"] = [page_fd, *(fd for _, (channel, slot_fd) in channels
                                    for fd in (channel.fileno(), slot_fd))]
        reply["_close"] = close
        return reply

    def lost(self, frame: dict) -> dict:
        """What became of a call a web thread sent down a direct channel and got no proper
        reply to (see Child.lost). The process is looked for in every pool not yet stopped:
        a draining version's too."""
        self.last_lost = time.monotonic()
        call_id = str(frame.get("id"))
        child = None
        if frame.get("agent") == self.nonce:     # not a process of an earlier worker run
            child = find_child(int(frame.get("number") or 0))
        if child is None:
            reply = crashed("the process running the call is gone (the worker restarted, or "
                            "it ended long ago)")
        else:
            reply = child.lost(str(frame.get("why")), call_id,
                               float(frame.get("timeout") or child.timeout_s or 0))
        if reply.get("status") != Status.NOT_RUNNING:
            reply = self._if_stopped(call_id, reply)
        reply["type"] = Frame.RESULT
        reply["id"] = call_id
        return reply

    def cancel(self, call_id: str) -> dict:
        """Stop a call: kill the process running it (or, while it still waits for a free
        process, as soon as one has it). The id is remembered a while, so a call that reaches
        this worker after its cancel is refused."""
        now = time.monotonic()
        with self.cancel_lock:
            self.cancelled[call_id] = now + CANCEL_MEMORY_S
            for stale in [k for k, until in self.cancelled.items() if until < now]:
                del self.cancelled[stale]
        runtime = self.calls.get(call_id)
        if runtime is None:
            # Perhaps a call a web thread sent straight to a process (of any pool not yet
            # stopped: a draining version's too).
            found = any(pool.cancel(call_id) for pool in live_pools())
            return {"type": Frame.CANCEL, "id": call_id, "found": found}
        pool = runtime.pool
        if pool is None or not pool.cancel(call_id):
            self._background(self._cancel_when_started, call_id)
        return {"type": Frame.CANCEL, "id": call_id, "found": True}

    def output(self, call_id: str, what: str) -> dict:
        """What the call `call_id` to `what` (CONTAINER@VERSION, or CONTAINER: any version of
        it, for a call whose record does not say one yet) has printed so far, read from its
        process's output files (the process line-buffers them, and empties them at each
        reply): `found` is False when no process of it here has the call in hand. Only its
        pools are asked: a process of another container could claim any call id in its
        slot, and pass its own output off as that call's."""
        runtime = self.calls.get(call_id)
        pools = [runtime.pool] if runtime is not None and runtime.pool is not None \
            else live_pools()
        pools = [pool for pool in pools if pool is not None and (
            pool.what == what or ("@" not in what and pool.what.startswith(what + "@")))]
        child = next((c for pool in pools if (c := pool.holding(call_id)) is not None), None)
        if child is None:
            return {"type": Frame.OUTPUT, "id": call_id, "found": False}
        stdout, stderr = child.read_output()
        return {"type": Frame.OUTPUT, "id": call_id, "found": True, "stdout": stdout,
                "stderr": stderr}

    def _if_stopped(self, call_id: str, reply: dict) -> dict:
        """The reply of a call that was cancelled, or whose process a halt stopped with the
        call in hand: cancelled, with why."""
        if call_id in self.cancelled:
            return _cancelled(reply)
        if self.halted and reply.get("status") == Status.CRASHED:
            return _cancelled(reply, self.halted)
        return reply

    def _cancel_when_started(self, call_id: str) -> None:
        while call_id in self.calls:
            runtime = self.calls.get(call_id)
            pool = runtime.pool if runtime is not None else None
            if pool is not None and pool.cancel(call_id):
                return
            time.sleep(0.02)

    # -- main loop ------------------------------------------------------------------------

    def _watchdog(self) -> None:
        """Calls that reach a process without passing through here (direct channels) are
        timed from the process's slot: a look every WATCH_S at every pool not yet stopped,
        until this process exits (a shutdown drains too)."""
        while True:
            for pool in live_pools():
                try:
                    pool.watch(self.cancelled)
                except Exception:  # noqa: BLE001 - the watchdog must keep watching
                    log.exception("%s: the watchdog's look failed", pool.what)
            time.sleep(WATCH_S)

    def run(self) -> int:
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
                         daemon=True).start()
        threading.Thread(target=self._watchdog, name="watchdog", daemon=True).start()
        self._connect()
        next_beat = 0.0
        while not self.stopping:
            if self.signals:
                self.stopping = True
                break
            now = time.monotonic()
            try:
                desired = self.heartbeat()
                if desired is not None:
                    if not self.swept:
                        # Once, at start, before any build of this run begins: what this
                        # worker folder's previous run left (versions removed while it was
                        # down, a download cut off). The folder's lock makes it ours alone.
                        self.swept = True
                        swept = self.builder.sweep(desired)
                        if swept:
                            log.info("removed %d folder(s) and file(s) of versions no longer "
                                     "held", swept)
                    self.reconcile(desired)
            except Unreachable:
                pass    # said once, by self.servers, until one answers again
            except requests.RequestException as exc:
                log.warning("control plane %s: %s", self.servers.current, exc)
            except WorkerRefused:
                # Forgotten, and its name taken meanwhile (or its token revoked): what runs
                # here drains and stops before the one-line reason.
                self.shutdown()
                raise
            for runtime in list(self.runtimes.values()):
                runtime.reap_idle()
            self.retry_failed()
            next_beat = now + self.interval
            self._sleep(max(0.0, next_beat - time.monotonic()))
        return self.shutdown()

    def _connect(self) -> None:
        delay = 0.2
        while not self.signals:
            try:
                self.register()
                return
            except requests.RequestException as exc:
                if not isinstance(exc, Unreachable):   # that one is said once, by self.servers
                    log.warning("cannot register with %s yet: %s", self.servers.current, exc)
                self._sleep(delay)
                delay = min(delay * 2, 5.0)

    def shutdown(self) -> int:
        """Tell the control plane to stop routing here, finish in-flight calls (or stop them at
        once: see halt), stop every child tree, exit 0."""
        self.stopping = True
        if self.worker_id:
            try:
                self.heartbeat(stopping=True)
            except requests.RequestException:
                pass
        threads = [threading.Thread(target=r.stop, daemon=True) for r in self.runtimes.values()]
        for t in threads:
            t.start()
        said = None
        while any(t.is_alive() for t in threads):
            if self.halted is None and self.halt_asked:
                self.halt()
            if self.halted is None:
                said = self._say_waiting(said, len(threads))
            elif time.monotonic() > self.halt_until:
                break   # a build may hold its version's stop: it goes with this process
            self._sleep(0.1)
        if self.halted is not None:
            self._linger()
        spares.close()
        self.server.shutdown()
        self.server.close_connections()
        self.server.server_close()
        log.info("stopped")
        return 0

    def _calls_in_flight(self) -> int:
        """The calls relayed here (running or waiting for a process) and those web threads
        sent straight to a process, each counted once."""
        ids = set(self.calls)
        for pool in live_pools():
            for child in list(pool.children):
                busy, _, _, _, call_id = child.direct_state()
                if busy:
                    ids.add(call_id or f"process {child.number}")
        return len(ids)

    def _say_waiting(self, said: int | None, versions: int) -> int:
        """Say what the stop waits for, when that changes."""
        calls = self._calls_in_flight()
        if calls != said:
            if not calls:
                log.info("stopping: %d version(s), no calls in flight", versions)
            else:
                log.info("stopping: waiting for %d call%s%s", calls, "" if calls == 1 else "s",
                         f"; Ctrl-C again to stop {'it' if calls == 1 else 'them'} now"
                         if self.ctrl_c else "")
        return calls

    def halt(self) -> None:
        """Stop every call now: every process is stopped (killed within HALT_GRACE_S, and
        none started in its place), and a call it had in hand is answered cancelled with
        the reason."""
        self.halted = os.environ.get(STOP_REASON_ENV) or "worker stopped"
        self.halt_until = time.monotonic() + HALT_GRACE_S + HALT_LINGER_S
        calls = self._calls_in_flight()
        log.info("stopping %d call%s now (%s)", calls, "" if calls == 1 else "s", self.halted)
        threads = [threading.Thread(target=pool.stop, args=(HALT_GRACE_S,), daemon=True)
                   for pool in live_pools()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.last_lost = time.monotonic()

    def _linger(self) -> None:
        """After a halt: answer the calls relayed here and the web threads asking about the
        direct calls that ended, until they are done (at most HALT_LINGER_S after it)."""
        while time.monotonic() < self.halt_until and (
                self.calls or time.monotonic() - self.last_lost < HALT_QUIET_S):
            time.sleep(0.02)


def _ignored(signum, frame) -> None:  # noqa: ARG001
    """A signal this worker was started with ignored."""


def _error_message(response) -> str:
    """The one line of a control plane's JSON error."""
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"the control plane answered {response.status_code}"


def _cancelled(reply: dict, message: str = "cancelled; its process tree was killed") -> dict:
    return dict(reply, status=Status.CANCELLED, error={"type": "Cancelled", "message": message})


class _Fd:
    """A bare descriptor, closed like a socket once it has been sent."""

    def __init__(self, fd: int):
        self.fd = fd

    def close(self) -> None:
        os.close(self.fd)


def _queue_wait(frame: dict, limit: float) -> float:
    """How long a call may wait for a free instance: the frame's `queue_wait` (a queued call
    is put back in its queue sooner rather than hold a dispatcher thread), at most the
    version's queue_timeout_s (`limit`, also the default)."""
    limit = float(limit)
    try:
        asked = float(frame.get("queue_wait", limit))
    except (TypeError, ValueError):
        return limit
    return min(max(asked, 0.0), limit)
