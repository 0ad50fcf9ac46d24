"""The gates around a dependency build: resolving and downloading run as a uid of dockyard's
own with the index (and no package code), installing runs in a view without network (and
without credentials), root never follows a symlink the build left, and no cache outlives its
build. Each attack is a real hostile build backend (tests/functions/buildgate/gate/backend.py)
deployed through a real `serve`."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import shutil
import stat
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import psutil
import pytest

from conftest import Server, build_wheel, instance_uids
from dockyard.runner import fetch
from dockyard.runner.install import remove_tree, seal_tree


def _needs_view(server) -> None:
    summary = server.api("GET", "/api/workers").json()["workers"][0]["isolation"]
    if not summary["view"]["on"]:
        pytest.skip(summary["view"]["why"])


def _plan(**plan) -> dict[str, str]:
    return {"gate/plan.json": json.dumps(plan)}


def _log(record: dict) -> str:
    return record["deployment_detail"]["workers"][0]["log"]


def _report(log: str) -> dict:
    lines = [ln for ln in log.splitlines() if "BUILDREPORT " in ln]
    assert lines, log
    return json.loads(lines[-1].split("BUILDREPORT ", 1)[1].strip().rstrip("'\""))


def _deadline(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} within {timeout}s")


def _victim(root: Path, count: int = 300) -> dict[str, tuple[int, int, int]]:
    """A host folder of root-owned files with modes a walk as root would change, some named
    as the files of the folders the backend swaps (f0…, inner/g0…), as an attacker aiming at
    /etc would name its own files passwd and shadow."""
    root.mkdir(mode=0o700)
    (root / "inner").mkdir(mode=0o700)
    names = [f"f{n}" for n in range(20)] + [f"inner/g{n}" for n in range(20)]
    names += [f"file{n}" for n in range(count - len(names))]
    for name in names:
        path = root / name
        path.write_text("root's\n")
        os.chmod(path, 0o600)
    return _owners(root)


def _owners(root: Path) -> dict[str, tuple[int, int, int]]:
    out = {}
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        out[str(path)] = (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
    return out


def _owned_by(folder: Path, uids: set[int]) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            try:
                if os.lstat(path).st_uid in uids:
                    found.append(path)
            except FileNotFoundError:
                pass
    return found


def _build_folders() -> list[str]:
    return [p.name for p in Path(tempfile.gettempdir()).glob(fetch.PREFIX + "*")]


# -- (a) symlinks swapped in while root works on the tree ------------------------------------

def test_a_backend_swapping_folders_for_symlinks_changes_no_host_file(server, pkg, tmp_path):
    """A build backend exchanges venv and cache folders with symlinks to a root-owned host
    folder, in a loop, from a process that outlives it, and leaves symlinks behind, while a
    second build of the same container is asked for: no host file changes owner or mode, and
    nothing on the host is left owned by the container."""
    _needs_view(server)
    victim = tmp_path / "victim"
    before = _victim(victim)
    folder = server.data / "worker" / "bg-swap"
    first = server.deploy(pkg("buildgate", name="bg-swap", version="1", files=_plan(
        modes=["swap"], swap={"victim": str(victim), "hold": 4})), wait=False)
    # Once its daemons swap (a folder of the build's cache is seen as a symlink), a second
    # build of the same container is asked for; its backend swaps uv's own cache folders too.
    _deadline(lambda: any(os.path.islink(path) for path in [
        *folder.glob(".build-*/cache/gate-swap0"), folder / ".uv-cache" / "gate-swap0"]),
        60, "the first backend's daemons did not start")
    second = server.deploy(pkg("buildgate", name="bg-swap", version="2", files=_plan(
        modes=["swap"], swap={"victim": str(victim), "hold": 1, "uv_dirs": True})),
        wait=False)
    result = server.wait_deployment(second["deployment"])
    server.wait_deployment(first["deployment"])
    assert _owners(victim) == before
    # The first build ran to its end and its venv was sealed, the symlinks it left included.
    venv = next(folder.glob("1*/venv"))
    assert (venv / "gate-link").is_symlink() and (venv / "gate-link").lstat().st_uid == 0
    assert all(uid == 0 for uid, _, _ in _owners(venv).values())
    if result["status"] == "ready":
        assert server.invoke("bg-swap/value", {}).json()["gate"] == 42
    else:   # uv may trip over its own cache folders swapped away: its failure, nothing else
        assert "uv pip failed" in result["workers"][0]["error"], result
    uids = instance_uids(server.data)
    assert not _owned_by(server.data / "worker" / "bg-swap", uids)
    # Of the container's uid, only its function processes run: the daemons died with the build.
    for proc in psutil.process_iter(["uids", "cmdline"]):
        try:
            if proc.info["uids"] and proc.info["uids"].real in uids:
                cmd = " ".join(proc.info["cmdline"] or [])
                # A version that failed (this file deploys several) is built again after a
                # delay: dockyard's own uv step, from the worker's tools folder, may run now.
                retry = "/dockyard-tools-" in cmd and " pip " in cmd
                assert "launch.py" in cmd or "bootstrap" in cmd or retry, cmd
        except psutil.Error:
            pass
    assert not list((server.data / "worker" / "bg-swap").glob(".build-*"))
    assert not list((server.data / "worker" / "bg-swap").glob(".uv-cache"))


def test_sealing_a_tree_never_follows_a_symlink_swapped_in_meanwhile(tmp_path):
    """The walk that gives a built venv to root, against a thread that keeps exchanging its
    folders with symlinks to a folder whose files belong to someone else."""
    victim = tmp_path / "victim"
    victim.mkdir()
    for n in range(50):
        (victim / f"v{n}").write_text("not root's")
        os.chown(victim / f"v{n}", 4242, 4242)
        os.chmod(victim / f"v{n}", 0o600)
    before = _owners(victim)
    tree = tmp_path / "venv"
    folders = []
    for n in range(30):
        folder = tree / f"d{n}" / "inner"
        folder.mkdir(parents=True)
        folders += [folder.parent, folder]
        for m in range(10):
            (folder / f"f{m}").write_text("x")
    (tree / "link").symlink_to(victim)
    for path in [tree, *tree.rglob("*")]:
        os.lchown(path, 4343, 4343)
    stop = threading.Event()

    def swapper():
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        while not stop.is_set():
            for folder in folders:
                link = str(folder) + ".swap"
                try:
                    os.symlink(victim, link)
                except OSError:
                    pass
                libc.renameat2(-100, link.encode(), -100, str(folder).encode(), 2)
                libc.renameat2(-100, link.encode(), -100, str(folder).encode(), 2)

    thread = threading.Thread(target=swapper)
    thread.start()
    try:
        for _ in range(20):
            try:
                seal_tree(tree)
            except Exception as exc:  # noqa: BLE001 - a refusal is fine, a follow is not
                assert "changed while it was sealed" in str(exc) or isinstance(exc, OSError)
    finally:
        stop.set()
        thread.join()
    assert _owners(victim) == before
    seal_tree(tree)
    assert all(uid == 0 for uid, _, _ in _owners(tree).values())
    remove_tree(tree)
    assert not tree.exists() and _owners(victim) == before


# -- (b) a payload in the cache never reaches another container ------------------------------

def test_a_payload_planted_in_the_cache_never_runs_in_the_next_container(server, pkg):
    """A backend appends a payload to the unpacked `dytiny` in the build's cache; after `rm`
    and a deploy of another package under the same name, its function gets a clean `dytiny`
    (the old shared cache gave it the payload)."""
    _needs_view(server)
    first = server.deploy(pkg("buildgate", name="bg-poison", files=_plan(modes=["poison"])))
    assert first["deployment_detail"]["status"] == "ready"
    owner = server.invoke("bg-poison/value", {}).json()
    assert owner["gate"] == 42
    folder = server.data / "worker" / "bg-poison"
    assert not list(folder.glob(".build-*")) and not (folder / ".uv-cache").exists()
    server.cli("rm", "bg-poison")
    _deadline(lambda: not folder.exists(), 30, "the removed container's folder did not go")
    server.deploy(pkg("buildvictim", name="bg-poison"))
    answer = server.invoke("bg-poison/shout", "quiet").json()
    assert answer["shout"] == "QUIET!", answer
    assert answer["uid"] != owner["uid"]


# -- (c) no network in a build ---------------------------------------------------------------

@pytest.mark.parametrize("network", [False, True])
def test_a_build_cannot_reach_the_network(server, pkg, network):
    """The backend dials the control plane's port on 127.0.0.1 and an outside address: both
    fail, whatever the container's network setting (which is for its functions)."""
    _needs_view(server)
    port = urllib.parse.urlsplit(server.url).port
    name = f"bg-net-{str(network).lower()}"
    record = server.deploy(pkg("buildgate", name=name, manifest_extra=(
        f"[limits]\nnetwork = {str(network).lower()}\n"), files=_plan(
        modes=["net"], fail=True, net={"targets": [["127.0.0.1", port], ["192.0.2.1", 80]]})),
        expect="failed")
    report = _report(_log(record))
    assert set(report["net"]) == {f"127.0.0.1:{port}", "192.0.2.1:80"}, report
    assert "connected" not in report["net"].values(), report
    assert report["uid"] != 0


