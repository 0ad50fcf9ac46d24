"""Counts its own runs: a file per call in the process's private /tmp, named by the call's
invocation id, so a test can compare what ran with what the callers were answered."""

import os
import time


def run(event, context):
    os.makedirs("/tmp/runs", exist_ok=True)
    with open(f"/tmp/runs/{context.invocation_id}", "w") as marker:
        marker.write(str(time.time()))
    time.sleep(float((event or {}).get("sleep", 0.02)))
    return {"id": context.invocation_id, "pid": os.getpid()}
