"""`/` (a short index), `/healthz` (both without auth) and `/metrics` (Prometheus text,
computed from the store so every gunicorn process answers the same; the admin token reads it,
anyone under `serve --public-metrics`)."""

from __future__ import annotations

import json
import math
import time
from importlib import metadata

from flask import Blueprint, Response, jsonify
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                     HistogramMetricFamily)

from ..auth import check_metrics, require
from ..serve_state import stopping
from ..state import database, extension
from ..store import job_runs
from ..store import jobs as job_store
from ..store import metrics as metrics_store
from ..store import workers as worker_store

bp = Blueprint("health", __name__)


def _version() -> str | None:
    try:
        return metadata.version("dockyard")
    except metadata.PackageNotFoundError:
        return None


@bp.get("/")
def index():
    """A short index of what this server answers, until a dashboard exists."""
    return jsonify({"name": "dockyard", "version": _version(),
                    "links": {"health": "/healthz", "metrics": "/metrics",
                              "openapi": "/openapi.json",
                              "containers": "/api/containers",
                              "docs": "README.md and docs/architecture.md in the dockyard "
                                      "source"}})


@bp.get("/healthz")
def healthz():
    """503 `stopping` while the serve this runs under stops: it takes no new calls (those
    under way go on), and a load balancer takes it out."""
    workers = len(worker_store.live_worker_ids(database()))
    if stopping():
        return jsonify({"status": "stopping", "workers": workers}), 503
    return jsonify({"status": "ok", "workers": workers})


@bp.get("/api/server")
@require()
def server():
    """This control plane: its version, data dir, since when `serve` runs and its retention
    settings (from the `server.json` serve writes; absent when the app runs on its own)."""
    data = extension()["data"]
    try:
        started = json.loads(data.server_json.read_text())
    except (OSError, ValueError):
        started = {}
    started_at = started.get("started_at")
    return jsonify({
        "name": "dockyard", "version": _version(), "url": started.get("url"),
        "data_dir": str(data.root), "pid": started.get("pid"), "started_at": started_at,
        "uptime_s": round(time.time() - started_at, 1) if started_at else None,
        "retention": started.get("retention"),
        "workers_ready": len(worker_store.live_worker_ids(database())),
    })


class StoreCollector:
    def __init__(self, db):
        self.db = db

    def collect(self):
        calls = CounterMetricFamily("dockyard_invocations", "Invocations by outcome",
                                    labels=["container", "status"])
        seconds = CounterMetricFamily("dockyard_invocation_duration_seconds",
                                      "Time spent in finished invocations",
                                      labels=["container"])
        per_version = CounterMetricFamily(
            "dockyard_version_invocations", "Invocations by the version that ran them and "
            "outcome (watch a rollout: errors of the new version against the old)",
            labels=["container", "version", "status"])
        per_container: dict[str, float] = {}
        per_status: dict[tuple[str, str], int] = {}
        for row in metrics_store.invocation_totals(self.db):
            key = (row["container"], row["status"])
            per_status[key] = per_status.get(key, 0) + row["n"]
            if row["version"] is not None:
                per_version.add_metric([row["container"], row["version"], row["status"]],
                                       row["n"])
            per_container[row["container"]] = per_container.get(row["container"], 0) + row["ms"]
        for (container, status), n in per_status.items():
            calls.add_metric([container, status], n)
        for container, ms in per_container.items():
            seconds.add_metric([container], ms / 1000.0)
        yield calls
        yield per_version
        yield seconds
        shares = GaugeMetricFamily("dockyard_traffic_share", "Each version's share of its "
                                   "container's unpinned calls (its traffic split)",
                                   labels=["container", "version"])
        for row in metrics_store.traffic_shares(self.db):
            shares.add_metric([row["container"], row["version"]], row["share"])
        yield shares
        workers = GaugeMetricFamily("dockyard_workers_ready", "Workers that are ready")
        workers.add_metric([], len(worker_store.live_worker_ids(self.db)))
        yield workers
        containers = GaugeMetricFamily("dockyard_containers", "Deployed containers")
        containers.add_metric([], metrics_store.container_count(self.db))
        yield containers
        states = GaugeMetricFamily("dockyard_worker_versions", "Versions held by workers",
                                   labels=["state"])
        for row in metrics_store.worker_version_states(self.db):
            states.add_metric([row["state"]], row["n"])
        yield states