# -- (d) no credential reaches a build -------------------------------------------------------

class _Index(http.server.ThreadingHTTPServer):
    daemon_threads = True
    # (path, the uid of the process that asked) of each request: its socket's owner in the
    # kernel's table, read while the connection is open (a short-lived resolver is never
    # missed, as a sampler of the process list can miss it on a busy host).
    callers: list[tuple[str, int | None]]


def _hex_address(address: tuple[str, int]) -> str:
    """An IPv4 address as /proc/net/tcp writes it."""
    return "".join(f"{int(part):02X}" for part in reversed(address[0].split("."))) + \
        f":{address[1]:04X}"


def _peer_uid(client: tuple[str, int], server: tuple[str, int]) -> int | None:
    """The uid owning the client's end of an open connection from `client` to `server` (both
    on this host): the established socket of that pair, never one of an earlier connection
    waiting out its close (those are root's)."""
    ends = (_hex_address(client), _hex_address(server))
    try:
        with open("/proc/net/tcp") as table:
            for line in table.readlines()[1:]:
                fields = line.split()
                if (fields[1], fields[2]) == ends and fields[3] == "01":   # ESTABLISHED
                    return int(fields[7])
    except OSError:
        pass
    return None


def _index(folder: Path, user: str, password: str):
    """A package index that answers only requests carrying its Basic credentials."""
    expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    seen: list[tuple[str, bool]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_HEAD(self):
            self.do_GET(head=True)

        def do_GET(self, head=False):
            authorized = self.headers.get("Authorization") == expected
            seen.append((self.path, authorized))
            self.server.callers.append((self.path, _peer_uid(
                self.client_address, self.connection.getsockname())))
            if not authorized:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="index"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            parts = self.path.strip("/").split("/")
            if parts[0] == "simple" and len(parts) == 2:
                links = "".join(
                    f'<a href="/files/{f.name}#sha256='
                    f'{hashlib.sha256(f.read_bytes()).hexdigest()}">{f.name}</a>\n'
                    for f in folder.iterdir() if f.name.startswith(parts[1] + "-"))
                body = f"<html><body>{links}</body></html>".encode()
                kind = "text/html"
            elif parts[0] == "files" and len(parts) == 2 and (folder / parts[1]).is_file():
                body, kind = (folder / parts[1]).read_bytes(), "application/octet-stream"
            else:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

    server = _Index(("127.0.0.1", 0), Handler)
    server.callers = []
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                     daemon=True).start()
    return server, seen


