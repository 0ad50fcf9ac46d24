"""The control plane: a Flask app whose state lives only in its database (SQLite in the data
dir, or a shared PostgreSQL) and the data dir, so any number of gunicorn processes, on any
number of hosts, can serve it."""

from __future__ import annotations

import logging

from flask import Flask

from . import auth, errors
from .store import db
from .artifacts import ArtifactStore
from .datadir import DataDir
from .invoke.records import RecordWriter
from .invoke.direct_calls import DirectCalls
from .invoke.sync import SyncInvoke
from .invoke.worker_client import WorkerConnections

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def create_app(test_config: dict | None = None) -> Flask:
    app = Flask(__name__)
    app.config.from_mapping(
        DATA_DIR=None,
        MAX_EVENT_BYTES=6 * 1024 * 1024,
        MAX_UPLOAD_BYTES=100 * 1024 * 1024,
        MAX_UNCOMPRESSED_BYTES=500 * 1024 * 1024,
        MAX_MEMBERS=10_000,
        INVOKE_AUTH=False,
        HEARTBEAT_INTERVAL_S=2.0,
        # Warm calls to a worker on this host go straight to the function process
        # (DOCKYARD_DIRECT_CALLS=false relays every call through the worker agent).
        DIRECT_CALLS=True,
        # A web process's threads (gunicorn's --threads) and how many of them one container's
        # synchronous calls never take: kept for the other containers (0: no bound). `serve`
        # sets both: its 8 threads plus `--web-reserve` (default 4). See invoke/sync.py.
        WEB_THREADS=12,
        WEB_RESERVE=4,
    )
    app.config.from_prefixed_env("DOCKYARD")
    if test_config:
        app.config.from_mapping(test_config)
    data = DataDir.at(app.config["DATA_DIR"])
    data.ensure()
    db.migrate(data.db_target)
    # Replies keep their results as received: the invoke route passes them on as bytes.
    connections = WorkerConnections(data.read_token("worker"), raw_results=True)
    app.extensions["dockyard"] = {
        "data": data,
        "artifacts": ArtifactStore.of(data),
        "connections": connections,
        "direct": DirectCalls(connections) if app.config["DIRECT_CALLS"] else None,
        "records": RecordWriter(data.db_target),
        "tokens": {kind: data.read_token(kind) for kind in ("admin", "worker", "invoke")},
    }
    # Uploads are streamed and checked by the artifact store; events by the invoke route.
    app.config["MAX_CONTENT_LENGTH"] = app.config["MAX_UPLOAD_BYTES"] + 1024 * 1024
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)

    from .api import (aliases, containers, deployfolder, health, invocations, invoke, jobs,
                      traffic, workers)
    for module in (aliases, containers, deployfolder, health, invocations, invoke, jobs,
                   traffic, workers):
        app.register_blueprint(module.bp)
    from .api import openapi
    app.register_blueprint(openapi.bp)  # GET /openapi.json: the API's OpenAPI description
    from .ui import bp as dashboard
    app.register_blueprint(dashboard)   # /ui/: the dashboard
    errors.init_app(app)
    auth.init_app(app)
    # Synchronous calls are served in front of Flask (see invoke/sync.py).
    app.wsgi_app = SyncInvoke(app)
    return app
