"""`python -m bench.build [--runs N] [--json FILE]`: the build time of a one-dependency package,
the one-step install that builds used to do (`uv pip install` in a view with the network and a
cache kept per container) beside the two steps they do now (resolve and download as the fetch
uid, then install offline in a view without network, with a cache of the build's own), in the
same run, alternating, on the same machine. The dependency comes from a local wheelhouse
(`--find-links`, offline) and from a local HTTP index serving the same wheel; no internet.
Needs root (a view, uids of its own) like the worker's builds do."""

from __future__ import annotations

import argparse
import copy
import hashlib
import http.server
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import uv

from dockyard.runner.venvs import Builder, UvOptions, version_paths
from dockyard.sandbox.cgroups import remove_root
from dockyard.sandbox.isolation import NOBODY, Isolation, choose_python, run_in_view
from dockyard.sandbox.view import CODE as VIEW_CODE
from dockyard.sandbox.view import VENV as VIEW_VENV

from .servers import tiny_wheelhouse

MANIFEST = {"name": "benchbuild", "dependencies": ["benchdep"],
            "functions": {"f": "main:f"}}


def _package(folder: Path) -> tuple[Path, str]:
    archive = folder / "package.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("dockyard.toml", 'name = "benchbuild"\ndependencies = ["benchdep"]\n'
                                     '[functions]\nf = "main:f"\n')
        zf.writestr("main.py", "import benchdep\n\ndef f(event):\n    return benchdep.value()\n")
    return archive, hashlib.sha256(archive.read_bytes()).hexdigest()


def _index(wheelhouse: Path) -> http.server.ThreadingHTTPServer:
    """A simple index (PEP 503) of the wheelhouse, on 127.0.0.1."""
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(wheelhouse.parent / "index"), **kwargs)

        def log_message(self, *args):
            pass

    root = wheelhouse.parent / "index"
    for wheel in wheelhouse.glob("*.whl"):
        name = wheel.name.split("-")[0]
        (root / "simple" / name).mkdir(parents=True, exist_ok=True)
        (root / "files").mkdir(exist_ok=True)
        shutil.copyfile(wheel, root / "files" / wheel.name)
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        (root / "simple" / name / "index.html").write_text(
            f'<a href="../../files/{wheel.name}#sha256={digest}">{wheel.name}</a>\n')
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                     daemon=True).start()
    return server