@pytest.fixture
def indexed(private_tmp, tmp_path):
    """serve with --index-url carrying a password, of a local index that wants it."""
    files = tmp_path / "index"
    files.mkdir()
    build_wheel(files, "dytiny", "1.0", {
        "dytiny/__init__.py": 'def shout(text):\n    return text.upper() + "!"\n'})
    password = "pw-" + os.urandom(8).hex()
    index, seen = _index(files, "builder", password)
    data = private_tmp / f"indexed-{os.urandom(4).hex()}" / "data"
    data.parent.mkdir()
    url = f"http://builder:{password}@127.0.0.1:{index.server_address[1]}/simple"
    srv = None
    try:
        srv = Server(data, ["--index-url", url])
        yield srv, password, seen, index.callers
    finally:
        if srv is not None:
            code = srv.stop()
            assert code == 0, srv.log_path.read_text()[-3000:]
            assert not srv.leftovers, srv.leftovers
        index.shutdown()
        index.server_close()


def test_no_credential_reaches_a_build(indexed, pkg):
    """The index wants a password: the fetch step uses it (as a uid of dockyard's own, never
    root or the container's, and never on a command line), and a build backend finds it
    nowhere: not in its environment, /proc/*/cmdline or environ, nor in a file it can read."""
    srv, password, seen, callers = indexed
    _needs_view(srv)
    watched: dict[int, set[str]] = {}
    stop = threading.Event()

    def sample():
        # Every process of this data dir's uids (the containers' and their fetch uids).
        while not stop.is_set():
            # Only the uids are read for every process of the host (a busy host has many, and
            # a short-lived one must not be missed); command lines only for the matches.
            uids = instance_uids(srv.data)
            for proc in psutil.process_iter(["uids"]):
                try:
                    if proc.info["uids"] and proc.info["uids"].real in uids:
                        cmd = "\0".join(proc.cmdline())
                        watched.setdefault(proc.info["uids"].real, set()).add(cmd)
                except psutil.Error:
                    pass
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        srv.deploy(pkg("buildvictim", name="bg-index"))
        assert srv.invoke("bg-index/shout", "ok").json()["shout"] == "OK!"
        record = srv.deploy(pkg("buildgate", name="bg-secret", files=_plan(
            modes=["secret", "net"], fail=True, secret={"needle_reversed": password[::-1]},
            net={"targets": [["127.0.0.1", int(srv.url.rsplit(":", 1)[1])]]})),
            expect="failed")
    finally:
        stop.set()
        sampler.join()
    report = _report(_log(record))
    assert report["secret"]["found"] == [], report
    assert report["secret"]["scanned"] > 20, report
    assert "connected" not in report["net"].values(), report
    # The index was used, with the password, for the file downloads too.
    assert any(path.startswith("/files/dytiny") and ok for path, ok in seen), seen
    assert all(ok for _, ok in seen), seen
    # Resolving ran as a uid that is neither root nor a container's, with no secret in any
    # command line of this data dir's uids.
    registry = json.loads(Path("/var/lib/dockyard/uids.json").read_text())["uids"]
    fetch_uids = {uid for key, uid in registry.items() if ".fetch." in key}
    resolvers = {uid for path, uid in callers if path.startswith("/simple/")}
    assert resolvers and resolvers <= fetch_uids, (callers, fetch_uids)
    assert {uid for _, uid in callers} <= fetch_uids, (callers, fetch_uids)
    assert report["uid"] not in fetch_uids and report["uid"] != 0
    assert not [cmd for cmds in watched.values() for cmd in cmds if password in cmd]
    # serve hands the index to its worker in the environment: no process it started shows
    # the password on its command line (serve's own is the operator's choice; README says
    # to prefer DOCKYARD_INDEX_URL).
    shown = []
    for proc in srv.descendants():
        try:
            shown += [" ".join(proc.cmdline())] if password in " ".join(proc.cmdline()) else []
        except psutil.Error:
            pass
    assert not shown, shown


