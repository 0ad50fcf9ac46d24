"""What happens to an entry of the deploy folder once it is whole, or gone: it is uploaded
through the control plane's API, its deployment followed to the end, the container it deployed
removed with it, and each outcome written beside it as a marker."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

from ..store.engine import Database

from ...common.http_client import ClientError
from ...common.archive import read_package
from ...errors import DockyardError
from ..store.db import now
from .client import ControlPlane, Unreachable, failure_reason
from .entry import Entry, EntryState
from .files import (Kind, Marker, clear_markers, container_name, marker_path,
                          read_marker, write_marker)
from ..store import deployfolder as store

log = logging.getLogger("dockyard.deploywatch")

SETTLE_S = 1.0            # a package must stay unchanged this long before it is deployed
RETRY_S = 2.0             # after the control plane did not answer


class FolderDeployer:
    def __init__(self, folder: Path, api: ControlPlane, db: Database,
                 schedule: Callable[[str, float], None]):
        self.folder = folder
        self.api = api
        self.db = db
        self.schedule = schedule            # look at an entry again after a delay
        self.entries: dict[str, Entry] = {}
        self.deploying: set[str] = set()    # entries whose deployment is followed
        for record in store.load_entries(db, str(folder)):
            entry = Entry.from_record(record)
            self.entries[entry.name] = entry

    def entry(self, name: str, kind: Kind) -> Entry:
        entry = self.entries.get(name)
        if entry is None or entry.kind is not kind:
            entry = self.entries[name] = Entry(name, kind)
        return entry

    def skip(self, entry: Entry) -> None:
        if entry.state is not EntryState.SKIPPED:
            clear_markers(self.folder, entry.name, Marker.PENDING)
            self.set_state(entry, EntryState.SKIPPED)
            log.info("%s: skipped (%s%s is there)", entry.label, entry.name, Marker.SKIPDEPLOY)

    def note_waiting(self, entry: Entry, reason: str, at_once: bool = False) -> None:
        """`.pending` once a package has kept us waiting a whole settle window (a slow copy),
        or at once when it is still and not whole. Never `.failed`: it may yet arrive."""
        if entry.state is EntryState.PENDING and entry.error == reason:
            return
        if at_once or time.monotonic() - (entry.waiting_since or time.monotonic()) >= SETTLE_S:
            # Beside the other markers: a version deployed before keeps serving meanwhile.
            write_marker(self.folder, entry.name, Marker.PENDING, f"waiting: {reason}",
                         replace_others=False)
            entry.error = reason
            self.set_state(entry, EntryState.PENDING)

    def not_an_archive(self, entry: Entry, sig: tuple, reason: str) -> None:
        """An archive that stopped changing long ago and still does not open: `.failed`, and
        tried again once it changes."""
        entry.attempted, entry.waiting_since = sig, None
        self._fail(entry, reason)

    def attempt(self, entry: Entry, path: Path, sig: tuple) -> None:
        """Deploy the package as it is now (whole and still): refused if another entry holds
        its container name, else uploaded, and its deployment followed."""
        entry.attempted, entry.waiting_since = sig, None
        try:
            package = read_package(path)
        except FileNotFoundError:
            self.schedule(entry.name, 0.0)
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
        entry.refused_by = owner.name if owner else None
        if owner is not None:
            self._fail(entry, f"container '{declared}' is already deployed from {owner.label} "
                              "in this folder; rename one of them (name in dockyard.toml) or "
                              "remove one")
            return
        try:
            record = self.api.upload(package)
        except Unreachable as exc:
            log.warning("%s: %s; trying again", entry.label, exc)
            entry.attempted = None
            self.schedule(entry.name, RETRY_S)
            return
        except ClientError as exc:
            self._fail(entry, exc.message)
            return
        self._accepted(entry, record, sha256)

    def _owner(self, container: str | None, entry: Entry) -> Entry | None:
        """Another entry of the folder that holds this container name."""
        for other in self.entries.values():
            if (container and other is not entry and other.container == container
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
            self._delete_container(previous, entry,
                                   f"{entry.label} now declares '{entry.container}'")
        if record.get("deployment") is None or record.get("deployment_status") == "ready":
            self._deployed(entry)  # the same content again: nothing to build
            return
        if record.get("deployment_status") == "failed":
            # The same content that failed before, still the active version: the workers do
            # not build it again, so its outcome is known now.
            self._finish(entry)
            return
        serving = self.api.serving_version(entry.container)
        note = (f"; {entry.container}@{serving} keeps serving meanwhile"
                if serving and serving != entry.version else "")
        write_marker(self.folder, entry.name, Marker.DEPLOYING,
                     f"{entry.container}@{entry.version} deployment {entry.deployment}: "
                     f"building{note}")
        entry.deployed_marker, entry.error = False, None
        self.set_state(entry, EntryState.DEPLOYING)
        self.deploying.add(entry.name)
        log.info("%s: deploying %s@%s (deployment %s)", entry.label, entry.container,
                 entry.version, entry.deployment)

    def follow_deployments(self) -> None:
        for name in sorted(self.deploying):
            entry = self.entries.get(name)
            if entry is None or entry.state is not EntryState.DEPLOYING or self._finish(entry):
                self.deploying.discard(name)

    def _finish(self, entry: Entry) -> bool:
        """Write the outcome of the entry's deployment if it has one; False while it is
        still under way (or the control plane did not answer)."""
        what = f"{entry.container}@{entry.version} deployment {entry.deployment}"
        try:
            # The active version is read first: a deployment that fails gives the active
            # version back to the one before, in the same write. Read after the deployment,
            # that version would pass for one activated by other means.
            instead = (self.api.container(entry.container) or {}).get("active_version")
            deployment = self.api.deployment(entry.deployment)
            status = deployment["status"] if deployment else "gone"
        except (Unreachable, ClientError):
            return False
        if status == "ready":
            self._deployed(entry)
        elif status == "partial":
            # It serves (on some workers; the others retry): deployed, with what failed.
            self._deployed(entry, "partial: " + failure_reason(deployment))
        elif status == "failed":
            self._fail(entry, f"{what} failed: {failure_reason(deployment)}",
                       failed_version=entry.version)
        elif status == "superseded":
            self._fail(entry, f"{what} was not deployed: {failure_reason(deployment)}",
                       failed_version=entry.version)
        elif status == "gone":
            self._fail(entry, f"{what} is gone: {entry.container} was removed meanwhile",
                       failed_version=entry.version)
        elif instead and instead != entry.version:
            # Its deployment never finishes: another version was activated meanwhile.
            self._fail(entry, f"{what} was superseded: {entry.container}@{instead} was "
                              "activated by other means", failed_version=entry.version)
        else:
            return False
        return True

    def _deployed(self, entry: Entry, note: str | None = None) -> None:
        text = f"{entry.container}@{entry.version} deployment {entry.deployment}"
        if note:
            text += "; " + note.strip().splitlines()[0]
        if entry.deployed_marker and read_marker(self.folder, entry.name,
                                                 Marker.DEPLOYED) == text:
            clear_markers(self.folder, entry.name, Marker.PENDING, Marker.DEPLOYING,
                          Marker.FAILED, Marker.UNDEPLOYED)
        else:
            write_marker(self.folder, entry.name, Marker.DEPLOYED, text)
        entry.deployed_marker, entry.error = True, None
        self.set_state(entry, EntryState.DEPLOYED)
        log.info("%s: deployed %s", entry.label, text)

    def _fail(self, entry: Entry, reason: str, failed_version: str | None = None) -> None:
        """`.failed` with the reason in the API's words, and the version this entry deployed
        before if that one keeps serving."""
        reason = reason.strip().splitlines()[0] if reason.strip() else "failed"
        serving = self.api.serving_version(entry.container)
        if serving and serving != failed_version:
            reason += f"; {entry.container}@{serving} keeps serving"
        write_marker(self.folder, entry.name, Marker.FAILED, reason)
        entry.deployed_marker, entry.error = False, reason
        self.set_state(entry, EntryState.FAILED)
        log.warning("%s: failed: %s", entry.label, reason)

    # -- removal --------------------------------------------------------------------------

    def removed(self, entry: Entry) -> None:
        if entry.container and entry.state is not EntryState.UNDEPLOYED:
            if not self.undeploy(entry, f"{entry.name} was removed"):
                return
        elif entry.state is EntryState.UNDEPLOYED:
            if marker_path(self.folder, entry.name, Marker.UNDEPLOYED).exists():
                return  # listed as undeployed as long as its marker says so
            del self.entries[entry.name]
        else:
            clear_markers(self.folder, entry.name)  # nothing was deployed from it
            del self.entries[entry.name]
        for other in self.entries.values():
            if other.refused_by == entry.name:  # the name it wanted is free now
                other.attempted = None
                self.schedule(other.name, 0.0)
        self.save()

    def undeploy(self, entry: Entry, why: str) -> bool:
        """Remove the container this entry deployed and say so in `.undeployed`. False (and
        looked at again later) when the control plane did not answer."""
        text = self._delete_container(entry.container, entry, why)
        if text is None:
            self.schedule(entry.name, RETRY_S)
            return False
        write_marker(self.folder, entry.name, Marker.UNDEPLOYED, text)
        self.deploying.discard(entry.name)
        entry.forget_deployment()
        self.set_state(entry, EntryState.UNDEPLOYED)
        log.info("%s: %s", entry.label, text)
        return True

    def _delete_container(self, container: str | None, entry: Entry, why: str) -> str | None:
        """Delete the container if it still runs a version this entry uploaded (one
        activated by other means since is left alone). The line to show, or None."""
        try:
            detail = self.api.container(container) if container else None
            if detail is None:
                return f"{container or 'nothing'} undeployed: {why}"
            running = {detail.get("active_version"), detail.get("serving_version")}
            if not running & set(entry.versions):
                return (f"{container} left deployed: {why}, but it now runs "
                        f"{container}@{detail.get('active_version')}, which was not "
                        "deployed from this folder")
            self.api.delete(container)
        except (Unreachable, ClientError) as exc:
            log.warning("%s: cannot undeploy %s yet: %s", entry.label, container,
                        getattr(exc, "message", exc))
            return None
        return f"{container} undeployed: {why}"

    def set_state(self, entry: Entry, state: EntryState) -> None:
        entry.state, entry.updated_at = state, now()
        self.save()

    def save(self) -> None:
        store.save_entries(self.db, str(self.folder),
                           [e.record() for e in sorted(self.entries.values(),
                                                       key=lambda e: e.name)])
