"""Sandbox launchers started ahead of need. A launcher is a fresh interpreter that has to start
and import before it can build a view: done when a call is waiting, that is a third of a cold
start. So the worker keeps one launcher started and idle (blocked reading its spec), hands it
to the next child that starts, and starts the next spare in the background."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import threading
from dataclasses import dataclass

from ..sandbox.isolation import SAFE_PATH, launcher_argv, lifeline_fd

log = logging.getLogger("dockyard.spares")


@dataclass
class Launcher:
    popen: subprocess.Popen
    request_fd: int     # the worker's end of the launcher's request socket (the spec goes first)
    reply_fd: int       # the read end of its reply pipe
    fds: tuple[str, str]  # the launcher's own ends, as the bootstrap's argv names them
    # A copy of the launcher's end of its request socket: what is still unread there is
    # what the process never took (see runner/witness.py).
    their_request_fd: int

    def discard(self) -> None:
        for fd in (self.request_fd, self.reply_fd, self.their_request_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()


def start_launcher() -> Launcher:
    # Requests go over a socket (it can carry a direct channel's descriptor), replies over a
    # pipe.
    req_write, req_read = request_socket()
    rep_read, rep_write = os.pipe()
    kept = -1
    try:
        kept = os.dup(req_read)
        popen = subprocess.Popen(
            launcher_argv(req_read, rep_write), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(req_read, rep_write, lifeline_fd()), cwd="/", env={"PATH": SAFE_PATH},
            start_new_session=True, close_fds=True)
    except BaseException:
        for fd in (req_write, rep_read, kept):
            if fd >= 0:
                os.close(fd)
        raise
    finally:
        os.close(req_read)
        os.close(rep_write)
    return Launcher(popen, req_write, rep_read, (str(req_read), str(rep_write)), kept)


def request_socket() -> tuple[int, int]:
    """(the worker's end, the child's end) of a child's request socket, as plain descriptors
    (the worker's closed on exec, the child's inherited where passed)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.set_inheritable(True)
    return ours.detach(), theirs.detach()


class Spares:
    def __init__(self, size: int = 1):
        self.size = size
        self.ready: list[Launcher] = []
        self.refilling = False
        self.closed = False
        self.lock = threading.Lock()

    def take(self) -> Launcher:
        """A started launcher: a spare if one is alive, else a new one."""
        taken = None
        with self.lock:
            while self.ready and taken is None:
                launcher = self.ready.pop()
                if launcher.popen.poll() is None:
                    taken = launcher
                else:
                    launcher.discard()
        self.refill()
        return taken if taken is not None else start_launcher()

    def refill(self) -> None:
        with self.lock:
            if self.closed or self.refilling or len(self.ready) >= self.size:
                return
            self.refilling = True
        threading.Thread(target=self._refill, name="spare-launcher", daemon=True).start()

    def _refill(self) -> None:
        try:
            launcher = start_launcher()
        except OSError as exc:
            log.warning("cannot start a spare sandbox launcher: %s", exc)
            launcher = None
        with self.lock:
            self.refilling = False
            if launcher is not None and not self.closed:
                self.ready.append(launcher)
                launcher = None
        if launcher is not None:
            launcher.discard()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            ready, self.ready = self.ready, []
        for launcher in ready:
            launcher.discard()


spares = Spares()