# -- what needs a build backend to resolve ---------------------------------------------------

def test_a_dependency_that_needs_its_backend_to_resolve_fails_plainly(server, pkg):
    """Dynamic metadata can only be had by running the backend, which the fetch step never
    does: the deploy fails with one line saying what the dependency needs, and the backend
    never ran (it would have left a file on the host)."""
    _needs_view(server)
    marker_dir = Path(tempfile.mkdtemp(prefix="dockyard-test-marker-"))
    os.chmod(marker_dir, 0o777)
    marker = marker_dir / "ran"
    try:
        pyproject = ('[build-system]\nrequires = []\nbuild-backend = "backend"\n'
                     'backend-path = ["."]\n\n[project]\nname = "gate"\nversion = "1.0"\n'
                     'dynamic = ["dependencies"]\n')
        files = dict(_plan(modes=["marker"], marker=str(marker)),
                     **{"gate/pyproject.toml": pyproject})
        record = server.deploy(pkg("buildgate", name="bg-dynamic", files=files),
                               expect="failed")
        error = record["deployment_detail"]["workers"][0]["error"]
        assert "gate can only be resolved by running its build backend" in error, error
        assert "static metadata" in error and "wheel" in error and "\n" not in error
        assert "gate can only be resolved" in _log(record)
        assert not marker.exists()
    finally:
        shutil.rmtree(marker_dir)
    # The failure is reported as the build ends; its folder goes right after (poll for it).
    prefix = f"{fetch.PREFIX}{_worker_pid(server)}-"
    deadline = time.monotonic() + 30
    while [name for name in _build_folders() if name.startswith(prefix)]:
        assert time.monotonic() < deadline, [n for n in _build_folders() if n.startswith(prefix)]
        time.sleep(0.1)


