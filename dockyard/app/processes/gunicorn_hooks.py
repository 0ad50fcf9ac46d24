"""gunicorn's configuration module under `serve` (`-c python:…`): only gunicorn settings may be
named here (gunicorn takes every module-level name that is one).

Ctrl-C in a terminal reaches serve's whole process group, gunicorn's too, where SIGINT means
"stop at once". Serve acts on it (the calls under way end first, see cli/serve.py), so
gunicorn's arbiter ignores it, and SIGHUP (a reload) with it; its web processes do the same
as they load the app (app/stopping.py). Serve stops gunicorn with SIGTERM (graceful) or
SIGQUIT (at once)."""

import signal


def when_ready(server):  # noqa: ARG001 - gunicorn's hook signature
    for signum in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
