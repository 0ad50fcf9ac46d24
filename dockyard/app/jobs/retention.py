"""Retention, so that a data dir does not grow without bound: old invocation records, old
versions of every container (the rule of `dockyard versions prune`), old job runs and
workers stopped or lost long ago (`serve --forget-workers-after`). The
scheduler runs it every `--prune-every` while it holds its lease (one place per data dir);
every delete is batched, so no write lock is held long."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..store.engine import Database

from ..artifacts import ArtifactStore
from ..store import containers, invocations, job_runs
from ..store import workers as worker_store

log = logging.getLogger("dockyard.retention")

DEFAULT_KEEP_INVOCATIONS_S = 7 * 86400.0
DEFAULT_KEEP_VERSIONS = 10
DEFAULT_PRUNE_EVERY_S = 60.0
DEFAULT_FORGET_WORKERS_S = 600.0


@dataclass
class Retention:
    invocations_s: float | None = DEFAULT_KEEP_INVOCATIONS_S   # None: keep every record
    versions: int | None = DEFAULT_KEEP_VERSIONS               # None: keep every version
    every_s: float = DEFAULT_PRUNE_EVERY_S
    forget_workers_s: float | None = DEFAULT_FORGET_WORKERS_S   # None: keep every worker

    def describe(self) -> dict:
        return {"keep_invocations_s": self.invocations_s, "keep_versions": self.versions,
                "prune_every_s": self.every_s, "forget_workers_after_s": self.forget_workers_s}


def setting(text: str, parse):
    """A retention setting as given to serve: `0` or `off` is None (keep everything)."""
    if text.strip().lower() in ("off", "none", "no", "0"):
        return None
    return parse(text) or None


def prune_versions(db: Database, artifacts: ArtifactStore, name: str, keep: int,
                   dry_run: bool = False) -> dict:
    """containers.prune_versions, then the artifacts that no version uses any more."""
    result = containers.prune_versions(db, name, keep, dry_run)
    removed: list[str] = []
    if result["deleted"] and not dry_run:
        removed = artifacts.remove_unused(
            sorted({v["artifact_sha256"] for v in result["deleted"]}),
            lambda sha256s: containers.artifacts_in_use(db, sha256s))
    result["artifacts_removed"] = removed
    return result


def run(db: Database, artifacts: ArtifactStore, settings: Retention,
        t: float) -> dict:
    """One retention pass; returns how much each part removed."""
    done = {"job_runs": job_runs.prune(db, t), "invocations": 0, "versions": 0, "workers": 0}
    if settings.forget_workers_s:
        done["workers"] = worker_store.forget_gone(db, settings.forget_workers_s, t)
    if settings.invocations_s:
        done["invocations"] = invocations.prune(db, t - settings.invocations_s)
    if settings.versions:
        for name in containers.container_names(db):
            try:
                result = prune_versions(db, artifacts, name, settings.versions)
            except containers.NotFound:
                continue   # deleted meanwhile
            done["versions"] += len(result["deleted"])
    if any(done.values()):
        log.info("retention removed %d job run(s), %d invocation record(s), %d version(s), "
                 "%d gone worker(s)", done["job_runs"], done["invocations"], done["versions"],
                 done["workers"])
    return done
