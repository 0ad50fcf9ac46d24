"""Test functions covering every handler shape and every way a handler can misbehave."""

import asyncio
import os
import sys
import time


def echo(event):
    return event


def ctx(event, context):
    return {"invocation_id": context.invocation_id, "container": context.container,
            "version": context.version, "function": context.function,
            "deadline": context.deadline, "remaining_ms": context.remaining_ms(),
            "event": event}


async def aecho(event):
    await asyncio.sleep(0.01)
    return event


def printer(event):
    print("to stdout", (event or {}).get("text", ""))
    print("to stderr", file=sys.stderr)
    return "printed"


def big_print(event):
    line = "x" * 1023
    for _ in range(5 * 1024):
        print(line)
    return "done"


def boom(event):
    raise ValueError("boom")


def not_json(event):
    return {1, 2, 3}


def call_exit(event):
    sys.exit(3)


def hard_exit(event):
    os._exit(1)


def sleep(event):
    time.sleep(float((event or {}).get("s", 1)))
    return "slept"


def environ(event):
    return dict(os.environ)


def whoami(event):
    return {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
            "pid": os.getpid(), "cwd": os.getcwd()}


def burn(event):
    end = time.time() + float((event or {}).get("s", 1))
    total = 0
    while time.time() < end:
        total += 1
    return total


IDENT = os.urandom(8).hex()


def ident(event):
    """Which process answered (a token drawn when it imported this module)."""
    return IDENT


def print_then_sleep(event):
    print("before the sleep")
    time.sleep(float((event or {}).get("s", 60)))


def exit_code(event):
    os._exit(int(event["code"]))
