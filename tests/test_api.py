"""The control plane's contract: auth, package validation, the error shape."""

from __future__ import annotations

import io
import zipfile

import requests

from conftest import zip_folder


def _zip(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return buf.getvalue()


def test_auth(server):
    url = server.url + "/api/containers"
    missing = requests.get(url, timeout=10)
    assert missing.status_code == 401
    assert missing.json()["error"]["type"] == "Unauthorized"
    wrong = requests.get(url, headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401
    as_worker = requests.get(url, headers={"Authorization": f"Bearer {server.worker_token}"},
                             timeout=10)
    assert as_worker.status_code == 403
    assert as_worker.json()["error"]["type"] == "Forbidden"
    assert requests.get(server.url + "/healthz", timeout=10).status_code == 200
    assert requests.post(server.url + "/api/workers/register", json={},
                         timeout=10).status_code == 401


def test_bad_packages(server):
    def upload(body: bytes):
        return server.api("POST", "/api/containers", data=body)

    not_archive = upload(b"hello, this is not an archive")
    assert not_archive.status_code == 400
    assert "not a zip or tar.gz" in not_archive.json()["error"]["message"]
    no_manifest = upload(_zip({"main.py": "x = 1\n"}))
    assert no_manifest.status_code == 400
    assert "dockyard.toml" in no_manifest.json()["error"]["message"]
    bad_toml = upload(_zip({"dockyard.toml": "name = \n", "main.py": ""}))
    assert bad_toml.status_code == 400
    bad_name = upload(_zip({"dockyard.toml": 'name = "Bad_Name"\n'}))
    assert bad_name.status_code == 400 and "name" in bad_name.json()["error"]["message"]
    no_name = upload(_zip({"dockyard.toml": 'version = "1"\n'}))
    assert no_name.status_code == 400
    slip = upload(_zip({"dockyard.toml": 'name = "slip"\n', "../evil.py": "x"}))
    assert slip.status_code == 400
    empty = upload(b"")
    assert empty.status_code == 400
    assert server.api("GET", "/api/containers/slip").status_code == 404


def test_multipart_upload_and_no_activate(server, pkg):
    body = zip_folder(pkg("echo", name="api-multi", version="m1"))
    response = server.api("POST", "/api/containers?activate=0",
                          files={"file": ("p.zip", body, "application/zip")})
    assert response.status_code == 201, response.text
    assert response.json()["deployment"] is None
    detail = server.api("GET", "/api/containers/api-multi").json()
    assert detail["active_version"] is None
    assert server.invoke("api-multi/echo", 1).status_code == 404
    activated = server.api("POST", "/api/containers/api-multi/activate", json={"version": "m1"})
    assert server.wait_deployment(activated.json()["deployment"])["status"] == "ready"
    assert server.invoke("api-multi/echo", 1).json() == 1
    bad = server.api("POST", "/api/containers/api-multi/activate", json={})
    assert bad.status_code == 400


def test_artifacts_need_a_token_and_serve_the_bytes(server, pkg):
    body = zip_folder(pkg("echo", name="api-art", version="a1"))
    record = server.api("POST", "/api/containers?activate=0", data=body).json()
    url = f"{server.url}/api/artifacts/{record['artifact_sha256']}"
    assert requests.get(url, timeout=10).status_code == 401
    got = requests.get(url, headers={"Authorization": f"Bearer {server.worker_token}"},
                       timeout=10)
    assert got.status_code == 200 and got.content == body
    assert server.api("GET", "/api/artifacts/" + "0" * 64).status_code == 404
    assert server.api("GET", "/api/deployments/dep_nope").status_code == 404


def test_root_is_a_json_index(server):
    response = requests.get(server.url + "/", timeout=30)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    index = response.json()
    assert index["name"] == "dockyard" and index["version"]
    links = index["links"]
    assert links["health"] == "/healthz" and links["metrics"] == "/metrics"
    assert links["containers"] == "/api/containers" and "docs/architecture.md" in links["docs"]
    assert requests.get(server.url + links["health"], timeout=30).status_code == 200
    # /metrics lists every container: the admin token reads it (see test_admission.py).
    assert requests.get(server.url + links["metrics"], timeout=30).status_code == 401
    assert server.api("GET", links["metrics"]).status_code == 200
    assert server.api("GET", links["containers"]).status_code == 200
