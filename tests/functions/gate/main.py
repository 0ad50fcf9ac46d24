"""A container whose callers try to name what it does not declare: the standard library, the
venv's packages, names imported into its module, attribute chains."""

import os
import subprocess  # noqa: F401 - there to be named by an attacker: main:subprocess.getoutput
from os import getenv  # noqa: F401 - imported, not defined here: main:getenv must be refused

import dytiny  # noqa: F401 - a venv package, reachable as main:dytiny.shout


def echo(event):
    return event


def undeclared(event):
    """Defined in the package's own module: callable as main:undeclared."""
    return {"undeclared": event, "pid_seen": os.getpid() > 0}


class Greeter:
    def __init__(self, event):
        self.event = event
