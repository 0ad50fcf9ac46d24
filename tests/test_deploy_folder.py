"""The deploy folder, end to end: real files dropped into a folder watched by a real `serve`,
real watchdog events, and the markers written beside each package."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import signal
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import psutil
import pytest
import requests
from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer

from conftest import Server, make_package, zip_folder
from dockyard.app.store.db import connect, migrate
from dockyard.app.deployfolder.client import Unreachable, failure_reason
from dockyard.app.deployfolder.entry import Entry, EntryState
from dockyard.app.deployfolder.deployer import RETRY_S, FolderDeployer
from dockyard.app.deployfolder.files import (Kind, Marker, entry_of, incomplete_reason,
                                             unopened_reason)
from dockyard.app.deployfolder.watch import GIVE_UP_ENV

MISSING_DEPENDENCY = "dockyard-no-such-distribution"
FUNCTIONS_ECHO = Path(__file__).resolve().parent / "functions" / "echo"


# -- helpers --------------------------------------------------------------------------------

def wait_for(what: str, predicate, timeout: float = 60.0, server: Server | None = None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    log = server.log_path.read_text()[-3000:] if server else ""
    raise AssertionError(f"never happened: {what}\n{log}")


class MarkerLog(FileSystemEventHandler):
    """Every marker the watcher writes, in order (markers arrive by a rename of a dotfile)."""

    def __init__(self, folder: Path):
        self.events: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        self.observer = Observer()
        self.observer.schedule(self, str(folder))
        self.observer.start()

    def on_any_event(self, event) -> None:
        if event.event_type in ("created", "moved"):
            name = Path(getattr(event, "dest_path", "") or event.src_path).name
            with self.lock:
                self.events.append((time.monotonic(), name))

    def of(self, entry: str) -> list[tuple[float, str]]:
        """(time, marker) for each marker written beside `entry`."""
        with self.lock:
            return [(t, name[len(entry):]) for t, name in self.events
                    if name[len(entry):] in {m.value for m in Marker}
                    and name.startswith(entry)]

    def stop(self) -> None:
        self.observer.stop()
        self.observer.join()


def marker(folder: Path, entry: str, kind: Marker) -> Path:
    return folder / f"{entry}{kind.value}"


def deployed_version(folder: Path, entry: str) -> str | None:
    """The version a `.deployed` marker names (`name@version deployment dep_…`)."""
    try:
        text = marker(folder, entry, Marker.DEPLOYED).read_text()
    except OSError:
        return None
    return text.split()[0].split("@", 1)[1]


def wait_deployed(srv: Server, folder: Path, entry: str, other_than: str | None = None) -> str:
    """The version once `.deployed` names one (other than `other_than`); a `.failed` marker
    instead ends the wait at once, with its reason."""
    def outcome():
        version = deployed_version(folder, entry)
        if version and version != other_than:
            return version
        failed = marker(folder, entry, Marker.FAILED)
        if failed.exists():
            raise AssertionError(f"{failed.name}: {failed.read_text()}")
        return None
    return wait_for(f"{entry}.deployed", outcome, server=srv)


def listing(srv: Server) -> dict:
    answer = srv.api("GET", "/api/deploy-folder")
    assert answer.status_code == 200, answer.text
    return answer.json()


def entries(srv: Server) -> dict[str, dict]:
    return {e["name"]: e for e in listing(srv)["entries"]}


def archive_of(tmp_path: Path, name: str, **kwargs) -> Path:
    package = make_package(tmp_path, "echo", name=name, **kwargs)
    archive = tmp_path / f"{name}.zip"
    archive.write_bytes(zip_folder(package))
    return archive


def api_error(srv: Server, data: bytes) -> str:
    """What the upload API answers for these bytes (the words a .failed marker must use)."""
    answer = srv.api("POST", "/api/containers", data=data)
    assert answer.status_code >= 400, answer.text
    return answer.json()["error"]["message"]


# -- fixtures -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def watched(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("watched")


@pytest.fixture(scope="module")
def srv(private_tmp, tmp_path_factory, watched):
    """serve watching `watched`, offline with an empty wheelhouse: any dependency fails."""
    data = private_tmp / "deploy-folder" / "data"
    data.parent.mkdir()
    empty = tmp_path_factory.mktemp("no-wheels")
    server = Server(data, ["--deploy-dir", str(watched), "--offline", "--find-links", str(empty)])
    yield server
    assert server.stop() == 0, server.log_path.read_text()[-3000:]
    assert not server.leftovers


@pytest.fixture(scope="module")
def markers(watched):
    log = MarkerLog(watched)
    yield log
    log.stop()


# -- drop, call, delete ---------------------------------------------------------------------

def drop_deploy_delete(srv: Server, folder: Path, log: MarkerLog, tmp_path: Path, name: str):
    archive = archive_of(tmp_path, name)
    entry = f"{name}.zip"
    shutil.copyfile(archive, folder / entry)   # as `cp` does
    version = wait_deployed(srv, folder, entry)
    # The marker is on disk; this test's own observer may see its event a moment later.
    written = wait_for(f"the {entry}.deployed event", lambda: (
        [m for _, m in log.of(entry)] if ".deployed" in [m for _, m in log.of(entry)]
        else None), timeout=10)
    assert ".deploying" in written and ".failed" not in written, written
    assert written.index(".deploying") < written.index(".deployed"), written
    deployment = marker(folder, entry, Marker.DEPLOYED).read_text().split()[-1]
    assert srv.api("GET", f"/api/deployments/{deployment}").json()["status"] == "ready"
    answer = srv.invoke(f"{name}/echo", {"dropped": True})
    assert answer.status_code == 200 and answer.json() == {"dropped": True}
    assert answer.headers["X-Dockyard-Version"] == version
    listed = entries(srv)[entry]
    assert (listed["state"], listed["version"], listed["deployment"]) == \
        ("deployed", version, deployment)

    (folder / entry).unlink()
    wait_for(f"{name} answers 404", lambda: srv.invoke(f"{name}/echo", {}).status_code == 404,
             server=srv)
    wait_for(f"{entry}.undeployed", marker(folder, entry, Marker.UNDEPLOYED).exists, server=srv)
    assert "was removed" in marker(folder, entry, Marker.UNDEPLOYED).read_text()
    assert not marker(folder, entry, Marker.DEPLOYED).exists()
    assert srv.api("GET", f"/api/containers/{name}").status_code == 404
    assert entries(srv)[entry]["state"] == "undeployed"


def test_drop_deploys_and_delete_undeploys(srv, watched, markers, tmp_path):
    drop_deploy_delete(srv, watched, markers, tmp_path, "df-drop")


def test_polling_observer_drops_and_deletes(private_tmp, tmp_path_factory, tmp_path):
    folder = tmp_path_factory.mktemp("watched-polling")
    data = private_tmp / "deploy-folder-polling" / "data"
    data.parent.mkdir()
    server = Server(data, ["--deploy-dir", str(folder), "--deploy-poll", "0.2", "--offline"])
    log = None
    try:
        log = MarkerLog(folder)     # inside: a host out of inotify instances still stops serve
        assert wait_for("the watcher started", lambda: listing(server)["observer"]) == \
            "polling every 0.2s"
        drop_deploy_delete(server, folder, log, tmp_path, "df-poll")
    finally:
        if log is not None:
            log.stop()
        assert server.stop() == 0
        assert not server.leftovers


def test_removing_the_deployed_marker_undeploys(srv, watched, tmp_path):
    entry = "df-unmark.zip"
    shutil.copyfile(archive_of(tmp_path, "df-unmark"), watched / entry)
    wait_deployed(srv, watched, entry)
    marker(watched, entry, Marker.DEPLOYED).unlink()
    wait_for(f"{entry}.undeployed", marker(watched, entry, Marker.UNDEPLOYED).exists, server=srv)
    assert srv.invoke("df-unmark/echo", {}).status_code == 404
    assert (watched / entry).exists()
    # Touched (or copied again), the package is deployed again.
    os.utime(watched / entry)
    wait_deployed(srv, watched, entry)
    assert not marker(watched, entry, Marker.UNDEPLOYED).exists()
    assert srv.invoke("df-unmark/echo", {}).status_code == 200


# -- complete before deployed ---------------------------------------------------------------

def test_a_slowly_copied_zip_is_deployed_once_whole_and_never_failed(srv, watched, markers,
                                                                      tmp_path):
    package = make_package(tmp_path, "echo", name="df-slow")
    (package / "blob.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    data = zip_folder(package)
    assert len(data) > 3 * 1024 * 1024
    entry = "df-slow.zip"
    step = len(data) // 8 + 1
    with open(watched / entry, "wb") as out:
        for start in range(0, len(data), step):
            if start:
                time.sleep(0.6)
            out.write(data[start:start + step])
            out.flush()
            os.fsync(out.fileno())
    whole_at = time.monotonic()
    version = wait_deployed(srv, watched, entry)
    written = markers.of(entry)
    names = [m for _, m in written]
    assert ".failed" not in names, written
    assert ".pending" in names, written            # said while the copy went on
    assert names.index(".pending") < names.index(".deploying"), written
    deploying_at = next(t for t, m in written if m == ".deploying")
    assert deploying_at >= whole_at, "deployed before the copy was whole"
    assert not marker(watched, entry, Marker.PENDING).exists()
    assert srv.invoke("df-slow/echo", {"n": 1}).headers["X-Dockyard-Version"] == version


def test_an_archive_is_whole_only_with_its_end(tmp_path):
    data = zip_folder(make_package(tmp_path, "echo", name="df-unit"))
    half = tmp_path / "half.zip"
    half.write_bytes(data[: len(data) // 2])
    assert "central directory" in incomplete_reason(half, Kind.ARCHIVE)
    whole = tmp_path / "whole.zip"
    whole.write_bytes(data)
    assert incomplete_reason(whole, Kind.ARCHIVE) is None
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        payload = os.urandom(256 * 1024)
        info = tarfile.TarInfo("blob.bin")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    tgz = buffer.getvalue()
    assert gzip.decompress(tgz)
    (tmp_path / "half.tar.gz").write_bytes(tgz[: len(tgz) // 2])
    assert "not ended" in incomplete_reason(tmp_path / "half.tar.gz", Kind.ARCHIVE)
    (tmp_path / "whole.tgz").write_bytes(tgz)
    assert incomplete_reason(tmp_path / "whole.tgz", Kind.ARCHIVE) is None
    (tmp_path / "empty.zip").write_bytes(b"")
    assert incomplete_reason(tmp_path / "empty.zip", Kind.ARCHIVE)
    # Still after a long while: the archive reader's own words.
    assert unopened_reason(half) == "not a zip archive: File is not a zip file"
    assert unopened_reason(tmp_path / "half.tar.gz") == (
        "not a tar.gz archive: Compressed file ended before the end-of-stream marker was "
        "reached")
    assert unopened_reason(tmp_path / "empty.zip") == "not a zip archive: File is not a zip file"


GIVE_UP_S = 4   # instead of 30 s: how long a still archive may fail to open


@pytest.fixture(scope="module")
def impatient(private_tmp, tmp_path_factory):
    """serve watching a folder of its own, giving up on an archive that does not open after
    GIVE_UP_S seconds unchanged: (server, folder). Its markers are read by polling (a busy
    host may have no inotify instance left for a test's observer)."""
    folder = tmp_path_factory.mktemp("watched-impatient")
    data = private_tmp / "deploy-folder-impatient" / "data"
    data.parent.mkdir()
    server = Server(data, ["--deploy-dir", str(folder), "--offline"],
                    env=dict(os.environ, **{GIVE_UP_ENV: str(GIVE_UP_S)}))
    yield server, folder
    assert server.stop() == 0, server.log_path.read_text()[-3000:]
    assert not server.leftovers


@pytest.mark.parametrize("entry, garbage, words", [
    ("df-stuck.zip", b"PK\x03\x04" + b"\x00garbage" * 4000,
     "not a zip archive: File is not a zip file"),
    ("df-stuck.tar.gz", gzip.compress(b"garbage" * 40000)[:-40],   # a stream cut short
     "not a tar.gz archive: Compressed file ended before the end-of-stream marker"),
])
def test_a_still_archive_that_never_opens_fails_and_is_tried_again_once_changed(
        impatient, tmp_path, entry, garbage, words):
    srv, folder = impatient
    (folder / entry).write_bytes(garbage)
    written_at = time.monotonic()
    failed = marker(folder, entry, Marker.FAILED)
    pending = marker(folder, entry, Marker.PENDING)
    wait_for(f"{entry}.pending", lambda: pending.exists() or failed.exists(), server=srv)
    assert not failed.exists()   # waited first
    wait_for(f"{entry}.failed", failed.exists, server=srv)
    assert time.monotonic() - written_at >= GIVE_UP_S
    text = failed.read_text().strip()
    assert text.startswith(words), text
    assert f"unchanged for {GIVE_UP_S} s" in text and "copy a whole archive" in text, text
    assert not pending.exists()
    listed = entries(srv)[entry]
    assert (listed["state"], listed["error"]) == ("failed", text)
    # A later change is tried again: a whole archive copied over it is deployed.
    name = entry.split(".")[0]
    package = make_package(tmp_path, "echo", name=name)
    if entry.endswith(".zip"):
        (folder / entry).write_bytes(zip_folder(package))
    else:
        with tarfile.open(folder / entry, "w:gz") as tar:
            tar.add(package, arcname=name)
    # The .failed marker stays until the new attempt, which replaces it.
    wait_for(f"{entry}.failed replaced", lambda: not failed.exists(), server=srv)
    wait_deployed(srv, folder, entry)
    assert srv.invoke(f"{name}/echo", {"again": 1}).json() == {"again": 1}
    (folder / entry).unlink()
    wait_for(f"{entry}.undeployed", marker(folder, entry, Marker.UNDEPLOYED).exists, server=srv)


def test_an_archive_still_growing_stays_pending_past_the_give_up_time(impatient, tmp_path):
    srv, folder = impatient
    package = make_package(tmp_path, "echo", name="df-growing")
    (package / "blob.bin").write_bytes(os.urandom(1024 * 1024))
    data = zip_folder(package)
    entry = "df-growing.zip"
    step = len(data) // 40 + 1
    started, seen = time.monotonic(), set()
    with open(folder / entry, "wb") as out:
        for start in range(0, len(data), step):
            if start:
                time.sleep(0.25)
            out.write(data[start:start + step])
            out.flush()
            seen |= {m for m in (Marker.PENDING, Marker.FAILED) if marker(folder, entry, m).exists()}
    assert time.monotonic() - started > 2 * GIVE_UP_S
    wait_deployed(srv, folder, entry)
    assert seen == {Marker.PENDING}, seen
    (folder / entry).unlink()
    wait_for(f"{entry}.undeployed", marker(folder, entry, Marker.UNDEPLOYED).exists, server=srv)


def test_noise_and_markers_are_told_apart(tmp_path):
    for noise in ("hello/.main.py.swp", "hello/main.py~", "hello/__pycache__/x.pyc",
                  "hello/4913", ".hidden.zip", "hello/#main.py#"):
        assert entry_of(tmp_path, tmp_path / noise) is None, noise
    assert entry_of(tmp_path, tmp_path / "hello" / "main.py") == ("hello", None)
    assert entry_of(tmp_path, tmp_path / "x.zip.deployed") == ("x.zip", Marker.DEPLOYED)
    assert entry_of(tmp_path, tmp_path / "hello.skipdeploy") == ("hello", Marker.SKIPDEPLOY)


# -- failures -------------------------------------------------------------------------------

def test_broken_packages_fail_with_the_reason(srv, watched, markers, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "main.py").write_text("def echo(event):\n    return event\n")
    stored = io.BytesIO()
    with zipfile.ZipFile(stored, "w", zipfile.ZIP_STORED) as zf:
        for path in sorted(make_package(tmp_path, "echo", name="df-corrupt").iterdir()):
            zf.write(path, path.name)
    corrupt = bytearray(stored.getvalue())
    corrupt[corrupt.find(b"def echo")] ^= 0xFF        # the data, not the directory
    packages = {
        "df-nomanifest.zip": zip_folder(bare),
        "df-corrupt.zip": bytes(corrupt),
        "df-garbage.zip": b"this is a note, not a zip\n" * 10,
        "df-badmanifest.zip": zip_folder(make_package(tmp_path, "echo", name="Not A Name")),
    }
    for entry, data in packages.items():
        (watched / entry).write_bytes(data)
    for entry, data in packages.items():
        failed = marker(watched, entry, Marker.FAILED)
        wait_for(f"{entry}.failed", failed.exists, server=srv)
        assert api_error(srv, data) in failed.read_text(), (entry, failed.read_text())
        assert entries(srv)[entry]["state"] == "failed"
        assert entries(srv)[entry]["error"] == failed.read_text().strip()
        assert not marker(watched, entry, Marker.PENDING).exists()
    assert "dockyard.toml" in marker(watched, "df-nomanifest.zip", Marker.FAILED).read_text()
    assert "damaged" in marker(watched, "df-corrupt.zip", Marker.FAILED).read_text()
    for entry in packages:
        (watched / entry).unlink()
    for entry in packages:  # nothing was deployed: the markers go with the file
        wait_for(f"{entry}.failed removed",
                 lambda: not marker(watched, entry, Marker.FAILED).exists(), server=srv)
        assert not marker(watched, entry, Marker.UNDEPLOYED).exists()


def test_a_build_failure_fails_and_the_old_version_keeps_serving(srv, watched, tmp_path):
    folder = watched / "df-build"
    shutil.copytree(make_package(tmp_path, "echo", name="df-build"), folder)
    old = wait_deployed(srv, watched, "df-build")
    broken = make_package(tmp_path, "echo", name="df-build",
                          manifest_extra=f'dependencies = ["{MISSING_DEPENDENCY}"]\n')
    (folder / "dockyard.toml").write_text((broken / "dockyard.toml").read_text())
    failed = marker(watched, "df-build", Marker.FAILED)
    wait_for("df-build.failed", failed.exists, server=srv)
    text = failed.read_text()
    assert " failed: " in text and "deployment dep_" in text, text
    assert MISSING_DEPENDENCY in text, text
    assert text.strip().endswith(f"df-build@{old} keeps serving"), text
    assert not marker(watched, "df-build", Marker.DEPLOYED).exists()
    answer = srv.invoke("df-build/echo", {"still": "here"})
    assert answer.status_code == 200 and answer.headers["X-Dockyard-Version"] == old


def test_a_pinned_version_with_new_content_says_to_bump_it(srv, watched, tmp_path):
    folder = watched / "df-pinned"
    shutil.copytree(make_package(tmp_path, "echo", name="df-pinned", version="1.0"), folder)
    wait_deployed(srv, watched, "df-pinned")
    with open(folder / "main.py", "a") as f:
        f.write("\n# an edit\n")
    failed = marker(watched, "df-pinned", Marker.FAILED)
    wait_for("df-pinned.failed", failed.exists, server=srv)
    assert "bump `version`" in failed.read_text()
    assert failed.read_text().strip().endswith("df-pinned@1.0 keeps serving")


# -- what is ignored ------------------------------------------------------------------------

def test_unknown_files_and_skipdeploy_are_ignored(srv, watched, tmp_path):
    (watched / "notes.txt").write_text("remember the milk\n")
    (watched / "df-skip.zip.skipdeploy").write_text("")
    shutil.copyfile(archive_of(tmp_path, "df-skip"), watched / "df-skip.zip")
    # A package dropped after both (a .tar.gz): once it is deployed, both were looked at.
    after = tmp_path / "df-after.tar.gz"
    with tarfile.open(after, "w:gz") as tar:
        tar.add(make_package(tmp_path, "echo", name="df-after"), arcname="df-after")
    shutil.copyfile(after, watched / after.name)
    wait_deployed(srv, watched, after.name)
    wait_for("df-skip.zip listed as skipped",
             lambda: entries(srv).get("df-skip.zip", {}).get("state") == "skipped", server=srv)
    listed = entries(srv)
    assert "notes.txt" not in listed
    assert sorted(p.name for p in watched.glob("notes.txt*")) == ["notes.txt"]
    assert sorted(p.name for p in watched.glob("df-skip.zip*")) == \
        ["df-skip.zip", "df-skip.zip.skipdeploy"]
    assert srv.api("GET", "/api/containers/df-skip").status_code == 404
    (watched / "df-skip.zip.skipdeploy").unlink()
    wait_deployed(srv, watched, "df-skip.zip")
    assert srv.invoke("df-skip/echo", {}).status_code == 200


def test_a_burst_of_saves_in_a_folder_is_one_redeploy(srv, watched, tmp_path):
    folder = watched / "df-burst"
    shutil.copytree(make_package(tmp_path, "echo", name="df-burst"), folder)
    first = wait_deployed(srv, watched, "df-burst")
    for i in range(6):
        with open(folder / "main.py", "a") as f:
            f.write(f"\n# save {i}\n")
        (folder / f".main.py.sw{'pox'[i % 3]}").write_text(f"swap {i}")
        time.sleep(0.15)
    second = wait_deployed(srv, watched, "df-burst", other_than=first)
    versions = srv.api("GET", "/api/containers/df-burst/versions").json()["versions"]
    assert [v["version"] for v in versions] == [second, first]
    answer = srv.invoke("df-burst/ctx", {})
    assert answer.json()["version"] == second
    # Editor temp files, dotfiles and __pycache__ alone change nothing.
    (folder / "main.py~").write_text("backup")
    (folder / "__pycache__").mkdir(exist_ok=True)
    (folder / "__pycache__" / "main.cpython-311.pyc").write_bytes(b"\0" * 16)
    (folder / ".main.py.swp").write_text("swap again")
    time.sleep(2.5)   # over two settle windows: time for a wrong redeploy to show
    assert deployed_version(watched, "df-burst") == second
    assert len(srv.api("GET", "/api/containers/df-burst/versions").json()["versions"]) == 2


def test_a_name_collision_is_refused_naming_the_other(srv, watched, tmp_path):
    folder = watched / "df-clash"
    shutil.copytree(make_package(tmp_path, "echo", name="df-clash"), folder)
    owner = wait_deployed(srv, watched, "df-clash")
    archive = archive_of(tmp_path, "df-clash", files={"extra.py": "X = 1\n"})
    shutil.copyfile(archive, watched / "df-clash-copy.zip")
    failed = marker(watched, "df-clash-copy.zip", Marker.FAILED)
    wait_for("df-clash-copy.zip.failed", failed.exists, server=srv)
    assert "already deployed from df-clash/" in failed.read_text(), failed.read_text()
    assert srv.api("GET", "/api/containers/df-clash").json()["active_version"] == owner
    # The folder removed, the refused archive takes the name.
    shutil.rmtree(folder)
    wait_for("df-clash.undeployed", marker(watched, "df-clash", Marker.UNDEPLOYED).exists,
             server=srv)
    wait_for("df-clash-copy.zip.deployed",   # (its .failed goes when the new attempt starts)
             lambda: deployed_version(watched, "df-clash-copy.zip"), server=srv)
    assert srv.invoke("df-clash/echo", {}).status_code == 200


# -- the watcher process --------------------------------------------------------------------

def test_a_killed_watcher_is_restarted_and_catches_up(srv, watched, tmp_path):
    shutil.copyfile(archive_of(tmp_path, "df-k1"), watched / "df-k1.zip")
    wait_deployed(srv, watched, "df-k1.zip")
    pid = listing(srv)["watcher_pid"]
    watcher = psutil.Process(pid)
    assert "dockyard.app.deployfolder.watch" in " ".join(watcher.cmdline())
    os.kill(pid, signal.SIGKILL)
    watcher.wait(timeout=10)
    # While no watcher runs: one package removed, another dropped.
    (watched / "df-k1.zip").unlink()
    shutil.copyfile(archive_of(tmp_path, "df-k2"), watched / "df-k2.zip")
    wait_for("a new watcher", lambda: listing(srv)["watcher_pid"] not in (None, pid),
             server=srv)
    wait_for("df-k1.zip.undeployed", marker(watched, "df-k1.zip", Marker.UNDEPLOYED).exists,
             server=srv)
    assert srv.invoke("df-k1/echo", {}).status_code == 404
    wait_deployed(srv, watched, "df-k2.zip")
    assert srv.invoke("df-k2/echo", {}).status_code == 200
    assert "deploy-folder watcher exited" in srv.log_path.read_text()


@pytest.mark.parametrize("args, problem", [
    (["--deploy-dir", "/nonexistent/deploy"], "/nonexistent/deploy does not exist"),
    (["--no-deploy-dir"], None),
])
def test_a_missing_or_disabled_folder_and_serve_goes_on(private_tmp, args, problem):
    data = private_tmp / f"deploy-folder-off-{len(args)}" / "data"
    data.parent.mkdir()
    server = Server(data, [*args, "--no-local-worker"], workers=0)
    try:
        assert requests.get(server.url + "/healthz", timeout=5).status_code == 200
        answer = listing(server)
        assert (answer["enabled"], answer["problem"], answer["entries"]) == (False, problem, [])
        lines = [line for line in server.log_path.read_text().splitlines()
                 if "deploy folder" in line]
        assert len(lines) == (1 if problem else 0), lines
        if problem:
            assert "serving without it" in lines[0]
    finally:
        assert server.stop() == 0


# -- the deployer against a control-plane double ----------------------------------------------

class FakeControlPlane:
    def __init__(self):
        self.containers: dict[str, dict] = {}
        self.deleted: list[str] = []
        self.reachable = True

    def upload(self, package: bytes) -> dict:
        if not self.reachable:
            raise Unreachable("cannot reach dockyard")
        raise AssertionError("not used here")

    def container(self, name: str) -> dict | None:
        return self.containers.get(name)

    def delete(self, name: str) -> None:
        self.deleted.append(name)
        self.containers.pop(name, None)

    def serving_version(self, name: str | None) -> str | None:
        return (self.containers.get(name) or {}).get("serving_version")


@pytest.fixture
def deployer(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    migrate(tmp_path / "dockyard.db")
    db = connect(tmp_path / "dockyard.db")
    scheduled: list[tuple[str, float]] = []
    made = FolderDeployer(folder, FakeControlPlane(), db,
                          lambda name, delay: scheduled.append((name, delay)))
    made.scheduled = scheduled
    yield made
    db.close()


def deployed_entry(deployer, name: str, container: str, version: str) -> Entry:
    entry = deployer.entry(name, Kind.ARCHIVE)
    entry.container, entry.version, entry.versions = container, version, [version]
    entry.state, entry.deployed_marker = EntryState.DEPLOYED, True
    return entry


def test_removing_a_package_deletes_the_container_it_deployed(deployer):
    entry = deployed_entry(deployer, "a.zip", "c", "v1")
    deployer.api.containers["c"] = {"active_version": "v1", "serving_version": "v1"}
    deployer.removed(entry)
    assert deployer.api.deleted == ["c"]
    assert (deployer.folder / "a.zip.undeployed").read_text() == \
        "c undeployed: a.zip was removed\n"
    assert entry.state is EntryState.UNDEPLOYED and entry.container is None


def test_a_container_activated_by_other_means_is_left_running(deployer):
    entry = deployed_entry(deployer, "a.zip", "c", "v1")
    deployer.api.containers["c"] = {"active_version": "v9", "serving_version": "v9"}
    deployer.removed(entry)
    assert deployer.api.deleted == []
    text = (deployer.folder / "a.zip.undeployed").read_text()
    assert text.startswith("c left deployed: a.zip was removed") and "c@v9" in text


def test_an_unreachable_control_plane_is_tried_again_never_failed(deployer):
    (deployer.folder / "a.zip").write_bytes(zip_folder(FUNCTIONS_ECHO))
    entry = deployer.entry("a.zip", Kind.ARCHIVE)
    deployer.api.reachable = False
    deployer.attempt(entry, deployer.folder / "a.zip", (1, 1))
    assert deployer.scheduled == [("a.zip", RETRY_S)]
    assert entry.attempted is None   # looked at again even if it does not change
    assert sorted(p.name for p in deployer.folder.iterdir()) == ["a.zip"]


def test_a_build_failure_is_told_with_the_cause_from_the_log():
    deployment = {"error": "uv pip failed: hint: Packages were unavailable because the "
                           "network was disabled.",
                  "workers": [{"error": None, "log": (
                      "07:37:16 installing nope\n"
                      "07:37:16   error: No solution found when resolving dependencies\n"
                      "07:37:16     cause: Because nope was not found in the cache and you "
                      "require nope, we can conclude that your requirements are "
                      "unsatisfiable.\n"
                      "07:37:16 failed: uv pip failed: hint: Packages were unavailable")}]}
    reason = failure_reason(deployment)
    assert reason.startswith("uv pip failed: hint: Packages were unavailable")
    assert "error: No solution found when resolving dependencies" in reason
    assert "cause: Because nope was not found" in reason
    assert "\n" not in reason
    assert failure_reason({"error": "import failed: ModuleNotFoundError: x", "workers": []}) \
        == "import failed: ModuleNotFoundError: x"


def test_a_partial_deployment_is_deployed_and_says_what_failed(deployer):
    """Several workers, one failed: the package serves (the failed worker retries), so its
    marker is `.deployed`, naming the failure; it is never left `.deploying`."""
    entry = deployer.entry("a.zip", Kind.ARCHIVE)
    entry.container, entry.version, entry.deployment = "c", "v1", "dep_1"
    entry.state = EntryState.DEPLOYING
    deployer.api.deployment = lambda deployment_id: {
        "status": "partial", "error": "failed on worker-b (wrk_2): disk full", "workers": []}
    assert deployer._finish(entry) is True
    text = (deployer.folder / "a.zip.deployed").read_text()
    assert text.startswith("c@v1 deployment dep_1; partial: failed on worker-b")
    assert entry.state is EntryState.DEPLOYED


def test_serve_says_it_listens_once_the_folder_is_deployed(private_tmp, tmp_path_factory,
                                                           tmp_path):
    """The tour's first call, sent the moment serve says it listens, finds the example."""
    folder = tmp_path_factory.mktemp("watched-at-start")
    shutil.copytree(make_package(tmp_path, "echo", name="df-first"), folder / "df-first")
    (folder / "half.zip").write_bytes(b"PK\x03\x04 not whole yet")   # nothing to wait for
    data = private_tmp / "deploy-folder-first" / "data"
    data.parent.mkdir()
    server = Server(data, ["--deploy-dir", str(folder), "--offline"])
    try:
        answer = server.invoke("df-first/echo", {"n": 1})
        assert answer.status_code == 200 and answer.json() == {"n": 1}, answer.text
    finally:
        assert server.stop() == 0
        assert not server.leftovers
