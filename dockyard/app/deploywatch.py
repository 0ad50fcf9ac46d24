"""The deploy-folder watcher, its own process under `serve`: a package dropped into the folder
is deployed through the control plane's upload API once it is whole, a package removed is
undeployed, and the outcome is written beside each one as a marker file, after WildFly's
deployment scanner. An initial scan, then watchdog events (inotify, or polling)."""

from __future__ import annotations

import argparse
import hashlib
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

from ..cli.client import Client, ClientError
from ..common.archive import read_package
from ..errors import DockyardError
from .datadir import DataDir
from .db import connect, now
from .deployentry import Entry, EntryState
from .deployfiles import (Kind, Marker, clear_markers, container_name, entry_of,
                          incomplete_reason, kind_of, marker_path, read_marker, signature,
                          write_marker)
from .store import deployfolder as store

log = logging.getLogger("dockyard.deploywatch")

SETTLE_S = 1.0            # a package must stay unchanged this long before it is deployed
RECHECK_S = 1.0           # how often an archive that is not whole yet is looked at again
FOLLOW_S = 0.25           # how often a deployment under way is asked for its progress
RETRY_S = 2.0             # after the control plane could not be reached
FOLDER_GONE_EXIT = 3      # the watched folder vanished: serve stops watching it


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
    def __init__(self, folder: Path, client: Client, db_path: Path, poll_s: float | None = None):
        self.folder = folder
        self.client = client
        self.db = connect(db_path)
        self.poll_s = poll_s
        self.events: queue.Queue[str | None] = queue.Queue()
        self.entries: dict[str, Entry] = {}
        self.due: dict[str, float] = {}
        self.deploying: set[str] = set()
        self.stopping = False

    def stop(self) -> None:
        """From a signal handler: only enqueue."""
        self.stopping = True
        self.events.put(None)

    def run(self) -> int:
        for record in store.load_entries(self.db, str(self.folder)):
            entry = Entry.from_record(record)
            self.entries[entry.name] = entry
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
            self.db.conn.close()
        return 0

    def _observer(self):
        handler = _Forward(self.events)
        if self.poll_s:
            observer = PollingObserver(timeout=self.poll_s)
            kind = f"polling every {self.poll_s:g}s"
        else:
            observer, kind = Observer(), "inotify"
        try:
            observer.schedule(handler, str(self.folder), recursive=True)
            observer.start()
        except OSError as exc:
            if self.poll_s:
                raise
            # No inotify here (or its watch limit is reached): polling sees the same changes.
            log.warning("inotify cannot watch %s (%s); polling every 2s instead",
                        self.folder, exc.strerror or exc)
            observer = PollingObserver(timeout=2.0)
            observer.schedule(handler, str(self.folder), recursive=True)
            observer.start()
            kind = "polling every 2s (inotify unavailable)"
        return observer, kind

    def _initial_scan(self) -> None:
        """Look at everything once: what is in the folder, and what was there when the last
        watcher stopped (removed meanwhile, it is undeployed). Oldest first, so that of two
        packages declaring one container the older keeps it."""
        present = []
        for child in self.folder.iterdir():
            found = entry_of(self.folder, child)
            if found and kind_of(self.folder / found[0]) is not None:
                present.append(found[0])
        start = time.monotonic()
        present = sorted(set(present), key=lambda n: (_mtime(self.folder / n), n))
        for rank, name in enumerate(sorted(set(self.entries) - set(present)) + present):
            self.due[name] = start + rank * 1e-6

    # -- the loop ---------------------------------------------------------------------------

    def _loop(self) -> None:
        next_follow = 0.0
        while not self.stopping:
            wake = min(self.due.values(), default=time.monotonic() + 5.0)
            if self.deploying:
                wake = min(wake, next_follow)
            self._take_events(max(0.0, wake - time.monotonic()))
            current = time.monotonic()
            for name in sorted((n for n, t in self.due.items() if t <= current),
                               key=self.due.get):
                if self.stopping:
                    return
                del self.due[name]
                self._look(name)
            if self.deploying and time.monotonic() >= next_follow:
                self._follow_deployments()
                next_follow = time.monotonic() + FOLLOW_S

    def _take_events(self, timeout: float) -> None:
        try:
            path = self.events.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            if path is None:
                return
            self._on_change(path)
            try:
                path = self.events.get_nowait()
            except queue.Empty:
                return

    def _on_change(self, path: str) -> None:
        found = entry_of(self.folder, path)
        if found is None:
            return
        name, marker = found
        if marker is None:
            self._changed(name)
        elif marker in (Marker.DEPLOYED, Marker.UNDEPLOYED, Marker.SKIPDEPLOY):
            self._schedule(name, 0.0)  # a user removed a marker, or asked to skip

    def _changed(self, name: str) -> None:
        """Debounce: every change restarts the entry's settle window."""
        self._schedule(name, SETTLE_S)
        path = self.folder / name
        kind = kind_of(path)
        if kind is None:
            return
        entry = self._entry(name, kind)
        try:
            sig = signature(path, kind)
        except OSError:
            return
        if sig != entry.seen:
            entry.seen, entry.seen_at = sig, time.monotonic()
            if sig != entry.attempted and entry.waiting_since is None:
                entry.waiting_since = entry.seen_at
        if entry.waiting_since is not None and entry.state is not EntryState.SKIPPED:
            self._note_waiting(entry, "it is still being written")

    def _entry(self, name: str, kind: Kind) -> Entry:
        entry = self.entries.get(name)
        if entry is None or entry.kind is not kind:
            entry = self.entries[name] = Entry(name, kind)
        return entry

    def _schedule(self, name: str, delay: float) -> None:
        self.due[name] = time.monotonic() + delay

    # -- one entry --------------------------------------------------------------------------

    def _look(self, name: str) -> None:
        if not self.folder.is_dir():
            raise FolderGone()
        path = self.folder / name
        entry = self.entries.get(name)
        kind = kind_of(path)
        if kind is None:
            if entry is not None and not path.exists():
                self._removed(entry)
            return
        entry = self._entry(name, kind)
        if marker_path(self.folder, name, Marker.SKIPDEPLOY).exists():
            if entry.state is not EntryState.SKIPPED:
                clear_markers(self.folder, name, Marker.PENDING)
                self._set(entry, EntryState.SKIPPED)
                log.info("%s: skipped (%s%s is there)", entry.label, name, Marker.SKIPDEPLOY)
            return
        if entry.deployed_marker and not marker_path(self.folder, name, Marker.DEPLOYED).exists():
            if self._undeploy(entry, f"{name}{Marker.DEPLOYED} was removed"):
                entry.attempted = entry.seen  # deployed again once the package changes
            else:
                self._schedule(name, RETRY_S)
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
        if entry.waiting_since is None:
            entry.waiting_since = moment
        if moment - entry.seen_at < SETTLE_S:
            self._note_waiting(entry, "it is still being written")
            self._schedule(name, entry.seen_at + SETTLE_S - moment)
            return
        try:
            reason = incomplete_reason(path, kind)
        except OSError:
            self._schedule(name, SETTLE_S)
            return
        if reason:
            self._note_waiting(entry, reason, now_or_later=True)
            self._schedule(name, RECHECK_S)
            return
        self._attempt(entry, path, sig)

    def _note_waiting(self, entry: Entry, reason: str, now_or_later: bool = False) -> None:
        """`.pending` once a package has kept us waiting a whole settle window (a slow copy),
        or at once when it is still and not whole. Never `.failed`: it may yet arrive."""
        waited = time.monotonic() - (entry.waiting_since or time.monotonic())
        if entry.state is EntryState.PENDING and entry.error == reason:
            return
        if now_or_later or waited >= SETTLE_S:
            # Beside the other markers: a version deployed before keeps serving meanwhile.
            write_marker(self.folder, entry.name, Marker.PENDING, f"waiting: {reason}",
                         replace_others=False)
            entry.error = reason
            self._set(entry, EntryState.PENDING)

    def _attempt(self, entry: Entry, path: Path, sig: tuple) -> None:
        entry.attempted, entry.waiting_since = sig, None
        try:
            package = read_package(path)
        except FileNotFoundError:
            self._schedule(entry.name, 0.0)
            return
        except (OSError, DockyardError) as exc:
            self._fail(entry, getattr(exc, "message", None) or str(exc))
            return
        sha256 = hashlib.sha256(package).hexdigest()
        if (entry.checked and entry.state is EntryState.DEPLOYED and entry.deployed_marker
                and sha256 == entry.sha256):
            clear_markers(self.folder, entry.name, Marker.PENDING)
            return  # touched, or saved without a change
        declared = container_name(path, entry.kind)
        owner = self._owner(declared, entry)
        if owner is not None:
            entry.refused_by = owner.name
            self._fail(entry, f"container '{declared}' is already deployed from {owner.label} "
                              "in this folder; rename one of them (name in dockyard.toml) or "
                              "remove one")
            return
        entry.refused_by = None
        try:
            record = self.client.upload(package)
        except ClientError as exc:
            if getattr(exc, "status", None) is None:  # the control plane is not reachable
                log.warning("%s: %s; trying again", entry.label, exc.message)
                entry.attempted = None
                self._schedule(entry.name, RETRY_S)
                return
            self._fail(entry, exc.message)
            return
        self._accepted(entry, record, sha256)

    def _owner(self, container: str | None, entry: Entry) -> Entry | None:
        if container is None:
            return None
        for other in self.entries.values():
            if (other is not entry and other.container == container
                    and other.state is not EntryState.UNDEPLOYED
                    and (self.folder / other.name).exists()):
                return other
        return None

    def _accepted(self, entry: Entry, record: dict, sha256: str) -> None:
        previous = entry.container
        entry.container, entry.version = record["container"], record["version"]
        entry.deployment, entry.sha256, entry.checked = record.get("deployment"), sha256, True
        entry.uploaded(entry.version)
        if previous and previous != entry.container:
            self._delete_container(previous, entry, f"{entry.label} now declares "
                                                    f"'{entry.container}'")
        if record.get("deployment") is None or record.get("deployment_status") == "ready":
            self._deployed(entry)
            return
        serving = self._serving_version(entry.container)
        note = (f"; {entry.container}@{serving} keeps serving meanwhile"
                if serving and serving != entry.version else "")
        write_marker(self.folder, entry.name, Marker.DEPLOYING,
                     f"{entry.container}@{entry.version} deployment {entry.deployment}: "
                     f"building{note}")
        entry.deployed_marker, entry.error = False, None
        self._set(entry, EntryState.DEPLOYING)
        self.deploying.add(entry.name)
        log.info("%s: deploying %s@%s (deployment %s)", entry.label, entry.container,
                 entry.version, entry.deployment)

    def _follow_deployments(self) -> None:
        for name in sorted(self.deploying):
            entry = self.entries.get(name)
            if entry is None or entry.state is not EntryState.DEPLOYING:
                self.deploying.discard(name)
                continue
            try:
                deployment = self.client.json("GET", f"/api/deployments/{entry.deployment}")
            except ClientError as exc:
                if getattr(exc, "status", None) == 404:
                    self.deploying.discard(name)
                    self._fail(entry, f"deployment {entry.deployment} is gone: "
                                      f"{entry.container} was removed meanwhile")
                continue  # not reachable: asked again next round
            if deployment["status"] == "ready":
                self.deploying.discard(name)
                self._deployed(entry)
            elif deployment["status"] == "failed":
                self.deploying.discard(name)
                self._fail(entry, f"{entry.container}@{entry.version} deployment "
                                  f"{entry.deployment} failed: {_failure(deployment)}",
                           failed_version=entry.version)
            elif (other := self._superseded_by(entry)) is not None:
                self.deploying.discard(name)
                self._fail(entry, f"{entry.container}@{entry.version} deployment "
                                  f"{entry.deployment} was superseded: {entry.container}@"
                                  f"{other} was activated by other means",
                           failed_version=entry.version)

    def _deployed(self, entry: Entry) -> None:
        text = f"{entry.container}@{entry.version} deployment {entry.deployment}"
        if entry.deployed_marker and read_marker(self.folder, entry.name,
                                                 Marker.DEPLOYED) == text:
            clear_markers(self.folder, entry.name, Marker.PENDING, Marker.DEPLOYING,
                          Marker.FAILED, Marker.UNDEPLOYED)
        else:
            write_marker(self.folder, entry.name, Marker.DEPLOYED, text)
        entry.deployed_marker, entry.error = True, None
        self._set(entry, EntryState.DEPLOYED)
        log.info("%s: deployed %s", entry.label, text)

    def _fail(self, entry: Entry, reason: str, failed_version: str | None = None) -> None:
        """`.failed` with the reason in the API's words, and the version this entry deployed
        before if that one keeps serving."""
        reason = reason.strip().splitlines()[0] if reason.strip() else "failed"
        serving = self._serving_version(entry.container)
        if serving and serving != failed_version:
            reason += f"; {entry.container}@{serving} keeps serving"
        write_marker(self.folder, entry.name, Marker.FAILED, reason)
        entry.deployed_marker, entry.error = False, reason
        self._set(entry, EntryState.FAILED)
        log.warning("%s: failed: %s", entry.label, reason)

    def _removed(self, entry: Entry) -> None:
        self.due.pop(entry.name, None)
        if entry.container and entry.state is not EntryState.UNDEPLOYED:
            if not self._undeploy(entry, f"{entry.name} was removed"):
                self._schedule(entry.name, RETRY_S)
                return
        elif entry.state is EntryState.UNDEPLOYED:
            if marker_path(self.folder, entry.name, Marker.UNDEPLOYED).exists():
                return  # listed as undeployed while its marker says so
            del self.entries[entry.name]
        else:
            clear_markers(self.folder, entry.name)
            del self.entries[entry.name]
        for other in self.entries.values():
            if other.refused_by == entry.name:
                other.attempted = None
                self._schedule(other.name, 0.0)
        self._save()

    def _undeploy(self, entry: Entry, why: str) -> bool:
        """Remove the container this entry deployed and say so in `.undeployed`. False when
        the control plane cannot be reached (the caller tries again)."""
        container = entry.container
        text = self._delete_container(container, entry, why) if container else None
        if text is False:
            return False
        write_marker(self.folder, entry.name, Marker.UNDEPLOYED,
                     text or f"nothing to undeploy: {why}")
        self.deploying.discard(entry.name)
        entry.forget_deployment()
        self._set(entry, EntryState.UNDEPLOYED)
        log.info("%s: %s", entry.label, text)
        return True

    def _delete_container(self, container: str, entry: Entry, why: str):
        """Delete the container if it still runs a version this entry uploaded (one deployed
        by other means since is left alone). Returns the line to show, or False."""
        try:
            detail = self.client.json("GET", f"/api/containers/{container}")
        except ClientError as exc:
            if getattr(exc, "status", None) != 404:
                log.warning("%s: cannot undeploy %s yet: %s", entry.label, container,
                            exc.message)
                return False
            return f"{container} undeployed: {why}"
        ours = {detail.get("active_version"), detail.get("serving_version")} & set(entry.versions)
        if not ours:
            return (f"{container} left deployed: {why}, but it now runs "
                    f"{container}@{detail.get('active_version')}, which was not deployed "
                    "from this folder")
        try:
            self.client.request("DELETE", f"/api/containers/{container}", expect=(200, 404))
        except ClientError as exc:
            log.warning("%s: cannot undeploy %s yet: %s", entry.label, container, exc.message)
            return False
        return f"{container} undeployed: {why}"

    def _superseded_by(self, entry: Entry) -> str | None:
        """The version activated instead of ours while ours was building, if any (its
        deployment then never finishes)."""
        try:
            detail = self.client.json("GET", f"/api/containers/{entry.container}")
        except ClientError:
            return None
        active = detail.get("active_version")
        return active if active and active != entry.version else None

    def _serving_version(self, container: str | None) -> str | None:
        if not container:
            return None
        try:
            return self.client.json("GET", f"/api/containers/{container}").get("serving_version")
        except ClientError:
            return None

    def _set(self, entry: Entry, state: EntryState) -> None:
        entry.state, entry.updated_at = state, now()
        self._save()

    def _save(self) -> None:
        store.save_entries(self.db, str(self.folder),
                           [e.record() for e in sorted(self.entries.values(),
                                                       key=lambda e: e.name)])


def _failure(deployment: dict) -> str:
    """The reason a deployment failed, from its workers' reports and build logs."""
    reason = deployment.get("error") or ""
    for worker in deployment.get("workers") or []:
        reason = reason or worker.get("error") or ""
    return reason.strip().splitlines()[0] if reason.strip() else "the version failed to start"


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dockyard.app.deploywatch",
                                     description="Watch a deploy folder (run by serve).")
    parser.add_argument("--data", required=True, help="the data dir (for the admin token)")
    parser.add_argument("--folder", required=True)
    parser.add_argument("--server", required=True, help="the control plane's URL")
    parser.add_argument("--poll", type=float, help="poll every SECONDS instead of inotify")
    args = parser.parse_args(argv)
    from . import LOG_FORMAT
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    data = DataDir.at(args.data)
    watcher = Watcher(Path(args.folder).absolute(), Client(args.server, data.read_token("admin")),
                      data.db_path, args.poll)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: watcher.stop())
    return watcher.run()


if __name__ == "__main__":
    sys.exit(main())
