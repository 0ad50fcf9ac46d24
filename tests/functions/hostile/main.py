"""Functions that try to escape their sandbox; each returns what it managed to do."""

import os
import socket
import time


def spin(event):
    while True:
        pass


def hog(event):
    # Written, not just reserved: the pages are really used.
    return len(b"x" * (int(event["mb"]) * 1024 * 1024))


def forkbomb(event):
    forked = 0
    for _ in range(int(event.get("n", 1000))):
        try:
            pid = os.fork()
        except OSError:
            break
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        forked += 1
    return forked


def detach(event):
    """Double-fork into a new session: the grandchild outlives this call and its parent."""
    read, write = os.pipe()
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.write(write, str(os.getpid()).encode())
            os.close(write)
            time.sleep(600)
            os._exit(0)
        os._exit(0)
    os.close(write)
    pid = int(os.read(read, 32))
    os.wait()
    return pid


def connect(event):
    try:
        with socket.create_connection((event["host"], int(event["port"])), timeout=2):
            return "connected"
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def read_file(event):
    try:
        with open(event["path"], "rb") as f:
            return {"read": len(f.read(100))}
    except OSError as exc:
        return {"error": type(exc).__name__}


def write_file(event):
    try:
        with open(event["path"], "a") as f:
            f.write("pwned\n")
        return {"written": True}
    except OSError as exc:
        return {"error": type(exc).__name__}


def whoami(event):
    return {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(), "pid": os.getpid(),
            "cwd": os.getcwd(), "tmp": os.environ.get("TMPDIR")}


def environ(event):
    return dict(os.environ)
