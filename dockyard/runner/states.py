"""Process and version states, and the one place a state changes (so every change is logged)."""

from __future__ import annotations

import enum
import logging

log = logging.getLogger("dockyard.states")


class ProcessState(str, enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    EXITED = "exited"

    def __str__(self) -> str:
        return self.value


class VersionState(str, enum.Enum):
    STANDBY = "standby"      # known, started on demand for pinned calls
    BUILDING = "building"    # fetching the artifact, building the venv
    STARTING = "starting"    # children booting
    READY = "ready"          # children serving
    IDLE = "idle"            # built, scaled to zero; starts on the first call
    DRAINING = "draining"    # finishing in-flight calls before stopping
    STOPPED = "stopped"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


def change_state(owner, new, what: str) -> None:
    """Set `owner.state` to `new` and log the transition once."""
    old = getattr(owner, "state", None)
    if old == new:
        return
    owner.state = new
    log.info("%s: %s -> %s", what, old, new)
