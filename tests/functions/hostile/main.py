"""Functions that try to escape their sandbox; each returns what it managed to do."""

import os
import socket
import time


def spin(event):
    while True:
        pass


def kill_self(event):
    import signal
    print("about to go")
    os.kill(os.getpid(), getattr(signal, event.get("signal", "SIGKILL")))
    time.sleep(5)


def exit_with(event):
    print("leaving")
    os._exit(int(event["code"]))


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


# -- the view: what a function can see and reach --------------------------------------------

BOOT = os.urandom(8).hex()   # tells one process from its replacement (pids repeat in a view)


def boot(event):
    return {"boot": BOOT, "pid": os.getpid(), "uid": os.getuid()}


def exists(event):
    return {path: os.path.exists(path) for path in event["paths"]}


def listdir(event):
    try:
        return sorted(os.listdir(event["path"]))
    except OSError as exc:
        return {"error": type(exc).__name__}


def processes(event):
    """Every process this function can see, with whatever of its command line it can read."""
    seen = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    seen[name] = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
            except OSError as exc:
                seen[name] = type(exc).__name__
    return seen


def write_text(event):
    try:
        with open(event["path"], "w") as f:
            f.write(event.get("text", "x"))
        return {"written": True}
    except OSError as exc:
        return {"error": type(exc).__name__}


def read_text(event):
    try:
        with open(event["path"]) as f:
            return {"text": f.read()}
    except OSError as exc:
        return {"error": type(exc).__name__}


def fill(event):
    """Write until the disk says no: the bytes that fit."""
    written = 0
    chunk = b"\0" * (1 << 20)
    try:
        with open(event["path"], "wb") as f:
            for _ in range(int(event.get("max_mb", 4096))):
                f.write(chunk)
                f.flush()
                written += len(chunk)
    except OSError as exc:
        return {"written_mb": written >> 20, "error": type(exc).__name__}
    return {"written_mb": written >> 20}


def sysv_shm(event):
    """Make a SysV shared memory segment that outlives this process unless its IPC namespace
    dies with it; return what /proc/sysvipc/shm lists."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if event.get("create"):
        shmid = libc.shmget(0x0D0C, int(event.get("mb", 8)) << 20, 0o1666)  # IPC_CREAT | 0666
        if shmid < 0:
            return {"error": os.strerror(ctypes.get_errno())}
    with open("/proc/sysvipc/shm") as f:
        return {"segments": len(f.read().splitlines()) - 1}


def lift_cpu(event):
    """Try to lift the CPU-time limit, then burn CPU in a thread that outlives the call."""
    import resource
    import threading
    soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
    result = {"soft": soft, "hard": hard}
    try:
        resource.setrlimit(resource.RLIMIT_CPU, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        result["lifted"] = "infinity"
    except (ValueError, OSError) as exc:
        result["lifted"] = type(exc).__name__
        try:
            resource.setrlimit(resource.RLIMIT_CPU, (hard, hard))
        except (ValueError, OSError):
            pass

    def burn():
        while True:
            pass

    threading.Thread(target=burn, daemon=True).start()
    return result


def burn(event):
    """Spin `threads` threads for `seconds` of wall time: the CPU seconds they got."""
    import threading
    end = time.monotonic() + float(event.get("seconds", 2))
    started_cpu, started = time.process_time(), time.monotonic()

    def spin():
        while time.monotonic() < end:
            pass

    workers = [threading.Thread(target=spin) for _ in range(int(event.get("threads", 2)))]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return {"cpu_s": time.process_time() - started_cpu, "wall_s": time.monotonic() - started}


def fork_burn(event):
    """Leave a forked process burning CPU after the call returns, out of the call's session,
    with its own CPU limit lifted as far as it goes."""
    import resource
    if os.fork() == 0:
        os.setsid()
        try:
            soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
            resource.setrlimit(resource.RLIMIT_CPU, (hard, hard))
        except (ValueError, OSError):
            pass
        while True:
            pass
    return "forked"


def bad_reply(event):
    """Write straight to the reply pipe (its fd is on the bootstrap's command line) and to
    every direct channel (the other sockets it holds): a header announcing a huge frame, or a
    frame that is JSON but not a reply."""
    import struct
    with open("/proc/self/cmdline", "rb") as f:
        args = f.read().split(b"\0")
    request_fd, reply_fd = int(args[-3]), int(args[-2])
    if event.get("mode") == "huge":
        data = struct.pack(">I", 64 * 1024 * 1024) + b"[" + b"0," * 1000
    else:
        body = b"[1,2,3]"
        data = struct.pack(">I", len(body)) + body
    targets = [reply_fd]
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("socket:") and \
                    int(name) != request_fd:
                targets.append(int(name))
        except OSError:
            pass
    for fd in targets:
        try:
            os.write(fd, data)
        except OSError:
            pass
    return "after"


def kernel_escape(event):
    """The usual first steps of a kernel exploit: a user namespace (full capabilities inside
    it), and a key in the user keyring (which outlives the process). What each call gave."""
    import ctypes
    import errno
    libc = ctypes.CDLL(None, use_errno=True)

    def outcome(result):
        return "done" if result >= 0 else errno.errorcode.get(ctypes.get_errno(), "?")

    add_key = {"x86_64": 248, "aarch64": 217}[os.uname().machine]
    return {"unshare": outcome(libc.unshare(0x10000000)),               # CLONE_NEWUSER
            "add_key": outcome(libc.syscall(ctypes.c_long(add_key), b"user", b"dockyard-escape",
                                            b"x", ctypes.c_size_t(1), ctypes.c_int(-4)))}


def shrink_pages(event):
    """Find the shared pages this process can reach (its slot, through its descriptors or its
    memory map) and try to shrink and grow them: whoever reads a shrunk page dies of SIGBUS.
    What each attempt gave."""
    outcomes = {}
    candidates = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if "memfd:" in os.readlink(f"/proc/self/fd/{name}"):
                candidates.append(f"/proc/self/fd/{name}")
        except OSError:
            pass
    try:
        for name in os.listdir("/proc/self/map_files"):
            try:
                if "memfd:" in os.readlink(f"/proc/self/map_files/{name}"):
                    candidates.append(f"/proc/self/map_files/{name}")
            except OSError as exc:
                outcomes.setdefault("readlink map_files", type(exc).__name__)
    except OSError as exc:
        outcomes["list map_files"] = type(exc).__name__
    for path in candidates:
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            outcomes[path] = f"open: {type(exc).__name__}"
            continue
        try:
            os.ftruncate(fd, 0)
            outcomes[path] = "shrunk"
        except OSError as exc:
            outcomes[path] = f"ftruncate: {type(exc).__name__}"
        finally:
            os.close(fd)
    return {"candidates": len(candidates), "outcomes": outcomes}
