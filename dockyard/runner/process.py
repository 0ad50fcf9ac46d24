"""One child process: a venv's interpreter running the sandbox bootstrap, spoken to with
length-prefixed JSON frames over two dedicated pipes. Starts it, routes calls to it, notices
when it dies, and kills its whole tree."""

from __future__ import annotations

import array
import fcntl
import itertools
import logging
import os
import shutil
import signal
import socket
import subprocess
import termios
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..common.direct import Slot
from ..common.protocol import Frame, Status
from ..common.frames import FrameReader, encode_frame, write_frame
from ..sandbox.bootstrap import excerpt
from ..sandbox.isolation import encode_spec
from . import reply_fields
from .cpu_budget import CpuBudget, find_server
from .spares import request_socket, spares
from .states import ProcessState, change_state
from .tree import kill_tree
from .direct_watch import BROKE_PROTOCOL, CANCEL, OVER_BUDGET, TIMED_OUT, DirectWatch, Verdict
from .witness import Witness

log = logging.getLogger("dockyard.process")

LOAD_ERROR_EXIT = 3
SANDBOX_FAILED_EXIT = 125     # sandbox/launch.py could not build the view
START_TIMEOUT_S = 60.0
OUTPUT_CAP = 64 * 1024
# A reply holds a result and the call's output: a child that announces more is broken or
# hostile, and the worker never reads it into memory.
REPLY_MAX_BYTES = 16 * 1024 * 1024
# How long a call may wait for a free process by default (a version's own is its manifest's
# limits.queue_timeout_s): in the pool (relayed calls), or in a one-at-a-time process's
# sockets, after which the process answers it `not_started` (the caller has given up on it
# by then: see Child._read_reply and app/invoke/direct_calls.py).
QUEUE_WAIT_S = 10.0
# A call is sent whole to a one-at-a-time process within its queue time and this, or the
# process is not reading.
SEND_GRACE_S = 1.0
SEND_WAIT_S = QUEUE_WAIT_S + SEND_GRACE_S
# How long the worker waits to write a small frame to a child's request socket.
CONTROL_WAIT_S = 0.5
# Of a stop's grace, what is left for SIGTERM before SIGKILL (at most).
TERM_WAIT_S = 2.0
# How often the watchdog lets go of the channels whose web threads closed them.
SWEEP_S = 0.5


class LoadError(Exception):
    """The user's code cannot be imported: restarting will not help."""


class StartError(Exception):
    """The child died or hung while starting."""


@dataclass
class ChildSpec:
    """Everything needed to start one child of a version."""

    argv: list[str]                 # interpreter, flags, bootstrap path (fds are appended)
    code_dir: Path
    tmp_root: Path                  # a private tmp dir per child is made below it
    run_dir: Path                   # where the captured stdout/stderr files live
    env: dict[str, str]
    init: dict                      # the bootstrap's init frame (functions, names…)
    what: str                       # "container@version" for logs
    user: int | None = None         # uid/gid Popen switches to (None: a wrapper does it)
    group: int | None = None
    owner: tuple[int, int] | None = None  # the child's uid/gid, owner of its private tmp
    cgroup: Callable[[str], object] | None = None  # makes this child's cgroup, given a name
    sandbox: dict | None = None     # the launcher's spec (a private view); None: no namespaces
    cpu_budget_s: float | None = None  # CPU seconds per call, enforced from outside
    cpu_by_kernel: bool = False     # the worker may set the child's RLIMIT_CPU (prlimit)
    queue_wait: float = QUEUE_WAIT_S    # the version's queue_timeout_s


@dataclass
class _Pending:
    done: threading.Event = field(default_factory=threading.Event)
    reply: dict | None = None


_numbers = itertools.count(1)


