"""Process and version states, and the one place a state changes (so every change is logged)."""

from __future__ import annotations

import enum
import logging

from ..common import protocol

log = logging.getLogger("dockyard.states")


class ProcessState(str, enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    EXITED = "exited"

    def __str__(self) -> str:
        return self.value


class VersionState(str, enum.Enum):
    """The protocol's version states (common/protocol.py), as an enum for the worker."""

    STANDBY = protocol.VersionState.STANDBY
    BUILDING = protocol.VersionState.BUILDING
    STARTING = protocol.VersionState.STARTING
    READY = protocol.VersionState.READY
    IDLE = protocol.VersionState.IDLE
    DRAINING = protocol.VersionState.DRAINING
    STOPPED = protocol.VersionState.STOPPED
    FAILED = protocol.VersionState.FAILED

    def __str__(self) -> str:
        return self.value


def change_state(owner, new, what: str) -> None:
    """Set `owner.state` to `new` and log the transition once."""
    old = getattr(owner, "state", None)
    if old == new:
        return
    owner.state = new
    log.info("%s: %s -> %s", what, old, new)
