"""Starts one sandboxed child inside its own view of the system (standard library only; run by
the worker as root: python -I -S -B launch.py REQUEST_FD REPLY_FD).

Three processes, so that each job stays simple:
- the *monitor* (this process, host side): joins the child's cgroups, makes the new
  namespaces, forks, waits and exits the way the child did. It holds the read end of the
  worker's lifeline pipe: when the worker dies (even by SIGKILL) the pipe ends and the monitor
  kills the namespace. (PR_SET_PDEATHSIG cannot do this job: it fires when the *thread* that
  started the process ends, and the worker starts children from short-lived threads.);
- the *init* (pid 1 of the new pid namespace): builds the view (a tmpfs root holding read-only
  binds of what Python needs, the code and the venv, a private /tmp, /dev/shm, /dev and
  /proc), pivots into it, forks the server, drops to the container's uid and reaps orphans;
  when the server exits it exits too, and the kernel kills whatever is left in the namespace;
- the *server* (pid 2): drops every privilege (no groups, no capabilities, no_new_privs),
  sets its rlimits soft and hard, installs the seccomp filter (seccomp.py) and execs the
  venv's interpreter on the bootstrap.

A launcher may be started before it is needed (see runner/spares.py): it waits for its spec,
and the spec says where its output goes. The first frame on REQUEST_FD is the sandbox spec (a marshal-encoded dict built by
dockyard.sandbox.view); every frame after it belongs to the bootstrap. Nothing of the spec is on a command line.
"""

import ctypes
import marshal
import os
import resource
import select
# _signal, not signal: the signal module imports enum, which costs milliseconds per start.
import _signal as signal
import struct
import sys

# Run as a script (python -I -S puts no folder of ours on the path): the filter's module sits
# beside this file. Appended, so that it can never shadow a module of the standard library.
if __package__:
    from . import seccomp
else:
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))
    import seccomp

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
CAPABILITY_VERSION_3 = 0x20080522
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}

SIGHUP, SIGINT, SIGKILL, SIGPIPE, SIGTERM = 1, 2, 9, 13, 15
STOP_SIGNALS = (19, 20, 21, 22)   # SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU: not a way to end
SETUP_FAILED_EXIT = 125     # the sandbox could not be built: the reason is on stderr
HEADER = struct.Struct(">I")
MAX_SPEC = 1 << 20

libc = ctypes.CDLL(None, use_errno=True)


class SandboxError(Exception):
    pass


def _check(result, what):
    if result != 0:
        errno = ctypes.get_errno()
        raise SandboxError(f"{what}: {os.strerror(errno)}")


def _b(text):
    return None if text is None else os.fsencode(text)


def mount(source, target, fstype, flags, data=None):
    _check(libc.mount(_b(source), _b(target), _b(fstype), ctypes.c_ulong(flags), _b(data)),
           f"mount {source or fstype} on {target}")


def prctl(option, value):
    _check(libc.prctl(option, ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0),
                      ctypes.c_ulong(0)), f"prctl {option}")


def pivot_root(new_root, put_old):
    function = getattr(libc, "pivot_root", None)
    if function is not None:
        result = function(_b(new_root), _b(put_old))
    else:
        result = libc.syscall(SYS_PIVOT_ROOT[os.uname().machine], _b(new_root), _b(put_old))
    _check(result, "pivot_root")


def read_exact(fd, size):
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            raise SandboxError("the worker closed the pipe before the sandbox spec arrived")
        data += chunk
    return data


def read_spec(fd):
    """The first frame, read byte-exact so that the bootstrap's frames stay in the pipe."""
    (size,) = HEADER.unpack(read_exact(fd, 4))
    if size > MAX_SPEC:
        raise SandboxError("sandbox spec too large")
    # marshal, not json: the spec comes from the worker (the same interpreter) and json's
    # import alone costs milliseconds on every start.
    spec = marshal.loads(read_exact(fd, size))
    if spec.get("type") != "sandbox":
        raise SandboxError("the first frame is not a sandbox spec")
    return spec


# -- the view ---------------------------------------------------------------------------------

def _makedirs(path):
    os.makedirs(path, mode=0o755, exist_ok=True)


