"""One entry of the deploy folder (a package file or folder) as the watcher tracks it: its
state, what it deployed, and the record saved for GET /api/deploy-folder and the next
watcher."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .files import Kind

KEPT_VERSIONS = 20   # versions remembered per entry (to know what it may undeploy)


class EntryState(str, enum.Enum):
    SETTLING = "settling"       # seen changing; looked at once it stays still
    PENDING = "pending"         # still being written, or an archive that is not whole yet
    DEPLOYING = "deploying"     # accepted by the control plane, building on the workers
    DEPLOYED = "deployed"
    FAILED = "failed"
    UNDEPLOYED = "undeployed"
    SKIPPED = "skipped"         # a .skipdeploy file is beside it

    def __str__(self) -> str:
        return self.value


SAVED = ("name", "kind", "state", "container", "version", "deployment", "error", "sha256",
         "versions", "deployed_marker", "refused_by", "updated_at")


@dataclass
class Entry:
    name: str
    kind: Kind
    state: EntryState = EntryState.SETTLING
    container: str | None = None      # the container this entry deployed (what to undeploy)
    version: str | None = None
    deployment: str | None = None
    error: str | None = None          # why it failed, or what it is waiting for
    sha256: str | None = None         # of the package uploaded last
    versions: list[str] = field(default_factory=list)  # uploaded from this entry, newest last
    deployed_marker: bool = False     # `.deployed` written and not removed by us since
    refused_by: str | None = None     # the entry that holds the container name it declares
    updated_at: float = 0.0
    # What this watcher process saw (not saved).
    seen: tuple | None = None         # the signature at the last look
    seen_at: float = 0.0              # when it last changed (monotonic)
    attempted: tuple | None = None    # the signature of the last attempt
    waiting_since: float | None = None
    checked: bool = False             # uploaded by this process at least once

    @property
    def label(self) -> str:
        return self.name + ("/" if self.kind is Kind.FOLDER else "")

    def uploaded(self, version: str) -> None:
        if version in self.versions:
            self.versions.remove(version)
        self.versions = (self.versions + [version])[-KEPT_VERSIONS:]

    def forget_deployment(self) -> None:
        self.container = self.version = self.deployment = self.error = None
        self.deployed_marker, self.versions, self.attempted = False, [], None

    def record(self) -> dict:
        out = {key: getattr(self, key) for key in SAVED}
        out["kind"], out["state"] = str(self.kind), str(self.state)
        return out

    @classmethod
    def from_record(cls, record: dict) -> "Entry":
        entry = cls(**{key: record[key] for key in SAVED if key in record})
        entry.kind, entry.state = Kind(entry.kind), EntryState(entry.state)
        entry.versions = list(entry.versions or [])
        return entry
