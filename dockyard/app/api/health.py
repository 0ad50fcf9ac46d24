"""`/healthz` (no auth) and `/metrics` (Prometheus text, computed from the store so every
gunicorn process answers the same)."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..state import database
from ..store import workers as worker_store

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    return jsonify({"status": "ok", "workers": len(worker_store.live_worker_ids(database()))})


class StoreCollector:
    def __init__(self, db):
        self.db = db

    def collect(self):
        calls = CounterMetricFamily("dockyard_invocations", "Invocations by outcome",
                                    labels=["container", "status"])
        seconds = CounterMetricFamily("dockyard_invocation_duration_seconds",
                                      "Time spent in finished invocations",
                                      labels=["container"])
        for row in self.db.query("SELECT container, status, count(*) AS n, "
                                 "coalesce(sum(duration_ms), 0) AS ms FROM invocations "
                                 "GROUP BY container, status"):
            calls.add_metric([row["container"], row["status"]], row["n"])
        for row in self.db.query("SELECT container, coalesce(sum(duration_ms), 0) AS ms "
                                 "FROM invocations GROUP BY container"):
            seconds.add_metric([row["container"]], row["ms"] / 1000.0)
        yield calls
        yield seconds
        workers = GaugeMetricFamily("dockyard_workers_ready", "Workers that are ready")
        workers.add_metric([], len(worker_store.live_worker_ids(self.db)))
        yield workers
        containers = GaugeMetricFamily("dockyard_containers", "Deployed containers")
        containers.add_metric([], self.db["containers"].count)
        yield containers
        states = GaugeMetricFamily("dockyard_worker_versions", "Versions held by workers",
                                   labels=["state"])
        for row in self.db.query("SELECT state, count(*) AS n FROM worker_versions "
                                 "GROUP BY state"):
            states.add_metric([row["state"]], row["n"])
        yield states


@bp.get("/metrics")
def metrics():
    registry = CollectorRegistry()
    registry.register(StoreCollector(database()))
    return Response(generate_latest(registry), mimetype="text/plain; version=0.0.4")
