"""The reconcile diff: desired versions (from the heartbeat) against the ones this worker
holds, as three lists, the way supervisor's diff_to_active() does. Pure; the agent acts."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..common.protocol import Role


@dataclass
class Diff:
    added: list[dict] = field(default_factory=list)     # desired, not held
    changed: list[dict] = field(default_factory=list)   # held, with another role now (or
    # served, with a newer deployment: a version whose deployment failed is tried again)
    removed: list[int] = field(default_factory=list)    # held, no longer desired
    # Desired under the id of a version held, but another version: the database reused the id
    # of a deleted version (a container deleted and deployed again). The held one goes, this
    # one comes.
    replaced: list[dict] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.added or self.changed or self.removed or self.replaced)


def identity(spec: dict) -> tuple:
    """What makes a version the same version, beyond its id (which a database may reuse)."""
    return (spec.get("uid_key"), spec.get("container"), spec.get("content_sha256"))


def diff_versions(desired: list[dict], held_roles: dict[int, str],
                  held_deployments: dict[int, str | None] | None = None,
                  held_identities: dict[int, tuple] | None = None) -> Diff:
    """`desired`: specs with `version_id`, `role` and (optionally) `deployment`;
    `held_roles`: version_id -> role now; `held_deployments`: version_id -> the deployment
    this worker last acted on; `held_identities`: version_id -> identity() of the held spec."""
    result = Diff()
    wanted = {spec["version_id"]: spec for spec in desired}
    held_deployments = held_deployments or {}
    held_identities = held_identities or {}
    for version_id, spec in wanted.items():
        if version_id not in held_roles:
            result.added.append(spec)
        elif held_identities.get(version_id, identity(spec)) != identity(spec):
            result.replaced.append(spec)
        elif held_roles[version_id] != spec["role"]:
            result.changed.append(spec)
        elif spec["role"] == Role.SERVE and spec.get("deployment") != held_deployments.get(
                version_id, spec.get("deployment")):
            result.changed.append(spec)
    result.removed = sorted(v for v in held_roles if v not in wanted)
    return result
