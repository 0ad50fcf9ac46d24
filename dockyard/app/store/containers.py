"""Containers, their versions and deployments."""

from __future__ import annotations

import json
import secrets

from .engine import Database

from ...common.protocol import DeploymentStatus, Role, VersionState
from ...common.manifest import Manifest
from ...errors import BadRequest, Conflict, NotFound, Unavailable
from .db import now, transaction
from .routing import shares
from .workers import deployment_log_base, live_worker_ids, own_log

# Versions a worker is told to keep running, besides the one serving traffic.
ROLE_SERVE = Role.SERVE
ROLE_STANDBY = Role.STANDBY


def version_record(row: dict, container: dict | None = None) -> dict:
    manifest = json.loads(row["manifest"])
    out = {
        "id": row["id"],
        "container": container["name"] if container else manifest["name"],
        "version": row["version"],
        "content_sha256": row["content_sha256"],
        "artifact_sha256": row["artifact_sha256"],
        "artifact_size": row["artifact_size"],
        "created_at": row["created_at"],
        "functions": manifest.get("functions", {}),
        "limits": manifest.get("limits", {}),
        "dependencies": manifest.get("dependencies", []),
    }
    if container is not None:
        out["active"] = container["active_version_id"] == row["id"]
        out["serving"] = container["serving_version_id"] == row["id"]
    return out


def get_container(db: Database, name: str) -> dict:
    rows = list(db.query("SELECT * FROM containers WHERE name = ?", [name]))
    if not rows:
        raise NotFound(f"no container named '{name}'; `dockyard ls` lists them")
    return rows[0]


def get_version(db: Database, container: dict, version: str) -> dict:
    rows = list(db.query("SELECT * FROM versions WHERE container_id = ? AND version = ?",
                         [container["id"], version]))
    if not rows:
        raise NotFound(f"container '{container['name']}' has no version '{version}'; "
                       f"`dockyard versions {container['name']}` lists them")
    return rows[0]


def add_version(db: Database, manifest: Manifest, content_sha256: str,
                artifact_sha256: str, artifact_size: int, activate: bool) -> tuple[dict, dict, bool]:
    """Record an uploaded package. Returns (container, version row, created). The same content
    is the same version (a no-op); the same version name with other content is a conflict."""
    with transaction(db):
        t = now()
        rows = list(db.query("SELECT * FROM containers WHERE name = ?", [manifest.name]))
        if rows:
            container = rows[0]
        else:
            cid = db["containers"].insert({"name": manifest.name, "created_at": t,
                                           "updated_at": t}).last_pk
            container = db["containers"].get(cid)
        name = manifest.version or content_sha256[:12]
        existing = list(db.query(
            "SELECT * FROM versions WHERE container_id = ? AND version = ?",
            [container["id"], name]))
        created = False
        if existing:
            version = existing[0]
            if version["content_sha256"] != content_sha256:
                raise Conflict(
                    f"version '{name}' of '{manifest.name}' already exists with other content; "
                    "bump `version` in dockyard.toml (or leave it out to use the content hash)")
        else:
            vid = db["versions"].insert({
                "container_id": container["id"], "version": name,
                "content_sha256": content_sha256, "artifact_sha256": artifact_sha256,
                "artifact_size": artifact_size, "manifest": json.dumps(manifest.to_dict()),
                "created_at": t}).last_pk
            version = db["versions"].get(vid)
            created = True
        if activate:
            container = _activate(db, container, version)
    return container, version, created


