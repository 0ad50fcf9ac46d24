"""The deploy-folder watcher, its own process under `serve`: a package dropped into the folder
is deployed through the control plane's upload API once it is whole, a package removed is
undeployed, and the outcome is written beside each one as a marker file, after WildFly's
deployment scanner. An initial scan, then watchdog events (inotify, or polling)."""

from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import sys
import time
from pathlib import Path

from watchdog.events import EVENT_TYPE_CLOSED_NO_WRITE, EVENT_TYPE_OPENED, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from ...common.http_client import Client
from ..datadir import DataDir
from ..store.db import connect
from .client import ControlPlane
from .entry import EntryState
from .deployer import SETTLE_S, FolderDeployer
from .files import (Marker, entry_of, incomplete_reason, kind_of, marker_path, packages_in,
                    signature, unopened_reason)
from ..store import deployfolder as store

log = logging.getLogger("dockyard.deploywatch")

RECHECK_S = 1.0           # how often an archive that is not whole yet is looked at again
GIVE_UP_S = 30.0          # an archive unchanged this long that still does not open is failed
GIVE_UP_ENV = "DOCKYARD_DEPLOY_GIVE_UP_S"   # seconds instead of GIVE_UP_S
FOLLOW_S = 0.25           # how often a deployment under way is asked for its progress
FOLDER_GONE_EXIT = 3      # the watched folder vanished: serve stops watching it
STILL_WRITTEN = "it is still being written"


class FolderGone(Exception):
    pass


class _Forward(FileSystemEventHandler):
    """Hands each changed path to the watcher's loop (reads are not changes)."""

    def __init__(self, events: queue.Queue):
        self.events = events

    def on_any_event(self, event) -> None:
        if event.event_type in (EVENT_TYPE_OPENED, EVENT_TYPE_CLOSED_NO_WRITE):
            return
        self.events.put(str(event.src_path))
        if getattr(event, "dest_path", ""):
            self.events.put(str(event.dest_path))