def _worker_pid(server) -> int:
    for proc in server.descendants():
        try:
            if " worker " in " ".join(proc.cmdline()):
                return proc.pid
        except psutil.Error:
            pass
    return -1


# -- the downloader's credentials ------------------------------------------------------------

def test_the_downloader_sends_credentials_only_to_their_index(tmp_path):
    """A redirect from the index to another host (a CDN) does not carry the index's
    password; a file whose hash is not the index's is refused."""
    files = tmp_path / "files"
    files.mkdir()
    wheel = build_wheel(files, "dytiny", "1.0", {"dytiny/__init__.py": "X = 1\n"})
    cdn_seen: list[str | None] = []

    class Cdn(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            cdn_seen.append(self.headers.get("Authorization"))
            body = wheel.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    cdn = _Index(("127.0.0.1", 0), Cdn)
    threading.Thread(target=cdn.serve_forever, kwargs={"poll_interval": 0.1},
                     daemon=True).start()
    index_seen: list[str | None] = []

    class Index(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            index_seen.append(self.headers.get("Authorization"))
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{cdn.server_address[1]}/x.whl")
            self.send_header("Content-Length", "0")
            self.end_headers()

    index = _Index(("127.0.0.1", 0), Index)
    threading.Thread(target=index.serve_forever, kwargs={"poll_interval": 0.1},
                     daemon=True).start()
    try:
        env = {"UV_INDEX_URL": f"http://u:pw@127.0.0.1:{index.server_address[1]}/simple"}
        opener = urllib.request.build_opener(fetch._Credentials(fetch._index_credentials(env)))
        url = f"http://127.0.0.1:{index.server_address[1]}/files/{wheel.name}"
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        dest = tmp_path / "dest"
        dest.mkdir()
        item = {"url": url, "name": wheel.name, "sha256": digest}
        assert fetch._download_one(opener, item, str(dest), 10) == wheel.stat().st_size
        assert index_seen == ["Basic " + base64.b64encode(b"u:pw").decode()]
        assert cdn_seen == [None]
        with pytest.raises(ValueError, match="is not the index's"):
            fetch._download_one(opener, dict(item, name="other.whl", sha256="0" * 64),
                                str(dest), 10)
        assert not (dest / "other.whl").exists()
    finally:
        for srv in (index, cdn):
            srv.shutdown()
            srv.server_close()


def test_uv_below_a_folder_only_root_enters_is_still_run_by_the_fetch_uid(tmp_path):
    """dockyard installed in a venv under a 0700 home (/root, or any user's): its uv binary is
    out of the fetch uid's reach, so the resolve step runs a readable copy of it."""
    import uv as uv_package
    from dockyard.runner.fetch import reachable_uv
    home = tmp_path / "home"
    (home / "bin").mkdir(parents=True)
    os.chmod(home, 0o700)
    private_uv = home / "bin" / "uv"
    shutil.copyfile(uv_package.find_uv_bin(), private_uv)
    os.chmod(private_uv, 0o755)
    nobody = 65534
    with pytest.raises(PermissionError):
        subprocess.run([str(private_uv), "--version"], user=nobody, group=nobody,
                       extra_groups=[], capture_output=True, check=True)
    usable = reachable_uv(str(private_uv))
    assert usable != str(private_uv)
    done = subprocess.run([usable, "--version"], user=nobody, group=nobody, extra_groups=[],
                          capture_output=True, text=True, check=True)
    assert done.stdout.startswith("uv ")
    assert reachable_uv(str(private_uv)) == usable       # one copy per worker
    assert os.stat(usable).st_uid == 0 and not os.stat(usable).st_mode & 0o022


def test_the_operators_ca_reaches_the_resolve_step(tmp_path, monkeypatch):
    """SSL_CERT_FILE / SSL_CERT_DIR (a proxy's or a company's CA) go to the resolve step as
    they are when every uid can read them, and as copies it can read when they cannot."""
    reachable = Path(tempfile.mkdtemp(prefix="dockyard-test-ca-", dir="/tmp"))
    os.chmod(reachable, 0o755)
    public = reachable / "public-ca.pem"
    public.write_text("-----BEGIN CERTIFICATE-----\n")
    os.chmod(public, 0o644)
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\nsecret-ish\n")
    os.chmod(hidden, 0o700)
    monkeypatch.setenv("SSL_CERT_FILE", str(public))
    monkeypatch.setenv("SSL_CERT_DIR", str(hidden))
    folder = tmp_path / "build"
    (folder / "home").mkdir(parents=True)
    fetcher = fetch.Fetcher(uv_bin="/usr/bin/true", python="/usr/bin/python3", index_url=None,
                            find_links=(), offline=True, uid=65534, gid=65534,
                            say=lambda line: None)
    try:
        env = fetcher._env(folder)
    finally:
        shutil.rmtree(reachable)
    assert env["SSL_CERT_FILE"] == str(public)
    copied = Path(env["SSL_CERT_DIR"])
    assert copied.parent == folder and (copied / "ca.pem").read_text().endswith("secret-ish\n")


def test_two_workers_on_one_host_fetch_as_different_uids(tmp_path):
    """A resolve step ends by killing every process of its uid: two workers on one host (each
    with its own folder) building the same container must never share that uid."""
    from dockyard.sandbox.uids import fetch_key
    one, two = tmp_path / "a" / "worker", tmp_path / "b" / "worker"
    key = "inst.7.1796650000000000"
    assert fetch_key(key, one) != fetch_key(key, two)
    assert fetch_key(key, one) == fetch_key(key, one)      # stable across restarts
    assert fetch_key(key, one).startswith(key + ".fetch.")