def _activate(db: Database, container: dict, version: dict,
              require_worker: bool = False) -> dict:
    latest = latest_deployment(db, version["id"])
    retry = False
    if container["active_version_id"] == version["id"]:
        # Deployed again while it failed somewhere: a new deployment, which every worker that
        # failed tries at once (its backoff starts over).
        if latest is None or latest["status"] not in (DeploymentStatus.FAILED,
                                                      DeploymentStatus.SUPERSEDED,
                                                      DeploymentStatus.PARTIAL):
            return container
        retry = True
    if require_worker and not live_worker_ids(db):
        active = version_name(db, container["active_version_id"])
        raise Unavailable(
            f"no worker is connected to deploy {container['name']}@{version['version']}; "
            "nothing changed" + (f" ({container['name']}@{active} stays active)" if active
                                 else "") + "; start one with `dockyard worker` (or `dockyard "
            "serve` without --no-local-worker) and try again", retry_after=5)
    t = now()
    deployment_id = "dep_" + secrets.token_hex(8)
    _begin_deployment_logs(db, version["id"], latest, deployment_id)
    # A new deployment is judged on the workers' reports about it alone: what they reported
    # about an earlier one (a failure, or `idle` from a start on demand for a pinned call) is
    # forgotten, and each worker's next report about the new deployment counts (heartbeats
    # about an earlier deployment are ignored). Only the version serving now keeps its rows,
    # so its traffic never loses its workers meanwhile (a failure is forgotten even there).
    serving = container["serving_version_id"] == version["id"] and (
        not retry or latest["status"] == DeploymentStatus.PARTIAL)
    db.execute("DELETE FROM worker_versions WHERE version_id = ?" +
                    (" AND state = 'failed'" if serving else ""), [version["id"]])
    # A deployment of this container still under way is over: superseded by this one.
    db.execute(
        "UPDATE deployments SET status = 'superseded', finished_at = ?, error = ? "
        "WHERE container_id = ? AND status IN ('pending', 'in_progress')",
        [t, f"superseded: {container['name']}@{version['version']} was deployed "
            f"({deployment_id}) before this deployment finished", container["id"]])
    if container["active_version_id"] != version["id"]:
        _end_split(db, container["id"])
    db["containers"].update(container["id"], {"active_version_id": version["id"],
                                               "updated_at": t})
    db["deployments"].insert({"id": deployment_id,
                              "container_id": container["id"], "version_id": version["id"],
                              "status": "pending", "created_at": t})
    return db["containers"].get(container["id"])


def _end_split(db: Database, container_id: int) -> None:
    """A deploy, a rollback or an undeploy ends the container's traffic split (see
    traffic.py): the version it makes active takes all the traffic."""
    db.execute("DELETE FROM traffic_splits WHERE container_id = ?", [container_id])


def version_name(db: Database, version_id: int | None) -> str | None:
    row = db.execute("SELECT version FROM versions WHERE id = ?", [version_id]).fetchone()
    return row[0] if row else None


def _begin_deployment_logs(db: Database, version_id: int,
                           previous: dict | None, deployment_id: str) -> None:
    """A new deployment of a version that workers already hold: each worker's log so far
    belongs to the earlier deployment (kept with it, as it ended), not to the new one."""
    conn = db
    rows = conn.execute("SELECT worker_id, state, error, log FROM worker_versions "
                        "WHERE version_id = ?", [version_id]).fetchall()
    for worker_id, state, error, log in rows:
        if previous is not None:
            base = deployment_log_base(db, previous["id"], worker_id)
            conn.execute(
                "INSERT INTO deployment_workers (deployment_id, worker_id, state, error, log) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (deployment_id, worker_id) DO UPDATE SET "
                "state = excluded.state, error = excluded.error, log = excluded.log",
                [previous["id"], worker_id, state, error, own_log(log, base)])
        conn.execute("INSERT INTO deployment_workers (deployment_id, worker_id, log_base) "
                     "VALUES (?, ?, ?) ON CONFLICT (deployment_id, worker_id) DO UPDATE SET "
                     "log_base = excluded.log_base, state = NULL, error = NULL, log = NULL",
                     [deployment_id, worker_id, log or ""])


def activate(db: Database, name: str, version: str) -> tuple[dict, dict]:
    """Make `version` the active version of `name` (a rollback); refused, with nothing
    changed, while no worker is there to deploy it."""
    with transaction(db):
        container = get_container(db, name)
        row = get_version(db, container, version)
        container = _activate(db, container, row, require_worker=True)
    return container, row


def latest_deployment(db: Database, version_id: int) -> dict | None:
    # The same order as every other reading of a version's last deployment (list_versions,
    # store/functions.py): the newest, ties broken by id.
    rows = list(db.query("SELECT * FROM deployments WHERE version_id = ? "
                         "ORDER BY created_at DESC, id DESC LIMIT 1", [version_id]))
    return rows[0] if rows else None


def list_containers(db: Database) -> list[dict]:
    out = []
    live = live_worker_ids(db)
    splits: dict[int, dict[str, float]] = {}
    for cid, version, weight in db.execute(
            "SELECT t.container_id, v.version, t.weight FROM traffic_splits t "
            "JOIN versions v ON v.id = t.version_id ORDER BY v.version").fetchall():
        splits.setdefault(cid, {})[version] = weight
    for row in db.query(
            "SELECT c.*, a.version AS active_version, s.version AS serving_version, "
            "(SELECT count(*) FROM versions v WHERE v.container_id = c.id) AS versions "
            "FROM containers c LEFT JOIN versions a ON a.id = c.active_version_id "
            "LEFT JOIN versions s ON s.id = c.serving_version_id ORDER BY c.name"):
        split = splits.get(row["id"])
        out.append({"name": row["name"], "active_version": row["active_version"],
                    "serving_version": row["serving_version"], "versions": row["versions"],
                    # The traffic split, every version's share (None: the serving one's 100%).
                    "traffic": shares(row["serving_version"], split) if split else None,
                    "created_at": row["created_at"], "updated_at": row["updated_at"],
                    **_health(db, row["id"], row["name"], live)})
    return out