def _touch(path):
    _makedirs(os.path.dirname(path))
    if not os.path.exists(path):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))


def _bind(source, target, read_only=True, devices=False):
    if os.path.isdir(source):
        _makedirs(target)
    else:
        _touch(target)
    mount(source, target, None, MS_BIND | MS_REC)
    flags = MS_REMOUNT | MS_BIND | MS_NOSUID
    if read_only:
        flags |= MS_RDONLY
    if not devices:
        flags |= MS_NODEV
    mount(None, target, None, flags)


def loopback_up():
    """A new network namespace starts with its loopback interface down: bring it up, so a
    function without network can still talk to itself on 127.0.0.1."""
    import fcntl
    import socket
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14s", b"lo", 0, b"")
        flags = struct.unpack_from("16sH", fcntl.ioctl(sock, siocgifflags, request))[1]
        fcntl.ioctl(sock, siocsifflags, struct.pack("16sH14s", b"lo", flags | iff_up, b""))


# -- network = true without the host ----------------------------------------------------------

NAT_READY_S = 5.0


def _route_tables():
    """The namespace's route tables, opened now: the init's pivot into the view (a mount
    namespace this process shares) takes this process's /proc away, and a proc file read
    again from its start shows the table as it is then."""
    return [os.open(path, os.O_RDONLY) for path in ("/proc/net/route", "/proc/net/ipv6_route")]


def _has_default_route(tables):
    """True once the namespace has a default route (pasta --config-net adds it last)."""
    ipv4 = os.pread(tables[0], 1 << 16, 0).decode().splitlines()[1:]
    for line in ipv4:
        fields = line.split()    # Iface Destination Gateway Flags RefCnt Use Metric Mask ...
        if len(fields) > 7 and fields[1] == "00000000" and fields[7] == "00000000":
            return True
    for line in os.pread(tables[1], 1 << 16, 0).decode().splitlines():
        fields = line.split()    # destination, its length, ..., the interface last
        if len(fields) == 10 and fields[0] == "0" * 32 and fields[1] == "00" and \
                fields[9] != "lo":
            return True
    return False


def start_nat(nat, host_net):
    """Give the new network namespace (this process's, made just before) a way out: pasta,
    started in the host's namespace, splices the namespace's TCP and UDP onto sockets of its
    own, and maps nothing back (no gateway mapped to the host, no port forwarded either way),
    so the host's loopback and abstract sockets are not reachable. Routes to the host's own
    addresses are made unreachable inside (finish_nat). Returns pasta's pid and the read end
    of its stderr: it dies with this process (parent-death signal) and is killed when the
    child ends."""
    inner = os.open("/proc/self/ns/net", os.O_RDONLY)
    errors_r, errors_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            prctl(PR_SET_PDEATHSIG, SIGKILL)
            # Python ignores SIGPIPE, and pasta takes an inherited SIG_IGN for an error.
            signal.signal(SIGPIPE, signal.SIG_DFL)
            _check(libc.setns(host_net, CLONE_NEWNET), "setns to the host's network")
            null = os.open("/dev/null", os.O_RDWR)
            for fd in (0, 1):
                os.dup2(null, fd)
            os.dup2(errors_w, 2)
            os.dup2(inner, 3)
            keep = {0, 1, 2, 3}
            for name in os.listdir("/proc/self/fd"):
                if int(name) not in keep:
                    try:
                        os.close(int(name))
                    except OSError:
                        pass
            os.set_inheritable(3, True)
            # --runas 0: pasta joins a namespace owned by the host's user namespace, which
            # needs CAP_SYS_ADMIN there; it then drops every other capability, sandboxes
            # itself (its own mount, user-visible nothing) and runs under its seccomp filter.
            os.execv(nat["pasta"], [nat["pasta"], "--foreground", "--quiet", "--config-net",
                                    "--no-map-gw", "-t", "none", "-u", "none", "-T", "none",
                                    "-U", "none", "--runas", "0", "--netns-only",
                                    # Its end is this process's (killed with the child, or
                                    # by the parent-death signal): no inotify instance of its
                                    # own to watch the namespace (a user has only 128).
                                    "--no-netns-quit", "--netns", "/proc/self/fd/3"])
        except BaseException as exc:  # noqa: BLE001 - the reason goes to the monitor
            os.write(2, f"{exc}\n".encode())
        os._exit(SETUP_FAILED_EXIT)
    os.close(inner)
    os.close(errors_w)
    return pid, errors_r


