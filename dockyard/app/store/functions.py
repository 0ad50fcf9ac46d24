"""What the Lambda-compatible API lists: each container's serving version (its `$LATEST`), or
every version, with the fields a function configuration is made of."""

from __future__ import annotations

from .engine import Database

_LAST_DEPLOYMENT = ("(SELECT d.{column} FROM deployments d WHERE d.version_id = v.id "
                    "ORDER BY d.created_at DESC, d.id DESC LIMIT 1)")
_COLUMNS = ("c.name AS container, v.version, v.manifest, v.content_sha256, v.artifact_size, "
            "v.created_at, CASE WHEN c.serving_version_id = v.id THEN 1 ELSE 0 END AS serving, "
            f"{_LAST_DEPLOYMENT.format(column='status')} AS deployment_status, "
            f"{_LAST_DEPLOYMENT.format(column='error')} AS deployment_error")


def serving(db: Database, container: str | None = None) -> list[dict]:
    """The serving version of each container that has one (of one container when named),
    by container name."""
    where, params = ("WHERE c.name = ?", [container]) if container else ("", [])
    return list(db.query(
        f"SELECT {_COLUMNS} FROM containers c JOIN versions v "
        f"ON v.id = coalesce(c.serving_version_id, c.active_version_id) {where} "
        "ORDER BY c.name", params))


def versions(db: Database, container: str | None = None) -> list[dict]:
    """Every version of every container (of one container when named), oldest first."""
    where, params = ("WHERE c.name = ?", [container]) if container else ("", [])
    return list(db.query(
        f"SELECT {_COLUMNS} FROM containers c JOIN versions v ON v.container_id = c.id "
        f"{where} ORDER BY c.name, v.created_at, v.id", params))
