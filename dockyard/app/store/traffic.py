"""A container's traffic split: other versions taking a share of the calls that name no version
(Knative's traffic percentages, a Lambda alias's RoutingConfig for the container itself). The
serving version takes the rest. A deploy, a rollback or an undeploy replaces the split: the
version it makes active takes all the traffic."""

from __future__ import annotations

import math

from ...errors import BadRequest, Conflict
from .containers import get_container, get_version, version_name
from .db import now, transaction
from .engine import Database
from .routing import shares

# Weights are compared with this much slack: 0.1 + 0.2 is not 0.3 in floating point.
SLACK = 1e-9


def split_of(db: Database, container_id: int) -> dict[str, float]:
    """{version name: weight} of the versions other than the serving one (empty: no split)."""
    return {row[0]: row[1] for row in db.execute(
        "SELECT v.version, t.weight FROM traffic_splits t JOIN versions v ON v.id = t.version_id "
        "WHERE t.container_id = ? ORDER BY v.version", [container_id]).fetchall()}


def describe(db: Database, name: str) -> dict:
    """What `GET /api/containers/<name>/traffic` answers: the serving version and every
    version's share of the unpinned calls (the serving one's included)."""
    container = get_container(db, name)
    serving = version_name(db, container["serving_version_id"])
    return {"container": name, "serving": serving,
            "active": version_name(db, container["active_version_id"]),
            "weights": shares(serving, split_of(db, container["id"]))}


def set_split(db: Database, name: str, weights) -> dict:
    """Give the versions in `weights` ({version: share 0..1}) their share of the container's
    unpinned calls, the serving version the rest (naming it too, the shares must add up to
    1); `{}` sends every call to the serving version again."""
    if not isinstance(weights, dict):
        raise BadRequest('send {"weights": {"<version>": <share 0..1>, ...}}, e.g. '
                         '{"weights": {"v2": 0.1}}; {} ends the split')
    for version, weight in weights.items():
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or \
                not math.isfinite(weight) or not 0.0 <= weight <= 1.0:
            raise BadRequest(f"the weight of '{version}' must be a number from 0 to 1 "
                             f"(0.1 is 10% of the calls), not {weight!r}")
    with transaction(db) as conn:
        container = get_container(db, name)
        serving = container["serving_version_id"]
        if serving is None:
            raise Conflict(f"'{name}' has no serving version to split traffic with; deploy "
                           "one first")
        if container["active_version_id"] != serving:
            raise Conflict(f"a deployment of '{name}' is under way "
                           f"({version_name(db, container['active_version_id'])} is not serving yet); "
                           "split its traffic once it is done (`dockyard deployments "
                           f"{name}`)")
        serving_name = version_name(db, serving)
        ids = {version: get_version(db, container, version)["id"] for version in weights}
        extra = {version: float(w) for version, w in weights.items()
                 if version != serving_name and w > 0}
        total = sum(extra.values())
        if total > 1.0 + SLACK:
            raise BadRequest(f"the weights add up to {total:g}, over 1: the versions other "
                             f"than the serving one ({serving_name}) can take all the calls "
                             "at most")
        if serving_name in weights and abs(total + float(weights[serving_name]) - 1.0) > 1e-6:
            raise BadRequest(f"the weights add up to {total + weights[serving_name]:g}: "
                             "naming the serving version too, they must add up to 1 (or "
                             "leave it out: it takes the rest)")
        conn.execute("DELETE FROM traffic_splits WHERE container_id = ?", [container["id"]])
        for version, weight in extra.items():
            conn.execute("INSERT INTO traffic_splits (container_id, version_id, weight) "
                         "VALUES (?, ?, ?)", [container["id"], ids[version], weight])
        conn.execute("UPDATE containers SET updated_at = ? WHERE id = ?",
                     [now(), container["id"]])
    return describe(db, name)
