"""Hostile uploads against a real server: each is a 400 (or 413 for sizes) with a short
message, answered without hanging, and no temp upload is left in <data>/uploads whatever the
outcome. Timeouts on the requests only detect a hang."""

from __future__ import annotations

import io
import os
import time
import zipfile

import pytest

from dockyard.app import create_app
from dockyard.app.artifacts import STALE_UPLOAD_S, ArtifactStore
from dockyard.common.manifest import (MAX_ENV_BYTES, MAX_ENV_VALUE_BYTES, MAX_KEY_PARTS,
                                      MAX_NESTING)

HANG = 60  # seconds: a request that takes this long is a hang, not a slow answer


def package(manifest: str, extra: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("dockyard.toml", manifest)
        zf.writestr("main.py", "def f(event):\n    return event\n")
        for name, text in (extra or {}).items():
            zf.writestr(name, text)
    return buf.getvalue()


def uploads(server) -> list[str]:
    return sorted(p.name for p in (server.data / "uploads").iterdir())


def upload(server, body: bytes, **params):
    return server.api("POST", "/api/containers", data=body, params=params, timeout=HANG)


def refused(server, body: bytes, status: int = 400) -> str:
    response = upload(server, body)
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert "\n" not in error["message"] and len(error["message"]) < 300, error
    assert uploads(server) == []
    return error["message"]


DOTTED = "a" + ".a" * 199_999 + " = 1\n"   # 400 KB of manifest


HOSTILE = {
    "nested arrays": ('name = "up-nest"\na = ' + "[" * 20_000 + "]" * 20_000 + "\n",
                      f"more than {MAX_NESTING} deep"),
    "nested inline tables": ('name = "up-nest"\na = ' + "{b = " * 5_000 + "1" + "}" * 5_000,
                             f"more than {MAX_NESTING} deep"),
    "dotted key, 200 000 parts": (DOTTED, "dockyard.toml is 400004 bytes; the limit is 64 KB"),
    "dotted key within 64 KB": ("a" + ".a" * 30_000 + " = 1\n", f"more than {MAX_KEY_PARTS} parts"),
    "manifest over 64 KB": ('name = "up-big"\n' + "# padding\n" * 7_000, "the limit is 64 KB"),
    "10 MB name": ('name = "' + "n" * (10 << 20) + '"\n', "the limit is 64 KB"),
    "50 KB name": ('name = "' + "n" * 50_000 + '"\n', "is not valid"),
    "10 MB env value": ('name = "up-env"\nenv = { A = "' + "v" * (10 << 20) + '" }\n',
                        "the limit is 64 KB"),
    "40 KB env value": ('name = "up-env"\nenv = { A = "' + "v" * 40_000 + '" }\n',
                        f"the limit is {MAX_ENV_VALUE_BYTES} bytes per value"),
    "env over 32 KB": ('name = "up-env"\nenv = { '
                       + ", ".join(f'V{i} = "{"v" * 4000}"' for i in range(10)) + " }\n",
                       f"the limit is {MAX_ENV_BYTES} bytes"),
    "env PATH": ('name = "up-env"\nenv = { PATH = "/tmp" }\n', "env.PATH is set by dockyard"),
    "big integer": ('name = "up-int"\nx = ' + "9" * 5_000 + "\n", "not valid TOML"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_manifest_is_a_short_400_and_leaves_nothing(server, case):
    manifest, message = HOSTILE[case]
    body = package(manifest)
    log_before = server.log_path.stat().st_size
    got = refused(server, body)
    assert message in got, got
    if "n" * 1000 in manifest:
        assert "n" * 100 not in got
    with open(server.log_path) as log:
        log.seek(log_before)
        assert "Traceback" not in log.read()


def test_the_dotted_key_package_is_tiny(server):
    # The reported attack: 552 bytes compressed, 400 KB of manifest.
    body = package(DOTTED)
    assert len(body) < 1500
    assert "64 KB" in refused(server, body)


def test_every_outcome_leaves_the_uploads_folder_empty(server):
    name = f"up-ok-{os.getpid()}"
    manifest = f'name = "{name}"\nversion = "1.0"\n'
    first = upload(server, package(manifest), activate="0")
    assert first.status_code == 201, first.text
    assert uploads(server) == []
    again = upload(server, package(manifest), activate="0")    # the same content: a no-op
    assert again.status_code == 200 and uploads(server) == []
    conflict = upload(server, package(manifest, {"other.py": "X = 1\n"}), activate="0")
    assert conflict.status_code == 409, conflict.text
    assert uploads(server) == []
    many = package('name = "up-many"\n', {f"m{i}.py": "" for i in range(10_001)})
    assert "members" in refused(server, many, 413)
    assert "not a zip" in refused(server, b"not an archive at all")
    assert "empty upload" in refused(server, b"")
    server.api("DELETE", f"/api/containers/{name}")


# -- in process: paths a real server cannot be made to take -------------------------------

@pytest.fixture
def app(tmp_path):
    app = create_app({"DATA_DIR": str(tmp_path / "data"), "MAX_UPLOAD_BYTES": 64 * 1024})
    token = (tmp_path / "data" / "tokens" / "admin").read_text().strip()
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    app.uploads = tmp_path / "data" / "uploads"
    app.client = client
    return app


def test_an_unexpected_error_while_parsing_leaves_nothing(app, monkeypatch):
    from dockyard.app.api import containers

    def explode(text):
        raise RuntimeError("parser bug")
    monkeypatch.setattr(containers, "parse_manifest", explode)
    response = app.client.post("/api/containers", data=package('name = "x"\n'))
    assert response.status_code == 500
    assert list(app.uploads.iterdir()) == []


def test_an_upload_over_the_limit_is_413_and_leaves_nothing(app):
    body = package('name = "x"\n', {"noise.bin": os.urandom(100 * 1024).hex()})
    response = app.client.post("/api/containers", data=body)
    assert response.status_code == 413, response.get_json()
    assert list(app.uploads.iterdir()) == []
    response = app.client.post("/api/containers", data={"file": (io.BytesIO(body), "p.zip")},
                               content_type="multipart/form-data")
    assert response.status_code == 413
    assert list(app.uploads.iterdir()) == []


def test_uploads_left_by_a_killed_process_are_swept(tmp_path):
    (tmp_path / "uploads").mkdir()
    (tmp_path / "artifacts").mkdir()
    store = ArtifactStore(tmp_path / "artifacts", tmp_path / "uploads")
    old = tmp_path / "uploads" / "upload-dead"
    fresh = tmp_path / "uploads" / "upload-in-flight"
    other = tmp_path / "uploads" / "not-an-upload"
    for path in (old, fresh, other):
        path.write_bytes(b"x")
    long_ago = time.time() - STALE_UPLOAD_S - 60
    os.utime(old, (long_ago, long_ago))
    os.utime(other, (long_ago, long_ago))
    tmp, _, size = store.receive(io.BytesIO(b"data"), 1024)
    assert size == 4
    assert sorted(p.name for p in (tmp_path / "uploads").iterdir()) == sorted(
        ["upload-in-flight", "not-an-upload", tmp.name])
    tmp.unlink()
    assert store.sweep(older_than=0) == 1 and not fresh.exists() and other.exists()

