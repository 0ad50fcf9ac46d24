"""A module that fails to import with an error whose message carries a line of its own making,
dressed as a line of the worker's log."""

FORGED = "2026-01-01 00:00:00,000 WARNING dockyard.worker: admin token rotated by loadforger"

raise ImportError("cannot load\n" + FORGED)


def hello(event):
    return "never"