# A worker holding a version in one of these states runs it (or is getting it ready to).
RUNNING_STATES = (VersionState.BUILDING, VersionState.STARTING, VersionState.READY,
                  VersionState.DRAINING)


def _health(db: Database, container_id: int, name: str, live: list[str]) -> dict:
    """What `dockyard status` shows of a container: its last deployment, how many instances
    its workers keep running, and its latest error."""
    deployment = next(iter(db.query(
        "SELECT id, status, error, created_at, finished_at FROM deployments "
        "WHERE container_id = ? ORDER BY created_at DESC, id DESC LIMIT 1",
        [container_id])), None)
    marks = ", ".join("?" * len(live)) or "NULL"
    # Instances: the manifest's `instances` of each version a live worker reports ready or
    # draining (heartbeats carry a version's state, not its pool's size; a pool of
    # instances = 0 started on demand is not counted).
    instances = db.execute(
        f"SELECT coalesce(sum({db.dialect.json_number('v.manifest', 'limits', 'instances')}), 0) "
        "FROM worker_versions wv JOIN versions v ON v.id = wv.version_id "
        f"WHERE v.container_id = ? AND wv.state IN ('ready', 'draining') "
        f"AND wv.worker_id IN ({marks})", [container_id, *live]).fetchone()[0]
    errors = []
    failed = next(iter(db.query(
        "SELECT id, error, coalesce(finished_at, created_at) AS at FROM deployments "
        "WHERE container_id = ? AND status = 'failed' ORDER BY created_at DESC LIMIT 1",
        [container_id])), None)
    if failed:
        errors.append({"source": "deployment", "id": failed["id"], "at": failed["at"],
                       "message": _first_line(failed["error"] or "the deployment failed")})
    call = next(iter(db.query(
        "SELECT id, status, error, coalesce(finished_at, created_at) AS at FROM invocations "
        "WHERE container = ? AND status IN ('failed', 'timed_out', 'crashed') "
        "ORDER BY created_at DESC LIMIT 1", [name])), None)
    if call:
        try:
            error = json.loads(call["error"] or "{}")
            text = f"{error.get('type')}: {error.get('message')}"
        except (ValueError, AttributeError):
            text = call["error"] or call["status"]
        errors.append({"source": "invocation", "id": call["id"], "at": call["at"],
                       "message": _first_line(text)})
    return {
        "last_deployment": deployment["id"] if deployment else None,
        "last_deployment_status": deployment["status"] if deployment else None,
        "instances": instances,
        "last_error": max(errors, key=lambda e: e["at"] or 0) if errors else None,
    }


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0][:300] if lines else ""


def container_detail(db: Database, name: str) -> dict:
    container = get_container(db, name)
    summary = next(c for c in list_containers(db) if c["name"] == name)
    active = None
    if container["active_version_id"]:
        active = version_record(db["versions"].get(container["active_version_id"]), container)
    summary["active"] = active
    return summary


def list_versions(db: Database, name: str) -> list[dict]:
    """Newest first, each with its latest deployment (`last_deployment`: id, status, finished_at,
    error; None if it was never deployed): a version whose last deployment failed is no
    rollback target, and that outlives a restart (the workers' own reports do not)."""
    container = get_container(db, name)
    latest: dict[int, dict] = {}
    for row in db.query("SELECT version_id, id, status, error, finished_at FROM deployments "
                        "WHERE container_id = ? ORDER BY created_at, id", [container["id"]]):
        latest[row["version_id"]] = {"id": row["id"], "status": row["status"],
                                     "finished_at": row["finished_at"],
                                     "error": row["error"]}
    return [dict(version_record(r, container), last_deployment=latest.get(r["id"]))
            for r in db.query("SELECT * FROM versions WHERE container_id = ? "
                              "ORDER BY created_at DESC, id DESC", [container["id"]])]


