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


# No caller moves a request to another path: gunicorn otherwise takes SCRIPT_NAME and PATH_INFO
# from the request headers of a peer it trusts as a proxy (any caller on this host), and a
# SCRIPT_NAME that is not a prefix of the path was answered with a 500. dockyard is served at
# the root of its port; such headers are dropped.
forwarder_headers = ""
