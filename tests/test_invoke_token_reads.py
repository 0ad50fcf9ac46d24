"""The caller of an async call reads its record at the 202's Location (the id and a key only
that answer gave), with the invoke token under `serve --invoke-auth` and with no token without
it; the invoke token reads nothing else."""

from __future__ import annotations

import time
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from conftest import Server, make_package


@pytest.fixture(scope="module")
def auth_server(private_tmp, wheelhouse):
    data = private_tmp / "invoke-token-reads" / "data"
    data.parent.mkdir()
    srv = Server(data, ["--find-links", str(wheelhouse), "--offline", "--invoke-auth"])
    yield srv
    assert srv.stop() == 0, srv.log_path.read_text()[-3000:]
    assert not srv.leftovers, srv.leftovers


def _get(srv: Server, path: str, token: str | None = None) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.get(srv.url + path, headers=headers, timeout=30)


def _finished(srv: Server, location: str, token: str | None) -> dict:
    """Poll the record at `location` until the call has ended."""
    end = time.monotonic() + 60
    while True:
        response = _get(srv, location, token)
        assert response.status_code == 200, response.text
        record = response.json()
        if record["status"] not in ("queued", "running"):
            return record
        assert time.monotonic() < end, record
        time.sleep(0.1)


def _message(response: requests.Response) -> str:
    return response.json()["error"]["message"]


def test_the_invoke_token_reads_its_own_calls_and_nothing_else(auth_server, tmp_path):
    srv = auth_server
    srv.deploy(make_package(tmp_path, "echo", name="itr-echo"))
    invoke_token = (srv.data / "tokens" / "invoke").read_text().strip()
    as_invoker = {"Authorization": f"Bearer {invoke_token}"}

    answer = srv.invoke("itr-echo/echo?async=1", {"mine": 1}, headers=as_invoker)
    assert answer.status_code == 202, answer.text
    inv_id = answer.json()["invocation_id"]
    location = answer.headers["Location"]
    assert urlsplit(location).path == f"/api/invocations/{inv_id}"
    key = parse_qs(urlsplit(location).query)["key"][0]
    assert len(key) == 32

    record = _finished(srv, location, invoke_token)
    assert record["id"] == inv_id and record["status"] == "succeeded"
    assert record["output"] == {"mine": 1}

    # The same record: no token is a 401 (the route needs what /invoke needs), a wrong one too.
    missing = _get(srv, location)
    assert missing.status_code == 401 and "Location its 202 answer gave" in _message(missing)
    assert _get(srv, location, "nope").status_code == 401
    # The worker token reads no record, with a key or without.
    worker = _get(srv, location, srv.worker_token)
    assert worker.status_code == 403 and _message(worker) == \
        "a worker token cannot use this route"
    # Without the key the invoke token reads nothing, not even its own call by id.
    bare = _get(srv, f"/api/invocations/{inv_id}", invoke_token)
    assert bare.status_code == 403
    assert _message(bare).startswith("an invoke token reads only the records of the calls "
                                     "made with it")

    # Another caller's call: its id is no use without its key, and this call's key does not
    # open it; neither does a key for an id that does not exist (no way to learn which do).
    other = srv.invoke("itr-echo/echo?async=1", {"theirs": 2},
                       headers={"Authorization": f"Bearer {srv.admin}"})
    other_id = other.json()["invocation_id"]
    srv.wait_invocation(other_id)
    for path in (f"/api/invocations/{other_id}", f"/api/invocations/{other_id}?key={key}",
                 f"/api/invocations/{other_id}?key={'0' * 32}",
                 f"/api/invocations/{other_id[:-1]}0?key={key}"):
        refused = _get(srv, path, invoke_token)
        assert refused.status_code == 403, (path, refused.text)
        assert "theirs" not in refused.text
    wrong_key = _get(srv, f"/api/invocations/{other_id}?key={key}", invoke_token)
    assert _message(wrong_key).startswith(f"wrong key for invocation '{other_id}'")
    # A synchronous call's id (its header) is a name, not a key either.
    sync = srv.invoke("itr-echo/echo", {"sync": 3}, headers=as_invoker)
    assert sync.status_code == 200
    sync_id = sync.headers["X-Dockyard-Invocation-Id"]
    assert _get(srv, f"/api/invocations/{sync_id}", invoke_token).status_code == 403

    # Nothing else: not the list, not a cancel, not the other routes.
    for method, path in (("GET", "/api/invocations"),
                         ("GET", f"/api/invocations?container=itr-echo&key={key}"),
                         ("POST", f"/api/invocations/{inv_id}/cancel?key={key}"),
                         ("GET", "/api/containers"), ("GET", "/api/jobs"),
                         ("GET", "/api/deploy-folder")):
        refused = requests.request(method, srv.url + path, headers=as_invoker, timeout=30)
        assert refused.status_code == 403, (method, path, refused.text)
        assert _message(refused) == "an invoke token cannot use this route"

    # The admin token reads every record, with or without a key.
    assert _get(srv, f"/api/invocations/{inv_id}", srv.admin).json()["output"] == {"mine": 1}
    assert _get(srv, location, srv.admin).status_code == 200
    # A failed call's record carries its error to its caller.
    boom = srv.invoke("itr-echo/boom?async=1", {}, headers=as_invoker)
    failed = _finished(srv, boom.headers["Location"], invoke_token)
    assert failed["status"] == "failed" and failed["error"]["type"] == "ValueError"


def test_without_invoke_auth_the_location_alone_reads_the_record(server, pkg):
    server.deploy(pkg("echo", name="itr-open"))
    answer = server.invoke("itr-open/echo?async=1", {"open": True})
    assert answer.status_code == 202
    inv_id = answer.json()["invocation_id"]
    record = _finished(server, answer.headers["Location"], None)
    assert record["id"] == inv_id and record["output"] == {"open": True}
    # The id alone is not enough, a wrong key is refused, a wrong token is still a 401.
    bare = _get(server, f"/api/invocations/{inv_id}")
    assert bare.status_code == 401 and "?key=" in _message(bare)
    assert _get(server, f"/api/invocations/{inv_id}?key={'f' * 32}").status_code == 403
    assert _get(server, answer.headers["Location"], "nope").status_code == 401
    # The list still needs the admin token.
    assert _get(server, "/api/invocations").status_code == 401