class Watcher:
    def __init__(self, folder: Path, api: ControlPlane, db_target: Path,
                 poll_s: float | None = None):
        self.folder = folder
        self.db = connect(db_target)
        self.poll_s = poll_s
        self.events: queue.Queue[str | None] = queue.Queue()
        self.due: dict[str, float] = {}     # entry name -> when to look at it (monotonic)
        self.deployer = FolderDeployer(folder, api, self.db, self._schedule)
        self.entries = self.deployer.entries
        self.stopping = False
        self.give_up_s = _seconds_from_env(GIVE_UP_ENV, GIVE_UP_S)

    def stop(self) -> None:
        """From a signal handler: only enqueue."""
        self.stopping = True
        self.events.put(None)

    def run(self) -> int:
        observer, kind = self._observer()
        store.save_status(self.db, enabled=True, folder=str(self.folder), observer=kind,
                          pid=os.getpid())
        log.info("watching %s (%s)", self.folder, kind)
        try:
            self._initial_scan()
            self._loop()
        except FolderGone:
            log.warning("the deploy folder %s is gone; its containers keep running", self.folder)
            return FOLDER_GONE_EXIT
        finally:
            observer.stop()
            observer.join(timeout=5)
            self.db.close()
        return 0

    def _observer(self):
        handler = _Forward(self.events)
        if self.poll_s:
            observer, kind = PollingObserver(timeout=self.poll_s), f"polling every {self.poll_s:g}s"
        else:
            observer, kind = Observer(), "inotify"
        try:
            observer.schedule(handler, str(self.folder), recursive=True)
            observer.start()
        except OSError as exc:
            if self.poll_s:
                raise
            # No inotify here, or its watch limit is reached: polling sees the same changes.
            log.warning("inotify cannot watch %s (%s); polling every 2s instead",
                        self.folder, exc.strerror or exc)
            observer, kind = PollingObserver(timeout=2.0), "polling every 2s (no inotify)"
            observer.schedule(handler, str(self.folder), recursive=True)
            observer.start()
        return observer, kind

    def _initial_scan(self) -> None:
        """Look at everything once: what is in the folder, and what was there when the last
        watcher stopped (removed meanwhile, it is undeployed). Oldest first, so that of two
        packages declaring one container the older keeps it."""
        present = packages_in(self.folder)
        order = sorted(set(self.entries) - present) + \
            sorted(present, key=lambda n: (_mtime(self.folder / n), n))
        start = time.monotonic()
        for rank, name in enumerate(order):
            self.due[name] = start + rank * 1e-6

    # -- the loop: events in, entries looked at when due, deployments followed -------------

    def _loop(self) -> None:
        next_follow = 0.0
        while not self.stopping:
            wake = min(self.due.values(), default=time.monotonic() + 5.0)
            if self.deployer.deploying:
                wake = min(wake, next_follow)
            self._take_events(max(0.0, wake - time.monotonic()))
            current = time.monotonic()
            for name in sorted((n for n, t in self.due.items() if t <= current),
                               key=self.due.get):
                if self.stopping:
                    return
                del self.due[name]
                self._look(name)
            if self.deployer.deploying and time.monotonic() >= next_follow:
                self.deployer.follow_deployments()
                next_follow = time.monotonic() + FOLLOW_S

    def _take_events(self, timeout: float) -> None:
        try:
            path = self.events.get(timeout=timeout)
        except queue.Empty:
            return
        changed: dict[str, None] = {}   # each entry looked at once per batch of events
        while path is not None:
            found = entry_of(self.folder, path)
            if found is not None and found[1] is None:
                changed[found[0]] = None
            elif found is not None and found[1] in (Marker.DEPLOYED, Marker.UNDEPLOYED,
                                                    Marker.SKIPDEPLOY):
                # A user removed a marker, or asked to skip. Not at once: when the whole
                # folder is being removed, it is gone by then (and nothing is undeployed).
                self._schedule(found[0], SETTLE_S)
            try:
                path = self.events.get_nowait()
            except queue.Empty:
                path = None
        # A folder package's signature walks its whole tree: once, not once per event.
        for name in changed:
            self._changed(name)

    def _changed(self, name: str) -> None:
        """Debounce: every change starts the entry's settle window again."""
        self._schedule(name, SETTLE_S)
        path = self.folder / name
        kind = kind_of(path)
        if kind is None:
            return
        entry = self.deployer.entry(name, kind)
        try:
            sig = signature(path, kind)
        except OSError:
            return
        if sig != entry.seen:
            entry.seen, entry.seen_at = sig, time.monotonic()
            if sig != entry.attempted and entry.waiting_since is None:
                entry.waiting_since = entry.seen_at
        if entry.waiting_since is not None and entry.state is not EntryState.SKIPPED:
            self.deployer.note_waiting(entry, STILL_WRITTEN)

    def _schedule(self, name: str, delay: float) -> None:
        self.due[name] = time.monotonic() + delay

    # -- one entry ------------------------------------------------------------------------

    def _look(self, name: str) -> None:
        if not self.folder.is_dir():
            raise FolderGone()
        path = self.folder / name
        kind = kind_of(path)
        if kind is None:
            if name in self.entries and not path.exists():
                self.due.pop(name, None)
                self.deployer.removed(self.entries[name])
            return
        entry = self.deployer.entry(name, kind)
        if marker_path(self.folder, name, Marker.SKIPDEPLOY).exists():
            self.deployer.skip(entry)
            return
        if entry.deployed_marker and not marker_path(self.folder, name, Marker.DEPLOYED).exists():
            if self.deployer.undeploy(entry, f"{name}{Marker.DEPLOYED} was removed"):
                entry.attempted = entry.seen  # deployed again once the package changes
            return
        try:
            sig = signature(path, kind)
        except OSError:
            self._schedule(name, SETTLE_S)
            return
        moment = time.monotonic()
        if sig != entry.seen:
            entry.seen, entry.seen_at = sig, moment
        if sig == entry.attempted and entry.state is not EntryState.SKIPPED:
            entry.waiting_since = None
            return
        entry.waiting_since = entry.waiting_since or moment
        if moment - entry.seen_at < SETTLE_S:
            self.deployer.note_waiting(entry, STILL_WRITTEN)
            self._schedule(name, entry.seen_at + SETTLE_S - moment)
            return
        try:
            reason = incomplete_reason(path, kind)
        except OSError:
            self._schedule(name, SETTLE_S)
            return
        if reason:
            unchanged_for = moment - entry.seen_at
            if unchanged_for >= self.give_up_s:
                self.deployer.not_an_archive(
                    entry, sig, f"{unopened_reason(path)} (unchanged for {self.give_up_s:g} s); "
                                "copy a whole archive over it to deploy it")
                return
            self.deployer.note_waiting(entry, reason, at_once=True)
            self._schedule(name, min(RECHECK_S, self.give_up_s - unchanged_for))
            return
        self.deployer.attempt(entry, path, sig)


def _seconds_from_env(name: str, default: float) -> float:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value > 0:
        return value
    log.warning("%s=%r is not a number of seconds above 0; using %gs", name, text, default)
    return default


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dockyard.app.deployfolder.watch",
                                     description="Watch a deploy folder (serve runs this).")
    parser.add_argument("--data", required=True, help="the data dir (for the admin token)")
    parser.add_argument("--folder", required=True)
    parser.add_argument("--server", required=True, help="the control plane's URL")
    parser.add_argument("--poll", type=float, help="poll every SECONDS instead of inotify")
    args = parser.parse_args(argv)
    from .. import LOG_FORMAT
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    data = DataDir.at(args.data)
    api = ControlPlane(Client(args.server, data.read_token("admin")))
    watcher = Watcher(Path(args.folder).absolute(), api, data.db_target, args.poll)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: watcher.stop())
    return watcher.run()


if __name__ == "__main__":
    sys.exit(main())