def undeploy(db: Database, name: str) -> int:
    """Take a container out of service and keep its versions: no active or serving version
    (its processes stop; a pinned call still starts one on demand, as for a version uploaded
    without activating), a deployment under way ends. `rollback NAME VERSION` deploys one
    again. Returns how many versions were kept."""
    with transaction(db) as conn:
        container = get_container(db, name)
        t = now()
        conn.execute("UPDATE deployments SET status = 'superseded', finished_at = ?, "
                     "error = ? WHERE container_id = ? AND status IN ('pending', 'in_progress')",
                     [t, f"{name} was undeployed before this deployment finished",
                      container["id"]])
        conn.execute("UPDATE containers SET active_version_id = NULL, "
                     "serving_version_id = NULL, updated_at = ? WHERE id = ?",
                     [t, container["id"]])
        _end_split(db, container["id"])
        return conn.execute("SELECT count(*) FROM versions WHERE container_id = ?",
                            [container["id"]]).fetchone()[0]


def delete_container(db: Database, name: str) -> list[str]:
    """Delete a container and its versions; returns the package files (sha256) they used."""
    with transaction(db) as conn:
        container = get_container(db, name)
        artifacts = [r[0] for r in conn.execute(
            "SELECT DISTINCT artifact_sha256 FROM versions WHERE container_id = ?",
            [container["id"]])]
        vids = [r["id"] for r in db.query("SELECT id FROM versions WHERE container_id = ?",
                                          [container["id"]])]
        for vid in vids:
            conn.execute("DELETE FROM worker_versions WHERE version_id = ?", [vid])
        conn.execute("DELETE FROM deployment_workers WHERE deployment_id IN (SELECT id FROM "
                     "deployments WHERE container_id = ?)", [container["id"]])
        conn.execute("DELETE FROM deployments WHERE container_id = ?", [container["id"]])
        _end_split(db, container["id"])
        conn.execute("DELETE FROM aliases WHERE container = ?", [name])
        conn.execute("DELETE FROM versions WHERE container_id = ?", [container["id"]])
        conn.execute("DELETE FROM containers WHERE id = ?", [container["id"]])
    return artifacts


def prune_versions(db: Database, name: str, keep: int,
                   dry_run: bool = False) -> dict:
    """Delete the versions of `name` older than its `keep` newest, never one that is serving
    or active, in its traffic split or named by an alias, that a worker runs (or builds or drains), that a deployment in progress is
    for, or that calls are queued or running on. Returns what was deleted (each version's
    artifact, which the caller removes once no version uses it) and what was kept and why."""
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
        raise BadRequest("keep must be a whole number of at least 1 (the newest versions "
                         "to keep)")
    with transaction(db) as conn:
        container = get_container(db, name)
        rows = list(db.query("SELECT * FROM versions WHERE container_id = ? "
                             "ORDER BY created_at DESC, id DESC", [container["id"]]))
        reasons: dict[int, list[str]] = {row["id"]: [] for row in rows}
        for i, row in enumerate(rows):
            if row["id"] == container["serving_version_id"]:
                reasons[row["id"]].append("serving")
            if row["id"] == container["active_version_id"]:
                reasons[row["id"]].append("active")
            if i < keep:
                reasons[row["id"]].append(f"one of the {keep} newest")
        for (vid,) in conn.execute("SELECT version_id FROM traffic_splits WHERE "
                                   "container_id = ?", [container["id"]]).fetchall():
            reasons[vid].append("in the traffic split")
        by_name = {row["version"]: row["id"] for row in rows}
        for alias, version, extra in conn.execute(
                "SELECT name, function_version, extra_version FROM aliases WHERE container = ? "
                "ORDER BY name", [name]).fetchall():
            for named in {version, extra} & by_name.keys():
                reasons[by_name[named]].append(f"alias {alias}")
        states = ", ".join("?" * len(RUNNING_STATES))
        for vid, worker, state in conn.execute(
                "SELECT wv.version_id, coalesce(w.name, wv.worker_id), wv.state "
                "FROM worker_versions wv JOIN versions v ON v.id = wv.version_id "
                "LEFT JOIN workers w ON w.id = wv.worker_id WHERE v.container_id = ? "
                f"AND wv.state IN ({states})", [container["id"], *RUNNING_STATES]).fetchall():
            reasons[vid].append(f"{state} on {worker}")
        for vid, deployment in conn.execute(
                "SELECT version_id, id FROM deployments WHERE container_id = ? "
                "AND status IN ('pending', 'in_progress')", [container["id"]]).fetchall():
            if vid in reasons:
                reasons[vid].append(f"deployment {deployment} in progress")
        for version, count in conn.execute(
                "SELECT version, count(*) FROM invocations WHERE container = ? "
                "AND status IN ('queued', 'running') AND version IS NOT NULL GROUP BY version",
                [name]).fetchall():
            if version in by_name:
                reasons[by_name[version]].append(f"{count} call(s) queued or running")
        gone = [row for row in rows if not reasons[row["id"]]]
        if gone and not dry_run:
            ids = [row["id"] for row in gone]
            marks = ", ".join("?" * len(ids))
            conn.execute(f"DELETE FROM worker_versions WHERE version_id IN ({marks})", ids)
            conn.execute(f"DELETE FROM deployments WHERE version_id IN ({marks})", ids)
            conn.execute(f"DELETE FROM versions WHERE id IN ({marks})", ids)
    return {
        "container": name, "keep": keep, "dry_run": dry_run,
        "deleted": [{"version": r["version"], "content_sha256": r["content_sha256"],
                     "artifact_sha256": r["artifact_sha256"], "created_at": r["created_at"]}
                    for r in gone],
        "kept": [{"version": r["version"], "created_at": r["created_at"],
                  "reasons": reasons[r["id"]]} for r in rows if reasons[r["id"]]],
    }


