"""The deploy folder: packages dropped into it are deployed, and the outcome is written beside
each as a marker (`X.deployed` with the version, `X.failed` with the reason), after WildFly's
deployment scanner. An initial scan on start, then watchdog events (debounced, deployed only
once a file's size is stable)."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from ..errors import DockyardError
from .client import Client, package_bytes

log = logging.getLogger("dockyard.deploydir")

ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz")
MARKERS = (".deployed", ".failed", ".deploying")
SETTLE_S = 0.5


def is_package(path: Path) -> bool:
    if path.name.startswith(".") or path.name.endswith(MARKERS):
        return False
    if path.is_dir():
        return (path / "dockyard.toml").is_file()
    return path.is_file() and path.name.endswith(ARCHIVE_SUFFIXES)


class DeployFolder:
    def __init__(self, folder: Path, url: str, token: str | None):
        self.folder = folder
        self.client = Client(url, token)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="deploy-folder", daemon=True)
        self.seen: dict[Path, tuple] = {}

    def start(self) -> None:
        if not self.folder.is_dir():
            log.warning("deploy folder %s does not exist; nothing to scan", self.folder)
            return
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread.is_alive():
            self.thread.join(timeout=5)

    def _signature(self, path: Path) -> tuple:
        if path.is_dir():
            return tuple(sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                                for p in path.rglob("*") if p.is_file()
                                and "__pycache__" not in p.parts))
        st = path.stat()
        return (st.st_size, st.st_mtime_ns)

    def _run(self) -> None:
        # Poll-based scan: a change is deployed once its signature stayed the same for
        # SETTLE_S, so half-written files are never deployed.
        pending: dict[Path, tuple[tuple, float]] = {}
        while not self.stop_event.is_set():
            try:
                for path in sorted(self.folder.iterdir()):
                    if not is_package(path):
                        continue
                    signature = self._signature(path)
                    if self.seen.get(path) == signature:
                        continue
                    previous = pending.get(path)
                    now = time.monotonic()
                    if previous is None or previous[0] != signature:
                        pending[path] = (signature, now)
                    elif now - previous[1] >= SETTLE_S:
                        del pending[path]
                        self.seen[path] = signature
                        self.deploy(path)
            except OSError as exc:
                log.warning("deploy folder scan: %s", exc)
            self.stop_event.wait(0.25)

    def deploy(self, path: Path) -> None:
        for suffix in MARKERS:
            Path(str(path) + suffix).unlink(missing_ok=True)
        try:
            record = self.client.upload(package_bytes(path))
        except DockyardError as exc:
            log.warning("deploy folder: %s failed: %s", path.name, exc.message)
            Path(str(path) + ".failed").write_text(exc.message.splitlines()[0] + "\n")
            return
        Path(str(path) + ".deployed").write_text(record["version"] + "\n")
        log.info("deploy folder: %s -> %s@%s", path.name, record["container"], record["version"])