def finish_nat(nat, pid, errors_r, tables):
    """Wait until pasta has configured the namespace (while the init builds the view), then
    close the routes to the host's own addresses."""
    deadline = _monotonic() + NAT_READY_S
    while not _has_default_route(tables):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done or _monotonic() > deadline:
            if not done:
                os.kill(pid, SIGKILL)
                os.waitpid(pid, 0)
            os.set_blocking(errors_r, False)
            try:
                said = os.read(errors_r, 4096).decode("utf-8", "replace").strip()
            except OSError:
                said = ""
            lines = [ln for ln in said.splitlines() if "syslog" not in ln]
            raise SandboxError("pasta did not set up the network: " +
                               (lines[-1] if lines else "no default route after "
                                f"{NAT_READY_S:.0f}s"))
        select.select([], [], [], 0.001)
    os.close(errors_r)
    for fd in tables:
        os.close(fd)
    block = nat.get("block") or []
    if block:
        _block_routes(block)


def _block_routes(addresses):
    """An unreachable route to each of the host's own addresses, over rtnetlink (the route
    netlink socket of this namespace; no program to run: the view may already hide it).
    socket is imported before the init pivots (main): after it, no module can be found."""
    import socket
    rtm_newroute, nlmsg_error = 24, 2
    flags = 0x1 | 0x4 | 0x400 | 0x200      # NLM_F_REQUEST, ACK, CREATE, EXCL
    rt_table_main, rtprot_static, rt_scope_universe, rtn_unreachable, rta_dst = 254, 4, 0, 7, 1
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0) as sock:   # NETLINK_ROUTE
        for seq, address in enumerate(addresses, 1):
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            raw = socket.inet_pton(family, address)
            body = struct.pack("=BBBBBBBBI", family, len(raw) * 8, 0, 0, rt_table_main,
                               rtprot_static, rt_scope_universe, rtn_unreachable, 0)
            body += struct.pack("=HH", 4 + len(raw), rta_dst) + raw
            sock.send(struct.pack("=IHHII", 16 + len(body), rtm_newroute, flags, seq, 0) + body)
            reply = sock.recv(4096)
            kind, = struct.unpack_from("=H", reply, 4)
            error, = struct.unpack_from("=i", reply, 16) if kind == nlmsg_error else (0,)
            if error not in (0, -17):      # EEXIST: closed already
                raise SandboxError(f"could not close the route to {address}: "
                                   f"{os.strerror(-error)}")


def _monotonic():
    return os.times().elapsed


