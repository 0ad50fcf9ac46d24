"""Functions for the cron job tests: a quick one, a slow one, one that always fails, and one
that starts a child process and waits (a tree for cancel to kill)."""

import subprocess
import time


def tick(event):
    return {"event": event, "at": time.time()}


def slow(event):
    time.sleep(float((event or {}).get("s", 3)))
    return "done"


def fail(event):
    raise RuntimeError("this job always fails")


def tree(event):
    child = subprocess.Popen(["sleep", str((event or {}).get("s", 60))])
    child.wait()
    return "the child finished"
