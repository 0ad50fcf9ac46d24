"""Retention, so that a data dir does not grow without bound: old versions of a container
(`dockyard versions prune`)."""

from __future__ import annotations

import sqlite_utils

from .artifacts import ArtifactStore
from .store import containers


def prune_versions(db: sqlite_utils.Database, artifacts: ArtifactStore, name: str, keep: int,
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