def build_view(spec):
    """Mount the child's root under spec['root'] and pivot into it."""
    os.umask(0o022)  # the folders made for binds must be traversable by the child's uid
    if not spec.get("network", True) or spec.get("nat"):
        loopback_up()
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    root = spec["root"]
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=4m,mode=0755")
    inside = lambda path: root + path  # noqa: E731 - paths in the spec are absolute
    for source, target, kind in spec["binds"]:
        _bind(source, inside(target), read_only=(kind != "rw"), devices=(kind == "dev"))
    for target, link in spec.get("symlinks", []):
        _makedirs(os.path.dirname(inside(link)))
        os.symlink(target, inside(link))
    for path, text in spec.get("files", {}).items():
        _makedirs(os.path.dirname(inside(path)))
        with open(inside(path), "w") as f:
            f.write(text)
        os.chmod(inside(path), 0o644)
    tmp_size = f"size={int(spec['tmp_mb'])}m"
    for path in ("/tmp", "/dev/shm"):
        _makedirs(inside(path))
        mount("tmpfs", inside(path), "tmpfs", MS_NOSUID | MS_NODEV, tmp_size + ",mode=1777")
    _makedirs(inside("/proc"))
    mount("proc", inside("/proc"), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.chdir(root)
    # Stack the new root on the old one and detach the old: no folder for it is needed.
    pivot_root(".", ".")
    _check(libc.umount2(b".", MNT_DETACH), "detach the host's root")
    os.chdir("/")
    mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    hostname = spec.get("hostname", "sandbox").encode()
    libc.sethostname(hostname, len(hostname))


# -- identity -------------------------------------------------------------------------------

class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def drop_privileges(uid, gid):
    """No capability can come back: bounding and ambient sets emptied, no_new_privs, then
    every uid and gid set to the container's (which clears the effective and permitted
    sets), and the inheritable set cleared."""
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
    except OSError:
        last = 63
    for cap in range(last + 1):
        libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), ctypes.c_ulong(0), ctypes.c_ulong(0),
                   ctypes.c_ulong(0))
    libc.prctl(PR_CAP_AMBIENT, ctypes.c_ulong(PR_CAP_AMBIENT_CLEAR_ALL), ctypes.c_ulong(0),
               ctypes.c_ulong(0), ctypes.c_ulong(0))
    if uid is not None:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    header = _CapHeader(CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(libc.capset(ctypes.byref(header), data), "capset")


def set_rlimits(limits):
    for name, (soft, hard) in limits.items():
        resource.setrlimit(getattr(resource, name), (soft, hard))


# -- the three processes ----------------------------------------------------------------------

def die_by(signum):
    """End this process by `signum`, as the process it waited for ended (SIGKILL has no
    handler to reset: it is sent as it is)."""
    if signum != signal.SIGKILL:
        try:
            signal.signal(signum, signal.SIG_DFL)
        except (OSError, ValueError):   # 32, 33: the C library's own; the caller exits
            return
    os.kill(os.getpid(), signum)


def exit_like(status):
    """Leave the way a waited-for process left: the same exit code or the same signal."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        die_by(signum)
        os._exit(128 + signum)
    code = os.WEXITSTATUS(status)
    if 128 < code <= 128 + 64:
        # The init cannot die by a signal (it is pid 1): it exits 128 + n for the server's
        # signal n, and the monitor turns that back into the signal.
        signum = code - 128
        if signum not in STOP_SIGNALS:
            die_by(signum)
    os._exit(code)


def _close(fds):
    # The pipes belong to the server alone: a copy held here would hide its death from the
    # worker (no end-of-file).
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def run_init(spec, fds):
    """pid 1 of the namespace: fork the server, then reap everything until it exits."""
    server = os.fork()
    if server == 0:
        run_server(spec)
    _close(fds)
    drop_privileges(spec.get("uid"), spec.get("gid"))
    # Changing uid cleared the parent-death signal: set it again.
    prctl(PR_SET_PDEATHSIG, SIGKILL)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(0)
        except InterruptedError:
            continue
        if pid == server:
            if os.WIFSIGNALED(status):
                os._exit(128 + os.WTERMSIG(status))
            os._exit(os.WEXITSTATUS(status))


def run_server(spec):
    try:
        for signum in (SIGTERM, SIGINT, SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        set_rlimits(spec.get("rlimits", {}))
        drop_privileges(spec.get("uid"), spec.get("gid"))
        os.umask(0o077)
        os.chdir(spec["cwd"])
        # Last, so that it binds the function and all it starts; without a table for this
        # machine there is none (the isolation summary says so). A filter that cannot be
        # installed stops the start: the function never runs without it.
        arch = seccomp.machine()
        if arch is not None:
            seccomp.install(arch)
        os.execve(spec["argv"][0], spec["argv"], spec["env"])
    except BaseException as exc:  # noqa: BLE001 - anything here means the child cannot run
        os.write(2, f"dockyard sandbox: cannot start the function process: {exc}\n".encode())
    os._exit(SETUP_FAILED_EXIT)


def watch(init, lifeline):
    """Wait for the init to exit; if the worker's lifeline ends first, kill the namespace."""
    try:
        pidfd = os.pidfd_open(init)
    except (AttributeError, OSError):
        pidfd = None
    while lifeline is not None:
        try:
            ready, _, _ = select.select([lifeline] + ([pidfd] if pidfd is not None else []),
                                        [], [], None if pidfd is not None else 0.5)
        except InterruptedError:
            continue
        if lifeline in ready and not os.read(lifeline, 64):
            os.kill(init, SIGKILL)  # the worker is gone: so is everything it ran
            break
        if pidfd in ready or (pidfd is None and os.waitpid(init, os.WNOHANG)[0]):
            break
    while True:
        try:
            _, status = os.waitpid(init, 0)
            return status
        except ChildProcessError:
            return 0
        except InterruptedError:
            continue


def take_over(spec):
    """A launcher started ahead of need learns only now whose it is: write to that child's
    output files and stand in its version's folder (where a worker that starts again looks
    for leftovers)."""
    for fd, key in ((1, "stdout"), (2, "stderr")):
        if spec.get(key):
            target = os.open(spec[key], os.O_RDWR | os.O_APPEND)
            os.dup2(target, fd)
            os.close(target)
    if spec.get("host_cwd"):
        os.chdir(spec["host_cwd"])


def main():
    fds = [int(arg) for arg in sys.argv[1:3]]
    lifeline = int(sys.argv[3]) if len(sys.argv) > 3 else None
    # The worker's SIGTERM to the process group is for the bootstrap (a graceful stop).
    for signum in (SIGTERM, SIGINT, SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    nat_pid = None
    try:
        spec = read_spec(fds[0])
        take_over(spec)
        flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP
        nat = spec.get("nat") if spec.get("network", True) else None
        if nat:
            # Its own network namespace first, with pasta as the way out. pasta is started
            # before this process joins the child's cgroups (its ~30 MB of packet buffers are
            # not the function's to pay; it dies with this process) and before the pid
            # namespace (it is never the namespace's init).
            host_net = os.open("/proc/self/ns/net", os.O_RDONLY)
            _check(libc.unshare(ctypes.c_int(CLONE_NEWNET)), "unshare the network")
            nat_pid, nat_errors = start_nat(nat, host_net)
            nat_tables = _route_tables()
            import socket  # noqa: F401 - for _block_routes, while the modules are in reach
            os.close(host_net)
        for folder in spec.get("cgroups", []):
            with open(os.path.join(folder, "cgroup.procs"), "w") as f:
                f.write("0")
        if not nat and not spec.get("network", True):
            flags |= CLONE_NEWNET
        _check(libc.unshare(ctypes.c_int(flags)), "unshare")
    except (OSError, SandboxError, ValueError) as exc:
        os.write(2, f"dockyard sandbox: {exc}\n".encode())
        os._exit(SETUP_FAILED_EXIT)
    # With pasta, the init builds the view while pasta sets up the network, and starts the
    # function only once the monitor says the network is ready (a byte on this pipe).
    go_read, go_write = os.pipe() if nat_pid else (None, None)
    init = os.fork()
    if init == 0:
        try:
            # This process is single-threaded: its death is the init's.
            prctl(PR_SET_PDEATHSIG, SIGKILL)
            if lifeline is not None:
                os.close(lifeline)
            if go_write is not None:
                os.close(go_write)
            if nat_pid:
                for fd in (nat_errors, *nat_tables):
                    os.close(fd)
            build_view(spec)
            if go_read is not None:
                if os.read(go_read, 1) != b"1":
                    os._exit(SETUP_FAILED_EXIT)     # the monitor said why
                os.close(go_read)
        except (OSError, SandboxError) as exc:
            os.write(2, f"dockyard sandbox: cannot build the view: {exc}\n".encode())
            os._exit(SETUP_FAILED_EXIT)
        run_init(spec, fds)
    _close(fds)
    if nat_pid:
        os.close(go_read)
        try:
            finish_nat(nat, nat_pid, nat_errors, nat_tables)
            os.write(go_write, b"1")
        except (OSError, SandboxError) as exc:
            os.write(2, f"dockyard sandbox: {exc}\n".encode())
        os.close(go_write)
    status = watch(init, lifeline)
    if nat_pid:
        try:
            os.kill(nat_pid, SIGKILL)
            os.waitpid(nat_pid, 0)
        except OSError:
            pass
    exit_like(status)


if __name__ == "__main__":
    main()
