"""The access tokens' hashes, kept in a shared database (PostgreSQL): created once, by the
first control plane; every other one must be given the same tokens (they also sign the
control plane's calls to workers), and refuses to start with others."""

from __future__ import annotations

import hashlib

from .db import transaction
from .engine import Database

KEY = "token_sha256:"


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def stored(db: Database) -> dict[str, str]:
    return {row["key"][len(KEY):]: row["value"] for row in db.query(
        "SELECT key, value FROM settings WHERE key LIKE ?", [KEY + "%"])}


def adopt(db: Database, tokens: dict[str, str]) -> dict[str, str]:
    """Keep these tokens' hashes unless the database has some already; returns the hashes
    the database holds afterwards."""
    with transaction(db):
        have = stored(db)
        if not have:
            for kind, token in tokens.items():
                db.execute("INSERT INTO settings (key, value) VALUES (?, ?)",
                           [KEY + kind, digest(token)])
            have = {kind: digest(token) for kind, token in tokens.items()}
    return have