def _chown_tree(root: Path, uid, gid, readable: bool = False) -> None:
    """The walk the one-step build did before and after its install (kept here to measure
    it; it followed what package code swapped in, see tests/test_build_gates.py)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [dirpath, *(os.path.join(dirpath, f) for f in filenames)]:
            os.lchown(name, uid, gid)
            if readable and not os.path.islink(name):
                mode = os.lstat(name).st_mode
                os.chmod(name, 0o755 if (mode & 0o111 or name == dirpath) else 0o644)


def one_step(builder: Builder, spec: dict, say, keep_cache: bool = True) -> None:
    """What a build with a view was before the split, for comparison: `uv venv` as root, then
    `uv pip install` in a view with the network, as the container's uid, with the container's
    lasting cache, the index on the command line, and root's walks around it."""
    isolation, opts = builder.isolation, builder.uv
    paths = version_paths(builder.worker_dir, spec)
    builder._uv(["venv", "--relocatable", "--python", opts.python, str(paths.venv)], say)
    uid, gid = isolation.identity(spec["uid_key"])
    cache = builder.worker_dir / spec["container"] / ".uv-cache-bench"
    if not keep_cache:
        shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(exist_ok=True)
    links = builder.worker_dir / spec["container"] / ".build-links-bench"
    binds = [(str(paths.code), VIEW_CODE, "ro"), (str(paths.venv), VIEW_VENV, "rw"),
             (opts.uv_bin, "/dockyard/uv", "ro"), (str(cache), "/dockyard/cache", "rw")]
    argv = ["/dockyard/uv", "pip", "install", "--python", f"{VIEW_VENV}/bin/python",
            "--link-mode=copy", "--no-config"]
    if opts.index_url:
        argv += ["--index-url", opts.index_url]
    from dockyard.runner.fetch import link_tree
    for n, folder in enumerate(opts.find_links):
        link_tree(Path(folder), links / str(n))
        binds.append((str(links / str(n)), f"/dockyard/links/{n}", "ro"))
        argv += ["--find-links", f"/dockyard/links/{n}"]
    if opts.offline:
        argv.append("--offline")
    for path in (paths.venv, cache):
        _chown_tree(path, uid, gid)
    group = isolation.cgroups.create(f"bench-{os.getpid()}", 4096, 512) \
        if isolation.cgroups else None
    try:
        # The host's network, as builds had it (a view's network = true may now be NAT).
        layout = copy.copy(isolation.view)
        layout.nat = None
        code, output = run_in_view(
            layout, [*argv, *MANIFEST["dependencies"]], network=True, uid=uid, gid=gid,
            binds=binds, env={"PATH": "/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp",
                              "UV_CACHE_DIR": "/dockyard/cache", "UV_PYTHON_DOWNLOADS": "never",
                              "UV_NO_PROGRESS": "1"},
            cwd=VIEW_CODE, tmp_mb=2048, timeout=900,
            cgroups=group.folders() if group else [])
    finally:
        if group is not None:
            group.remove()
        shutil.rmtree(links, ignore_errors=True)
        _chown_tree(paths.venv, 0, 0, readable=True)
    if code != 0:
        raise RuntimeError(f"one-step install failed: {output[-2000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.build")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench.build needs root: builds run in a view, as uids of their own")
        return 1
    root = Path(tempfile.mkdtemp(prefix="dockyard-bench-build-"))
    os.chmod(root, 0o700)
    isolation = Isolation()
    isolation.detect(f"w{os.getpid()}")
    try:
        if isolation.view is None:
            print(f"no view on this host ({isolation.view_note}): builds take one step")
            return 1
        python, _ = choose_python(None, NOBODY, isolation.runnable)
        isolation.use_interpreter(python)
        wheelhouse = tiny_wheelhouse(root / "wheelhouse")
        index = _index(wheelhouse)
        archive, sha = _package(root)
        sources = {
            "wheelhouse": UvOptions(uv_bin=uv.find_uv_bin(), python=python,
                                    find_links=(str(wheelhouse),), offline=True),
            "local index": UvOptions(uv_bin=uv.find_uv_bin(), python=python,
                                     index_url=f"http://127.0.0.1:{index.server_address[1]}"
                                               "/simple"),
        }
        key = f"bench-{os.urandom(4).hex()}.1.{int(time.time() * 1e6)}"
        results: dict = {}
        for label, opts in sources.items():
            worker_dir = root / ("worker-" + label.replace(" ", "-"))
            worker_dir.mkdir()
            os.chmod(worker_dir, 0o700)
            builder = Builder(worker_dir, opts, lambda _sha, dest: shutil.copyfile(archive, dest),
                              private=True, isolation=isolation)
            times = {"one step (cache kept)": [], "one step (fresh cache)": [],
                     "two steps": [], "step 1 (fetch)": [], "step 2 (install)": []}
            for run in range(args.runs + 1):   # the first round warms up, not counted
                for way in ("one step (cache kept)", "one step (fresh cache)", "two steps"):
                    spec = {"container": "benchbuild", "version": f"v{len(way)}-{run}",
                            "content_sha256": hashlib.sha256(f"{way}{run}".encode()).hexdigest(),
                            "artifact_sha256": sha, "manifest": MANIFEST, "uid_key": key}
                    marks: dict[str, float] = {}

                    def say(line, marks=marks):
                        if line.startswith("resolving"):
                            marks["fetch"] = time.perf_counter()
                        elif line.startswith("installing"):
                            marks["install"] = time.perf_counter()
                    started = time.perf_counter()
                    if way == "two steps":
                        builder.build(spec, say)
                    else:
                        builder.build(dict(spec, manifest={**MANIFEST, "dependencies": []}),
                                      say)   # code and an empty venv, as the worker does
                        shutil.rmtree(version_paths(worker_dir, spec).venv)
                        one_step(builder, spec, say, keep_cache="kept" in way)
                    took = time.perf_counter() - started
                    if run == 0:
                        continue
                    times[way].append(took)
                    if way == "two steps":
                        times["step 1 (fetch)"].append(marks["install"] - marks["fetch"])
                        times["step 2 (install)"].append(started + took - marks["install"])
            results[label] = {k: round(statistics.median(v) * 1000, 1) for k, v in times.items()}
        index.shutdown()
        print(f"build of a one-dependency package, median of {args.runs} runs (ms); "
              f"{os.cpu_count()} cores, Python {sys.version.split()[0]}")
        print(f"{'dependency from':<16}{'one step':>10}{'fresh cache':>13}{'two steps':>11}"
              f"{'ratio':>7}{'step 1':>8}{'step 2':>8}")
        for label, row in results.items():
            one, two = row["one step (cache kept)"], row["two steps"]
            print(f"{label:<16}{one:>10.1f}{row['one step (fresh cache)']:>13.1f}{two:>11.1f}"
                  f"{two / one:>7.2f}{row['step 1 (fetch)']:>8.1f}"
                  f"{row['step 2 (install)']:>8.1f}")
        print("one step: uv pip install in a view with the network and the container's kept "
              "cache (before the split); fresh cache: the same with an empty cache; two steps: "
              "what builds do now (step 1 resolves and downloads as the fetch uid, step 2 "
              "installs offline in a view without network); ratio: two steps / one step")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        return 0
    finally:
        if isolation.cgroups is not None:
            remove_root(isolation.cgroups)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