class WorkerCollector:
    """Per worker (labelled by name and id): calls run and failed there, calls in flight, its
    state, and `dockyard_worker_up` (1 while it takes calls)."""

    def __init__(self, db):
        self.db = db

    def collect(self):
        labels = ["worker", "id"]
        calls = CounterMetricFamily("dockyard_worker_calls", "Calls a worker ran (finished)",
                                    labels=labels)
        failures = CounterMetricFamily("dockyard_worker_failures",
                                       "Calls that failed, timed out or crashed on a worker",
                                       labels=labels)
        in_flight = GaugeMetricFamily("dockyard_worker_calls_in_flight",
                                      "Calls in a worker's processes (its last heartbeat)",
                                      labels=labels)
        state = GaugeMetricFamily("dockyard_worker_state",
                                  "A worker's state: 1 for the one it is in", labels=[*labels,
                                                                                      "state"])
        up = GaugeMetricFamily("dockyard_worker_up", "1 while a worker is up and heartbeating",
                               labels=labels)
        for w in metrics_store.worker_figures(self.db):
            key = [w["name"], w["id"]]
            calls.add_metric(key, w["calls"])
            failures.add_metric(key, w["failures"])
            in_flight.add_metric(key, w["in_flight"])
            state.add_metric([*key, w["state"]], 1)
            up.add_metric(key, 1 if w["up"] else 0)
        yield from (calls, failures, in_flight, state, up)


class JobCollector:
    """Per job: fires, failures, skipped and missed runs, the last success (alert on
    `time() - dockyard_job_last_success_timestamp_seconds` to catch a job that did not run)
    and the next fire; for all jobs: how late fires were."""

    def __init__(self, db):
        self.db = db

    def collect(self):
        families = {key: CounterMetricFamily(f"dockyard_job_{key}", text, labels=["job"])
                    for key, text in (("fires", "Fires of a job (scheduled or by hand)"),
                                      ("failures", "Runs of a job that failed, timed out or "
                                                   "crashed (each attempt)"),
                                      ("skipped", "Fires skipped by concurrency = forbid"),
                                      ("missed", "Scheduled times missed (scheduler down or "
                                                 "past the starting deadline)"))}
        last = GaugeMetricFamily("dockyard_job_last_success_timestamp_seconds",
                                 "When a job last succeeded (Unix time)", labels=["job"])
        upcoming = GaugeMetricFamily("dockyard_job_next_fire_timestamp_seconds",
                                     "When a job fires next (Unix time)", labels=["job"])
        for row in job_store.counters(self.db):
            for key, family in families.items():
                family.add_metric([row["name"]], row[key])
            if row["last_success_at"]:
                last.add_metric([row["name"]], row["last_success_at"])
            if row["enabled"] and row["next_fire_at"]:
                upcoming.add_metric([row["name"]], row["next_fire_at"])
        yield from families.values()
        yield last
        yield upcoming
        buckets, total = job_runs.lateness_histogram(self.db)
        yield HistogramMetricFamily(
            "dockyard_job_fire_lateness_seconds",
            "How long after its scheduled time a fire was queued",
            buckets=[("+Inf" if math.isinf(le) else f"{le:g}", n) for le, n in buckets],
            sum_value=total)


@bp.get("/metrics")
def metrics():
    check_metrics()
    registry = CollectorRegistry()
    registry.register(StoreCollector(database()))
    registry.register(JobCollector(database()))
    registry.register(WorkerCollector(database()))
    return Response(generate_latest(registry), mimetype="text/plain; version=0.0.4")