def artifacts_in_use(db: Database, sha256s: list[str]) -> set[str]:
    """Which of these artifacts a version (of any container) still uses."""
    if not sha256s:
        return set()
    marks = ", ".join("?" * len(sha256s))
    return {row[0] for row in db.execute(
        f"SELECT DISTINCT artifact_sha256 FROM versions WHERE artifact_sha256 IN ({marks})",
        list(sha256s)).fetchall()}


def container_names(db: Database) -> list[str]:
    return [row[0] for row in db.execute("SELECT name FROM containers ORDER BY name")]


def desired_versions(db: Database) -> list[dict]:
    """What every worker should hold: the active and the serving version of each container run
    (role serve: both while a redeploy is under way), and so do the versions of its traffic
    split and those its aliases name (their calls are as warm as the container's own); every
    other version is a standby that starts on demand for pinned calls."""
    out = []
    instance = instance_id(db)
    for row in db.query(
            "SELECT v.*, c.name AS container, c.id AS cid, c.created_at AS ccreated, "
            "c.active_version_id, c.serving_version_id, (SELECT d.id FROM deployments d "
            "WHERE d.version_id = v.id ORDER BY d.created_at DESC LIMIT 1) AS deployment, "
            "(SELECT count(*) FROM traffic_splits t WHERE t.version_id = v.id) AS split, "
            "(SELECT count(*) FROM aliases a WHERE a.container = c.name AND "
            "(a.function_version = v.version OR a.extra_version = v.version)) AS aliased "
            "FROM versions v JOIN containers c ON c.id = v.container_id ORDER BY v.id"):
        serve = row["id"] in (row["active_version_id"], row["serving_version_id"]) or \
            bool(row["split"]) or bool(row["aliased"])
        out.append({
            "version_id": row["id"], "container": row["container"], "container_id": row["cid"],
            # Container ids are reused after a delete; with the creation time they are not.
            "uid_key": f"{instance}.{row['cid']}.{int((row['ccreated'] or 0) * 1e6)}",
            "version": row["version"], "artifact_sha256": row["artifact_sha256"],
            "content_sha256": row["content_sha256"], "manifest": json.loads(row["manifest"]),
            "role": ROLE_SERVE if serve else ROLE_STANDBY,
            # A new deployment of a version this worker holds (one that failed, deployed
            # again) tells the worker to build and start it once more.
            "deployment": row["deployment"],
        })
    return out


def instance_id(db: Database) -> str:
    rows = list(db.query("SELECT value FROM settings WHERE key = 'instance_id'"))
    return rows[0]["value"] if rows else "unknown"


def validate_activate_body(body) -> str:
    if not isinstance(body, dict) or not isinstance(body.get("version"), str):
        raise BadRequest('send {"version": "<version>"} to activate a version')
    return body["version"]


def recent_deployments(db: Database, name: str | None = None, limit: int = 20,
                       statuses: tuple[str, ...] | None = None) -> list[dict]:
    """Deployments, the newest first, with their container's and version's names: one
    container's (`name`), or every container's; only those in `statuses` if given."""
    where, args = [], []
    if name is not None:
        where.append("c.name = ?")
        args.append(name)
    if statuses:
        where.append(f"d.status IN ({', '.join('?' * len(statuses))})")
        args += list(statuses)
    sql = ("SELECT d.id, d.status, d.error, d.created_at, d.finished_at, c.name AS container, "
           "v.version FROM deployments d JOIN containers c ON c.id = d.container_id "
           "JOIN versions v ON v.id = d.version_id")
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY d.created_at DESC, d.id DESC LIMIT ?"
    return list(db.query(sql, [*args, max(1, min(limit, 200))]))
