"""What a worker remembers across its restarts: the versions whose code failed to load for a
deployment (a failure no retry changes: see versions.FINAL_REASONS). Started again, the
worker reports such a version failed with the same reason and log instead of building it
again; a new deployment of the version (a deploy of the same code again) tries it anew."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger("dockyard.worker")

KEPT_LOG_LINES = 60


class FailureMemory:
    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()
        try:
            loaded = json.loads(path.read_text())
            self.entries: dict[str, dict] = loaded if isinstance(loaded, dict) else {}
        except FileNotFoundError:
            self.entries = {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring %s (%s): failed versions are built again", path, exc)
            self.entries = {}

    @staticmethod
    def _key(spec: dict) -> str:
        return str(spec["version_id"])

    def recall(self, spec: dict) -> dict | None:
        """The failure kept for this version, content and deployment, if any."""
        entry = self.entries.get(self._key(spec))
        if (isinstance(entry, dict) and entry.get("deployment") == spec.get("deployment")
                and entry.get("content") == spec.get("content_sha256")):
            return entry
        return None

    def remember(self, spec: dict, reason: str, log_lines: list[str]) -> None:
        with self.lock:
            self.entries[self._key(spec)] = {
                "deployment": spec.get("deployment"), "content": spec.get("content_sha256"),
                "reason": reason, "log": list(log_lines[-KEPT_LOG_LINES:])}
            self._save()

    def forget(self, version_id: int) -> None:
        with self.lock:
            if self.entries.pop(str(version_id), None) is not None:
                self._save()

    def _save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(self.entries, f)
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("cannot keep the failed versions in %s: %s", self.path, exc)
