"""A version whose code cannot be imported: its error is told once, with the user's frames only
(not the import machinery's), and after a restart of the worker it is reported failed with the
same reason without being built again, until it is deployed again."""

from __future__ import annotations

import shutil

from conftest import FUNCTIONS, Server
from failover_cluster import wait_for


def _deployment(server: Server, name: str) -> dict:
    container = server.api("GET", f"/api/containers/{name}").json()
    return server.api("GET", f"/api/deployments/{container['last_deployment']}").json()


def _log(server: Server, name: str) -> str:
    return "\n".join(w.get("log") or "" for w in _deployment(server, name)["workers"])


def test_an_import_error_is_told_once_and_not_rebuilt_after_a_restart(private_tmp, wheelhouse,
                                                                      tmp_path):
    data = private_tmp / "failed-versions" / "data"
    data.parent.mkdir()
    args = ["--find-links", str(wheelhouse), "--offline"]
    package = tmp_path / "broken"
    shutil.copytree(FUNCTIONS / "broken_import", package)
    server = Server(data, args)
    try:
        first = server.cli("deploy", str(package), "--wait", check=False)
        assert first.returncode == 1
        assert "No module named 'this_module_does_not_exist'" in first.stderr
        log = _log(server, "broken")
        assert log.count("Traceback (most recent call last)") == 1, log
        assert "importlib" not in log and 'File "/dockyard/code/main.py", line 3' in log
        assert log.count("ModuleNotFoundError: No module named") == 2, log  # reason, traceback
        served_log = server.log_path.read_text()
        assert served_log.count("Traceback (most recent call last)") <= 1
    finally:
        assert server.stop() == 0 and not server.leftovers

    again = Server(data, args)
    try:
        def reported():
            workers = _deployment(again, "broken")["workers"]
            return workers and workers[0]["state"] == "failed" and workers[0]
        worker = wait_for("the version reported failed after the restart", reported, 60, 0.2)
        assert "this_module_does_not_exist" in (worker["error"] or "")
        assert "not built again after a restart" in _log(again, "broken")
        assert "-> building" not in again.log_path.read_text()
        # Deployed again: it is tried again (and fails the same way).
        retried = again.cli("deploy", str(package), "--wait", check=False)
        assert retried.returncode == 1 and "this_module_does_not_exist" in retried.stderr
        assert "-> starting" in again.log_path.read_text()
    finally:
        assert again.stop() == 0 and not again.leftovers
