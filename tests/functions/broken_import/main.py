"""A module that fails at import time."""

import this_module_does_not_exist  # noqa: F401


def echo(event):
    return event
