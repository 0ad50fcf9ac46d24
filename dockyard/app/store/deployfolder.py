"""What the deploy-folder watcher knows (whether it runs, on which folder, and each entry of
the folder with its state), kept in the settings table: every gunicorn process answers
GET /api/deploy-folder alike, and a restarted watcher picks up where the last one stopped."""

from __future__ import annotations

import json

from .engine import Database

from .db import now

STATUS_KEY = "deploy_folder"
ENTRIES_KEY = "deploy_folder_entries"
SHOWN = ("name", "kind", "state", "container", "version", "deployment", "error", "updated_at")


def _put(db: Database, key: str, value: dict) -> None:
    db.execute("INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) "
                    "DO UPDATE SET value = excluded.value", [key, json.dumps(value)])


def _get(db: Database, key: str) -> dict | None:
    row = db.execute("SELECT value FROM settings WHERE key = ?", [key]).fetchone()
    try:
        return json.loads(row[0]) if row else None
    except ValueError:
        return None


def save_status(db: Database, *, enabled: bool, folder: str | None,
                observer: str | None = None, pid: int | None = None,
                problem: str | None = None) -> None:
    _put(db, STATUS_KEY, {"enabled": enabled, "folder": folder, "observer": observer,
                          "watcher_pid": pid, "problem": problem, "updated_at": now()})


def save_entries(db: Database, folder: str, entries: list[dict]) -> None:
    _put(db, ENTRIES_KEY, {"folder": folder, "entries": entries, "updated_at": now()})


def load_entries(db: Database, folder: str) -> list[dict]:
    """The entries saved for this folder ([] when they were saved for another one)."""
    saved = _get(db, ENTRIES_KEY)
    if not saved or saved.get("folder") != folder:
        return []
    return list(saved.get("entries") or [])


def describe(db: Database) -> dict:
    status = _get(db, STATUS_KEY) or {"enabled": False, "folder": None, "observer": None,
                                      "watcher_pid": None, "problem": None}
    entries = load_entries(db, status["folder"]) if status.get("enabled") else []
    status.pop("updated_at", None)
    status["entries"] = [{key: entry.get(key) for key in SHOWN}
                         for entry in sorted(entries, key=lambda e: e["name"])]
    return status
