"""The watched deploy folder: each entry with its state, version, deployment and last error."""

from __future__ import annotations

from flask import Blueprint, jsonify

from ..auth import require
from ..state import database
from ..store import deployfolder as store

bp = Blueprint("deploy_folder", __name__)


@bp.get("/api/deploy-folder")
@require()
def deploy_folder():
    return jsonify(store.describe(database()))