class _Control:
    """The worker's end of a child's request socket: frames, and descriptors with them."""

    def __init__(self, fd: int):
        self.sock = socket.socket(fileno=fd)
        # Bytes written so far (the writer holds the child's write lock); None once a write
        # failed part of the way, when nobody can say.
        self.written: int | None = 0

    def _count(self, size: int) -> None:
        if self.written is not None:
            self.written += size

    def write(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except BaseException:
            self.written = None
            raise
        self._count(len(data))

    def flush(self) -> None:
        pass

    def send_fd(self, data: bytes, fd: int) -> None:
        self._count(socket.send_fds(self.sock, [data], [fd]))

    def send_nowait(self, data: bytes, fd: int | None = None) -> None:
        """Send a small frame now or not at all (OSError): a process that does not read its
        request socket (busy with a long call, or hostile) never holds the thread."""
        if fd is None:
            sent = self.sock.send(data, socket.MSG_DONTWAIT)
        else:
            sent = socket.send_fds(self.sock, [data], [fd], socket.MSG_DONTWAIT)
        self._count(sent)
        if sent < len(data):    # a frame of a few bytes is not split in practice
            self.write(data[sent:])

    def close(self) -> None:
        self.sock.close()


class Child:
    def __init__(self, spec: ChildSpec, generation: int, on_exit: Callable[["Child"], None]):
        self.spec = spec
        self.generation = generation
        self.number = next(_numbers)
        self.on_exit = on_exit
        self.state = None
        self.popen: subprocess.Popen | None = None
        self.pid = 0
        self.in_flight = 0          # owned by the pool, under its lock
        self.served = 0
        self.last_used = time.monotonic()
        self.exit_reason: str | None = None
        self.oom = False
        self.cgroup = None
        self.cpu_budget: CpuBudget | None = None
        self._dead: dict | None = None
        self._pending: dict[str, _Pending] = {}
        self.calls: set[str] = set()    # ids of the calls in flight here (for cancel)
        # Relayed calls given up on at their start-by while still unread in the request
        # socket: the process answers each `not_started` when it gets to it, and that reply
        # is skipped (see _read_reply).
        self.withdrawn: set[str] = set()
        self._write_lock = threading.Lock()
        # One-at-a-time processes serve direct channels too: the worker's account of their
        # calls is its witness (the pool page's ledger, set by the pool), the process's own
        # is its slot (see common/direct.py, witness.py and direct_watch.py).
        self.ledger_page = None
        self.slot: Slot | None = None
        self.witness: Witness | None = None
        self.direct_watch: DirectWatch | None = None
        self._next_sweep = 0.0
        self.timeout_s = 0.0                # the timeout it was killed for
        self.timed_out_call = ""            # and the call that ran past it
        self._requests = None
        self._replies = None
        self._their_requests: socket.socket | None = None  # a copy of the process's end
        self.tmp_dir = spec.tmp_root / f"p{self.number}"
        self.stdout_path = spec.run_dir / f"p{self.number}.stdout"
        self.stderr_path = spec.run_dir / f"p{self.number}.stderr"

    @property
    def what(self) -> str:
        return f"{self.spec.what} pid {self.pid or '-'}"

    def start(self) -> None:
        """Spawn, apply limits, send the init frame and wait for ready. Raises LoadError when
        the code cannot be imported, StartError when the child fails otherwise."""
        change_state(self, ProcessState.STARTING, f"{self.spec.what} process {self.number}")
        view = self.spec.sandbox is not None
        if not view:
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(self.tmp_dir, 0o700)
            if self.spec.owner is not None:
                os.chown(self.tmp_dir, *self.spec.owner)
        self.spec.run_dir.mkdir(parents=True, exist_ok=True)
        if view:
            self._launch_in_view()
        else:
            self._launch_directly()
        try:
            if not view and self.spec.cgroup is not None:
                # Before the init frame: the child runs no user code until it has it.
                self.cgroup = self.spec.cgroup(self._cgroup_name())
                self.cgroup.attach(self.pid)
            try:
                write_frame(self._requests, dict(self.spec.init, type=Frame.INIT,
                                                 output_cap=OUTPUT_CAP))
            except OSError:
                pass  # it died already: the read below sees the end and says why
            first = self._replies.read(time.monotonic() + START_TIMEOUT_S)
        except TimeoutError:
            self._abort()
            raise StartError(f"the process did not become ready within {START_TIMEOUT_S:.0f}s")
        except BaseException:
            self._abort()
            raise
        if first is None:
            code = self._abort()
            detail = self.read_output()[1].strip()[-2000:]
            raise StartError(f"the process exited while starting ({self._describe(code)})"
                             + (f": {detail}" if detail else ""))
        if first.get("type") == Frame.LOAD_ERROR:
            self._abort()
            error = first.get("error") or {}
            raise LoadError(f"{error.get('type')}: {error.get('message')}\n"
                            f"{error.get('traceback') or ''}".strip())
        if first.get("type") != Frame.READY:
            self._abort()
            raise StartError(f"unexpected first frame from the child: {first}")
        # The bootstrap's pid on the host (pid 2 of the view's namespace): read from /proc
        # only for the CPU budget, which is all that needs it.
        server = find_server(self.pid) if view and self.spec.cpu_budget_s else 0
        if server:
            try:
                self.cpu_budget = CpuBudget(
                    server, self.spec.cpu_budget_s, self.spec.cpu_by_kernel,
                    self.cgroup.cpu_reader() if self.cgroup is not None else None)
            except OSError as exc:
                log.warning("%s: cannot watch its CPU time: %s", self.what, exc)
        if self.direct:
            slot = Slot()
            try:
                with self._write_lock:
                    self._requests.send_fd(encode_frame({"type": Frame.SLOT}), slot.fd)
                self.slot = slot
            except OSError as exc:
                slot.close()
                log.warning("%s: no slot page, so no direct channels: %s", self.what, exc)
            self.witness = Witness(self.ledger_page, self.number, self._their_requests)
            self.direct_watch = DirectWatch(self.witness, self.slot, self.cpu_budget,
                                            self.spec.queue_wait)
        change_state(self, ProcessState.RUNNING, self.what)
        if not self.direct:
            threading.Thread(target=self._read_replies, name=f"child-{self.pid}",
                             daemon=True).start()

    def _output_files(self) -> tuple[int, int]:
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
        return os.open(self.stdout_path, flags, 0o600), os.open(self.stderr_path, flags, 0o600)

    def _launch_directly(self) -> None:
        """Without a view: the venv's interpreter runs the bootstrap as a direct child."""
        req_write, req_read = request_socket()
        rep_read, rep_write = os.pipe()
        out_fd, err_fd = self._output_files()
        env = dict(self.spec.env, HOME=str(self.tmp_dir), TMPDIR=str(self.tmp_dir))
        try:
            self._their_requests = socket.socket(fileno=os.dup(req_read))
            self.popen = subprocess.Popen(
                [*self.spec.argv, str(req_read), str(rep_write)], stdin=subprocess.DEVNULL,
                stdout=out_fd, stderr=err_fd, pass_fds=(req_read, rep_write),
                cwd=self.spec.code_dir, env=env, start_new_session=True, close_fds=True,
                user=self.spec.user, group=self.spec.group,
                extra_groups=[] if self.spec.user is not None else None)
        except BaseException:
            os.close(req_write)
            os.close(rep_read)
            if self._their_requests is not None:
                self._their_requests.close()
            raise
        finally:
            for fd in (req_read, rep_write, out_fd, err_fd):
                os.close(fd)
        self.pid = self.popen.pid
        self._requests = _Control(req_write)
        self._replies = FrameReader(rep_read, REPLY_MAX_BYTES, raw_results=True)

    def _launch_in_view(self) -> None:
        """Hand a started launcher (usually a spare) the sandbox spec: this child's cgroup
        (made first: the launcher joins it before it forks anything), output files and
        folder, and the bootstrap's command line with the launcher's pipe ends."""
        if self.spec.cgroup is not None:
            self.cgroup = self.spec.cgroup(self._cgroup_name())
        for fd in self._output_files():
            os.close(fd)
        try:
            launcher = spares.take()
        except BaseException:
            if self.cgroup is not None:
                self.cgroup.remove()
            raise
        self.popen = launcher.popen
        self.pid = launcher.popen.pid
        self._their_requests = socket.socket(fileno=launcher.their_request_fd)
        self._requests = _Control(launcher.request_fd)
        self._replies = FrameReader(launcher.reply_fd, REPLY_MAX_BYTES, raw_results=True)
        try:
            self._requests.write(encode_spec(dict(
                self.spec.sandbox, cgroups=self.cgroup.folders() if self.cgroup else [],
                argv=[*self.spec.sandbox["argv"], *launcher.fds],
                stdout=str(self.stdout_path), stderr=str(self.stderr_path),
                host_cwd=str(self.spec.run_dir.parent))))
        except OSError:
            pass  # the launcher died: the first read below sees it and says why

    def _cgroup_name(self) -> str:
        return f"{self.spec.what.replace('@', '-')}-p{self.number}"

    def over_cpu_budget(self) -> bool:
        """Between calls: kill a process that went on burning CPU past its last call's
        budget. True if it was killed. (A one-at-a-time process is checked by the watchdog's
        looks, see DirectWatch; here only while its slot is all there is.)"""
        budget = self.cpu_budget
        if budget is None:
            return False
        watch = self.direct_watch
        if not (watch.idle_check() if watch is not None else budget.exceeded()):
            return False
        self._stop_over_budget()
        return True

    def _stop_over_budget(self) -> None:
        self.exit_reason = ("cpu time limit: it went on using CPU after its call returned, past "
                            f"the call's budget of {self.cpu_budget.seconds:g}s")
        log.warning("%s: %s; killing the process tree", self.what, self.exit_reason)
        # Out of the pool's choice before the kill, and reaped at once: no call may be
        # handed to a process that is on its way out.
        change_state(self, ProcessState.STOPPING, self.what)
        self.kill()
        if self.direct:
            self._died()

    def _abort(self) -> int | None:
        self.kill()
        code = self._reap()
        self._cleanup()
        return code

    @property
    def direct(self) -> bool:
        """One call at a time: the calling thread reads the reply itself (no reader thread,
        no hand-off between threads on the hot path)."""
        return int(self.spec.init.get("concurrency", 1)) == 1

    def alive(self) -> bool:
        """False (after handling the death) if the child exited while idle."""
        if self.popen.poll() is None:
            return True
        self._died()
        return False

    def invoke(self, frame: dict, timeout: float) -> dict:
        """Send one call and wait for its reply. On timeout the whole tree is killed (the only
        way to stop Python code) and a timed_out reply is returned."""
        self.calls.add(frame["id"])
        try:
            return self._invoke(frame, timeout)
        finally:
            self.calls.discard(frame["id"])

    def cancel(self, call_id: str) -> None:
        """Stop a call from outside by killing the whole tree (calls in flight beside it in
        this process end too); the pool starts a fresh process in its place."""
        self.exit_reason = "cancelled"
        log.warning("%s %s: cancelled; killing the process tree", call_id, self.what)
        self.kill()

    def _invoke(self, frame: dict, timeout: float) -> dict:
        if self.direct:
            witness = self.witness
            if witness is None:
                return self._invoke_direct(frame, timeout, time.monotonic() + timeout)
            witness.relayed_sent(frame["id"], timeout)
            try:
                # Calls from web processes may be ahead of it: it waits behind them until its
                # start-by (the end of its queue time in the pool, or a fenced call's own),
                # and is withdrawn then if the process has not taken it. The watchdog times
                # the calls from the later of this one's sending and the last answer.
                start_by = time.monotonic() + self.spec.queue_wait
                start_by = min(start_by, float(frame.get("start_by", start_by)))
                frame = dict(frame, start_by=start_by, timeout=timeout)
                return self._invoke_direct(frame, timeout, start_by + timeout + SEND_GRACE_S,
                                           start_by)
            finally:
                witness.relayed_answered(frame["id"])
        return self._invoke_relayed(frame, timeout)

    def _invoke_direct(self, frame: dict, timeout: float, deadline: float,
                       start_by: float | None = None) -> dict:
        """A call to a one-at-a-time process over its request socket: this thread reads the
        reply. With `start_by`, a call the process has not taken by then is withdrawn: the
        all-busy answer, then."""
        if self.cpu_budget is not None:
            self.cpu_budget.arm()
        try:
            with self._write_lock:  # a channel may be handed over meanwhile
                self._requests.write(encode_frame(frame))
                written = self._requests.written
            reply = self._read_reply(frame["id"], start_by, deadline, written)
            if reply is _WITHDRAWN:
                return not_started()
        except TimeoutError:
            return self._timed_out(frame, timeout)
        except OSError as exc:
            log.warning("%s: pipe broke: %s", self.what, exc)
            reply = None
        except Exception as exc:  # noqa: BLE001 - whatever the child wrote, it is its fault
            return self._broke_protocol(exc)
        self.served += 1
        self.last_used = time.monotonic()
        if reply is None:
            dead = self._died()
            if self.witness is not None and not self.witness.started(frame["id"]):
                return _not_running(self.spec.what)   # it waited behind another call
            return self._for_call(dead, frame["id"])
        if not is_reply(reply, frame["id"]):
            return self._broke_protocol(ValueError(f"not a reply to {frame['id']}"))
        if self.cpu_budget is not None:
            self.cpu_budget.settle()
        return self._finish(translate(reply))

    def _read_reply(self, call_id: str, start_by: float | None, deadline: float,
                    written: int | None):
        """The reply to the relayed call `call_id` (those to calls withdrawn earlier are
        skipped), by `deadline`; _WITHDRAWN if the call (the request socket's bytes up to
        `written`) was still unread there after `start_by`: the process then answers it
        `not_started` whenever it reads it, so it never runs. TimeoutError past
        `deadline`."""
        if start_by is not None:
            while True:
                try:
                    return self._next_reply(start_by)
                except TimeoutError:
                    if time.monotonic() > start_by:
                        break
            left = self._unread_requests(CONTROL_WAIT_S)
            if left is not None and written is not None and left[0] > left[1] - written:
                # More is unread than was written since: some of this call is.
                if self.witness is not None:
                    self.witness.relayed_withdrawn(call_id)
                self.withdrawn.add(call_id)
                return _WITHDRAWN
        return self._next_reply(deadline)

    def _unread_requests(self, wait: float) -> tuple[int, int] | None:
        """(bytes still unread in the request socket, bytes written to it so far): the
        kernel's count, on the worker's copy of the process's end, and the worker's. None
        when it cannot be told (another write under way for `wait`, the process gone)."""
        lock = self._write_lock
        if not (lock.acquire(timeout=wait) if wait > 0 else lock.acquire(blocking=False)):
            return None
        try:
            requests, theirs = self._requests, self._their_requests
            if requests is None or theirs is None or requests.written is None:
                return None
            count = array.array("i", [0])
            fcntl.ioctl(theirs.fileno(), termios.FIONREAD, count)
            return count[0], requests.written
        except OSError:
            return None
        finally:
            self._write_lock.release()

    def _next_reply(self, deadline: float):
        while True:
            reply = self._replies.read(deadline)
            stale = reply.get("id") if isinstance(reply, dict) else None
            if not isinstance(stale, str) or stale not in self.withdrawn:
                return reply
            self.withdrawn.discard(stale)

    def request_blocked(self) -> bool:
        """Whether a relayed call withdrawn earlier may still be unread in the request
        socket: the process has not read it since (it is busy), and a call written behind it
        would wait at least as long (the pool waits for a free process instead)."""
        if not self.withdrawn:
            return False
        left = self._unread_requests(0)
        return left is None or left[0] > 0

    def _invoke_relayed(self, frame: dict, timeout: float) -> dict:
        """A call to a process that serves several at once: a reader thread hands over the
        replies."""
        pending = _Pending()
        call_id = frame["id"]
        self._pending[call_id] = pending
        try:
            try:
                with self._write_lock:
                    self._requests.write(encode_frame(frame))
            except OSError:
                pending.done.wait(5)  # the reader thread reports how it died
                return pending.reply or crashed("the process died before the call reached it")
            if not pending.done.wait(timeout):
                return self._timed_out(frame, timeout)
            return self._finish(pending.reply)
        finally:
            self._pending.pop(call_id, None)
            self.served += 1
            self.last_used = time.monotonic()

    # -- the direct channel -----------------------------------------------------------------

    def channel(self) -> tuple[socket.socket, int]:
        """A new direct channel: one end goes to the process over its request socket, the
        other is returned (for a web thread), with a copy of the slot's descriptor (which
        the caller closes once sent). The worker keeps a copy of the process's end (what is
        unread there is what the process never took) and a ledger line for the channel."""
        if not self._write_lock.acquire(timeout=CONTROL_WAIT_S):
            raise OSError("its request socket is busy")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if self._requests is None or self.slot is None or self.witness is None:
                raise OSError("the process is gone")
            self._requests.send_nowait(encode_frame({"type": Frame.CHANNEL}), theirs.fileno())
            slot_fd = os.dup(self.slot.fd)
        except BaseException:
            ours.close()
            theirs.close()
            raise
        finally:
            self._write_lock.release()
        self.witness.add(theirs, os.fstat(ours.fileno()).st_ino)
        return ours, slot_fd

    def direct_state(self) -> tuple[bool, int, float, float, str]:
        """(a call in hand, calls served, since when, when the last ended, its id): what the
        worker measured, where every channel is in the ledger; else what the slot shows (an
        id only if it has the form of one). See DirectWatch."""
        watch = self.direct_watch
        if watch is None:
            return False, 0, 0.0, 0.0, ""
        return watch.state(time.monotonic())

    def direct_busy(self) -> bool:
        """Whether the slot shows a call in hand (the header alone: on every pick, a hint)."""
        watch = self.direct_watch
        return watch.busy_hint() if watch is not None else False

    @property
    def served_total(self) -> int:
        return self.served + self.direct_state()[1]

    @property
    def last_active(self) -> float:
        return max(self.last_used, self.direct_state()[3])

    def watch(self, now: float, timeout: float, cancelled: dict) -> None:
        """The watchdog's look (every few tens of ms): handle the death of a process nobody
        asks about, then act on DirectWatch's verdict: stop a call cancelled while it waited
        as it starts, kill a call past its timeout, a process whose slot broke the protocol,
        or one that burns CPU with no call in hand past its budget."""
        if self._dead is not None:
            return
        if self.popen.poll() is not None:
            # Dead (killed, or it died) with nobody asking: its death is handled here, unless
            # a relayed call reading its replies handles it.
            if not self.in_flight:
                self._died()
            return
        if self.exit_reason is not None or self.direct_watch is None:
            return      # on its way out already
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_S
            self.witness.sweep()
        verdict = self.direct_watch.look(now, timeout, cancelled)
        if verdict is not None:
            self._act(verdict, timeout)

    def _act(self, verdict: Verdict, timeout: float) -> None:
        # Out of the pool's choice (and of new channels) before the kill: the death is
        # handled on a later look.
        change_state(self, ProcessState.STOPPING, self.what)
        if verdict.action == CANCEL:
            self.cancel(verdict.call_id)
        elif verdict.action == TIMED_OUT:
            self._mark_timed_out(verdict.call_id, timeout)
            self.kill()
        elif verdict.action == BROKE_PROTOCOL:
            self.exit_reason = f"broke the slot protocol: {verdict.reason}"
            log.warning("%s: %s; killing the process tree", self.what, self.exit_reason)
            self.kill()
        elif verdict.action == OVER_BUDGET:
            self._stop_over_budget()

    def _mark_timed_out(self, call_id: str, timeout: float, label: str | None = None) -> None:
        """`call_id` ran past its timeout: its process is about to be killed for it ("": a
        call the worker cannot name)."""
        self.exit_reason = "timed out"
        self.timeout_s = timeout
        self.timed_out_call = call_id
        log.warning("%s %s timed out after %.1fs; killing the process tree",
                    label or call_id or "a call of", self.what, timeout)

    def lost(self, why: str, call_id: str, timeout: float) -> dict:
        """A web thread got no proper reply to a call it sent down a direct channel: it waited
        past the call's queue time and timeout (the tree is killed, as for a relayed call),
        the channel closed (the process died: a call it had started crashed with it, a call
        it never reached is not_running and goes elsewhere), the reply broke the protocol,
        or the process must go after its reply (out of memory). Whether the process took the
        call is read from its channels (see Witness.started), never from its slot."""
        started = self._started(call_id)
        if why == "unread":
            # The call could not be sent whole within its queue time: never run. A process
            # busy with a call of its own is left alone; one that stopped reading goes.
            watch = self.direct_watch
            working = watch is not None and watch.working(time.monotonic(), timeout, call_id)
            if self._dead is None and not working:
                self.exit_reason = "stopped reading its calls"
                log.warning("%s: %s; killing the process tree", self.what, self.exit_reason)
                self.kill()
                self._dead_reply()
            return not_started()
        if why == "closed" and self._dead is None and self.popen.poll() is None:
            # The channel ended but the process lives (it shut its end down, or is on its way
            # out): give it a moment. A call it never started goes elsewhere and the process
            # stays.
            try:
                self.popen.wait(timeout=2)
            except subprocess.TimeoutExpired:
                if not self._started(call_id):
                    return _not_running(self.spec.what)
                self.exit_reason = self.exit_reason or "closed a direct channel mid-call"
        if why == "timeout" and self._dead is None and self.exit_reason is None:
            # The call in hand is the one past its timeout (the caller's wait also covered
            # its queue time): blamed on it, whichever call asked, where the worker can tell
            # which it is.
            running = self.direct_watch.in_hand_now() if self.direct_watch else ""
            self._mark_timed_out(running or (call_id if started else ""), timeout)
        elif why == "protocol" and self.exit_reason is None:
            self.exit_reason = "broke the reply protocol (a direct channel's reply is not one)"
            log.warning("%s: %s; killing the process tree", self.what, self.exit_reason)
        elif why == "recycle":
            self.exit_reason = "out of memory"
        self.kill()
        reply = self._dead_reply()
        started = started or self._started(call_id)
        if why == "closed" and not started:
            return _not_running(self.spec.what)
        if why == "timeout" and not started:
            return not_started()   # it waited behind a stuck call
        return self._for_call(reply, call_id)

    def _for_call(self, reply: dict, call_id: str) -> dict:
        """The death's reply as the answer to `call_id`: timed out only for the call that ran
        past its timeout; another call the kill caught crashed."""
        if reply.get("status") != Status.TIMED_OUT or self.timed_out_call in ("", call_id):
            return reply
        return dict(reply, status=Status.CRASHED, error={
            "type": "Crashed", "message": "the process was stopped mid-call: the call before "
                                          "this one ran past its timeout"})

    def _started(self, call_id: str) -> bool:
        """Whether the process took `call_id` off its channel (its request socket, for a
        relayed call): the call is not among what it left unread there."""
        return self.witness is None or self.witness.started(call_id)

    def _dead_reply(self) -> dict:
        """The process's death, handled once: by this thread, or (while a relayed call reads
        its replies) by the thread of that call, which sees the end and handles it."""
        end = time.monotonic() + 15
        while self.in_flight and self._dead is None and time.monotonic() < end:
            time.sleep(0.01)
        return self._dead if self._dead is not None else self._died()

    def _broke_protocol(self, exc: BaseException) -> dict:
        """The child wrote something that is not a reply frame (too large, not JSON, not the
        reply to this call): its pipe cannot be trusted to line up with the next call, so the
        process is killed and replaced."""
        self.exit_reason = f"broke the reply protocol ({type(exc).__name__}: {exc})"[:300]
        log.warning("%s: %s; killing the process tree", self.what, self.exit_reason)
        self.kill()
        return self._died() if self.direct else crashed(self.exit_reason)

    def _finish(self, reply: dict) -> dict:
        if reply.get("recycle"):
            # A process that ran out of memory is not trusted with the next call.
            self.exit_reason = "out of memory"
            self.kill()
            if self.direct:
                self._died()
        return reply

    def _timed_out(self, frame: dict, timeout: float) -> dict:
        self._mark_timed_out(str(frame.get("id") or ""), timeout,
                             label=frame.get("invocation_id", frame.get("id")))
        stdout, stderr = self.read_output()
        self.kill()
        if self.direct:
            self._died()
        return dict(_timed_out_reply(timeout), stdout=stdout, stderr=stderr)

    def _read_replies(self) -> None:
        try:
            while True:
                frame = self._replies.read(None)
                if frame is None:
                    break
                if not isinstance(frame, dict) or frame.get("type") != Frame.RESULT:
                    raise ValueError("not a reply frame")
                pending = self._pending.get(frame.get("id"))
                if pending is not None:
                    pending.reply = translate(frame)
                    pending.done.set()
        except Exception as exc:  # noqa: BLE001 - a broken pipe is a dead child
            if self.popen is not None and self.popen.poll() is None:
                # Alive but speaking garbage: it cannot be trusted with another call.
                self.exit_reason = f"broke the reply protocol ({type(exc).__name__})"
                self.kill()
            log.warning("%s: reply pipe broke: %s", self.what, exc)
        self._died()

    def _died(self) -> dict:
        """Handle the child's death once: reap, tell pending calls (and return the reply for
        the call in hand), clean up, let the pool replace it."""
        with self._write_lock:
            if self._dead is not None:
                return self._dead
            code = self._reap()
            if self.cgroup is not None and self.cgroup.oom_killed():
                self.oom = True
            reason = "out of memory" if self.oom else (self.exit_reason or
                                                       self._describe(code, started=True))
            stdout, stderr = self.read_output()
            if self.witness is not None:
                # Only now do its web threads see its channels end (the worker held them).
                self.witness.close()
            reply = crashed(f"the process died mid-call ({reason})", out_of_memory=self.oom)
            if reason == "timed out":
                # The watchdog stopped it (see watch()).
                reply.update(_timed_out_reply(self.timeout_s))
            reply["stdout"], reply["stderr"] = stdout, stderr
            self._dead = reply
        for pending in list(self._pending.values()):
            if pending.reply is None:
                pending.reply = dict(reply)
                pending.done.set()
        change_state(self, ProcessState.EXITED, f"{self.what} ({reason})")
        self._cleanup()
        self.on_exit(self)
        return reply

    def _reap(self) -> int | None:
        if self.popen is None:
            return None
        try:
            code = self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.popen.wait()
        # Whatever the child left behind in its tree dies with it.
        self.kill()
        return code

    @staticmethod
    def _describe(code: int | None, started: bool = False) -> str:
        """How the process ended; `started`: it had been serving (its exit codes are then
        the function's own, not the bootstrap's)."""
        if code is None:
            return "unknown exit"
        if code == -signal.SIGXCPU:
            return "cpu time limit: the call used more CPU time than its timeout_s"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        if code == LOAD_ERROR_EXIT and not started:
            return "could not load the code"
        if code == SANDBOX_FAILED_EXIT and not started:
            return "the sandbox could not be built"
        return f"exit code {code}"

    def read_output(self) -> tuple[str, str]:
        """What the child wrote since its last reply (after a crash: the last words), cut as
        the child cuts a reply's output."""
        out = []
        for path in (self.stdout_path, self.stderr_path):
            try:
                with open(path, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    out.append(excerpt(f.fileno(), size, OUTPUT_CAP).decode("utf-8", "replace"))
            except OSError:
                out.append("")
        return out[0], out[1]

    def stop(self, grace: float) -> None:
        """Ask the child to exit after its in-flight calls; SIGTERM its group near the end of
        `grace`, and kill the whole tree when it is over, whatever the process says."""
        if self.popen is None:
            return
        if self.popen.poll() is not None:
            if self.direct and not self.in_flight:
                self._died()    # dead meanwhile with nobody to handle it
            return
        change_state(self, ProcessState.STOPPING, self.what)
        self.exit_reason = self.exit_reason or "stopped"
        end = time.monotonic() + grace
        term_at = end - min(TERM_WAIT_S, grace / 2)
        if self._write_lock.acquire(timeout=min(CONTROL_WAIT_S, grace / 4)):
            try:
                self._requests.send_nowait(encode_frame({"type": Frame.SHUTDOWN}))
            except (OSError, AttributeError):
                pass    # gone, or not reading: the grace below runs out and it is killed
            finally:
                self._write_lock.release()
        try:
            self.popen.wait(timeout=max(0.01, term_at - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.pid, signal.SIGTERM)
            except OSError:
                pass
            try:
                self.popen.wait(timeout=max(0.01, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        if self.direct:
            self._died()

    def kill(self) -> None:
        if self.pid:
            kill_tree(self.pid, self.cgroup.kill_all if self.cgroup is not None else None)

    def _cleanup(self) -> None:
        for stream in (self._requests, self._replies):
            try:
                stream.close()
            except (OSError, AttributeError):
                pass
        self._requests = self._replies = None
        if self.cpu_budget is not None:
            self.cpu_budget.close()
        if self.witness is not None:
            self.witness.close()
        if self._their_requests is not None:
            self._their_requests.close()
        with self._write_lock:
            if self.slot is not None:
                self.slot.close()
                self.slot = None
        if self.cgroup is not None:
            self.cgroup.remove()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        for path in (self.stdout_path, self.stderr_path):
            try:
                path.unlink()
            except OSError:
                pass


def _timed_out_reply(timeout: float) -> dict:
    return {"status": Status.TIMED_OUT, "duration_ms": timeout * 1000.0,
            "error": {"type": "Timeout",
                      "message": f"the function ran past its {timeout:g}s timeout and was "
                                 "stopped"}}


# The reply a call that was never started gets in place of a reply: see _read_reply.
_WITHDRAWN = object()


def not_started() -> dict:
    """The answer to a call no process took within its queue time: it did not run. `busy`
    marks it for the control plane, which answers it 429 (see app/invoke/execute.py)."""
    return {"status": Status.UNAVAILABLE, "error": {
        "type": "Unavailable", "busy": True,
        "message": "all instances are busy; retry shortly or raise `instances`/`concurrency`"}}


def _not_running(what: str) -> dict:
    return {"status": Status.NOT_RUNNING, "error": {
        "type": "NotRunning", "message": f"{what}: the process left before it reached the call"}}


def crashed(message: str, out_of_memory: bool = False) -> dict:
    error = {"type": "OutOfMemory" if out_of_memory else "Crashed", "message": message}
    if out_of_memory:
        error["reason"] = "out of memory"
    return {"status": Status.CRASHED, "error": error}


def is_reply(frame, call_id: str) -> bool:
    return isinstance(frame, dict) and frame.get("type") == Frame.RESULT and \
        frame.get("id") == call_id


def translate(frame: dict) -> dict:
    """A bootstrap result frame as the worker's reply to the control plane."""
    if frame.get("not_started"):
        return not_started()
    # Every field is the process's word: checked for its type before anything uses it.
    ok = frame.get("ok") is True
    reply = {
        "status": Status.SUCCEEDED if ok else Status.FAILED,
        "stdout": reply_fields.text(frame.get("stdout")),
        "stderr": reply_fields.text(frame.get("stderr")),
        "duration_ms": reply_fields.milliseconds(frame.get("duration_ms")),
        "max_rss_kb": reply_fields.kilobytes(frame.get("max_rss_kb")),
        "cold": reply_fields.flag(frame.get("cold")),
    }
    if ok:
        reply["result"] = frame.get("result")
    else:
        reply["error"] = reply_fields.error(frame.get("error"))
        if reply["error"]["type"] == "MemoryError":
            # The address-space limit hit (no memory cgroup on this host): out of memory.
            reply["status"] = Status.CRASHED
            reply["error"] = dict(reply["error"], type="OutOfMemory", reason="out of memory",
                                  message="the function ran out of memory (its memory_mb "
                                          "limit); the process was replaced")
            reply["recycle"] = True
    return reply
