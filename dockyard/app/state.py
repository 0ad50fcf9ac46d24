"""Accessors for the per-process objects the app factory sets up."""

from __future__ import annotations

from flask import current_app

from .store.db import get_db


def extension() -> dict:
    return current_app.extensions["dockyard"]


def database():
    return get_db(extension()["data"].db_target)


def connections():
    return extension()["connections"]


def artifacts():
    return extension()["artifacts"]


def records():
    return extension()["records"]
