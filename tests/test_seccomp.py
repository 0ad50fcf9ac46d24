"""The seccomp filter of function processes (sandbox/seccomp.py), run for real: installed on a
process of its own on the host (as root, where nothing but the filter says no), and through the
launcher in a view, where ordinary work must still run under it."""

from __future__ import annotations

import errno
import os
import re
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dockyard.sandbox import seccomp
from dockyard.sandbox.isolation import Isolation, run_sandboxed
from dockyard.sandbox.view import HostLayout

ARCH = seccomp.machine()
SANDBOX = str(Path(seccomp.__file__).parent)
PYTHON = "/usr/bin/python3"
CLONE_NEWUSER = 0x10000000
SIGCHLD = 17

needs_table = pytest.mark.skipif(ARCH is None, reason=seccomp.describe(None))
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="namespaces need root here")
needs_python = pytest.mark.skipif(not os.path.exists(PYTHON), reason=f"no {PYTHON}")

# The start of every probe: a raw syscall() by name, and a list of what went wrong; the probe
# exits non-zero with that list (run_sandboxed returns the last line of its output).
PRELUDE = '''
import ctypes, errno, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
NR = {numbers!r}
failures = []

def call(name, *args):
    ctypes.set_errno(0)
    args = [a if isinstance(a, bytes) else ctypes.c_long(a) for a in args]
    return libc.syscall(ctypes.c_long(NR.get(name, name)), *args), ctypes.get_errno()

def expect(name, want, *args):
    result, err = call(name, *args)
    if name == "clone" and result == 0:
        os._exit(0)     # a child the filter should have refused: it must not run the probe
    if result != -1 or err != want:
        failures.append(f"{{name}}: {{result}} {{errno.errorcode.get(err, err)}}, "
                        f"not {{errno.errorcode[want]}}")

def done():
    if failures:
        sys.exit("; ".join(failures))
'''


def probe(body: str, install: bool = False) -> str:
    numbers = {name: number for name, (number, _) in seccomp.table(ARCH).items()}
    source = PRELUDE.format(numbers=numbers)
    if install:
        source += textwrap.dedent(f'''
            sys.path.insert(0, {SANDBOX!r})
            import seccomp
            if libc.prctl(38, ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0),
                          ctypes.c_ulong(0)) != 0:   # PR_SET_NO_NEW_PRIVS
                sys.exit("no_new_privs")
            seccomp.install({ARCH!r})
            ''')
    return source + textwrap.dedent(body)


def run_on_host(source: str) -> subprocess.CompletedProcess:
    # A session of its own: no controlling terminal for vhangup to hang up, were it let through.
    return subprocess.run([sys.executable, "-I", "-c", source], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, start_new_session=True, timeout=60)


# -- the program itself -------------------------------------------------------------------------

def run_filter(code: bytes, arch: int, nr: int, args=(0,) * 6) -> int:
    """A classic BPF interpreter for the few instructions the filter uses."""
    data = struct.pack("=iIQ6Q", nr, arch, 0, *args)
    program = [struct.unpack("=HBBI", code[i:i + 8]) for i in range(0, len(code), 8)]
    pc, a = 0, 0
    while True:
        op, jt, jf, k = program[pc]
        if op == seccomp.LD_W_ABS:
            (a,) = struct.unpack_from("=I", data, k)
            pc += 1
        elif op == seccomp.JEQ:
            pc += 1 + (jt if a == k else jf)
        elif op == seccomp.JSET:
            pc += 1 + (jt if a & k else jf)
        elif op == seccomp.RET:
            return k
        else:
            raise AssertionError(f"unexpected instruction {op:#x}")


@pytest.mark.parametrize("arch", seccomp.ARCHES)
def test_the_program_refuses_what_it_lists_and_allows_the_rest(arch):
    code = seccomp.program(arch)
    audit = seccomp.AUDIT_ARCH[arch]
    table = seccomp.table(arch)
    eperm = seccomp.SECCOMP_RET_ERRNO | errno.EPERM
    allow, kill = seccomp.SECCOMP_RET_ALLOW, seccomp.SECCOMP_RET_KILL_PROCESS
    assert len(code) % 8 == 0 and len(code) // 8 < 100
    for name, (number, what) in table.items():
        if what == "EPERM":
            assert run_filter(code, audit, number) == eperm, name
    assert run_filter(code, audit, table["clone3"][0]) == seccomp.SECCOMP_RET_ERRNO | errno.ENOSYS
    clone = table["clone"][0]
    assert run_filter(code, audit, clone, (0x01200011, 0, 0, 0, 0, 0)) == allow   # fork()
    assert run_filter(code, audit, clone, (0x003D0F00, 0, 0, 0, 0, 0)) == allow   # a thread
    for flag in (0x00020000, 0x02000000, 0x04000000, 0x08000000, CLONE_NEWUSER, 0x20000000,
                 0x40000000):
        assert run_filter(code, audit, clone, (flag | SIGCHLD, 0, 0, 0, 0, 0)) == eperm
    # The kernel reads only clone's low 32 bits: high bits do not hide a flag, nor add one.
    assert run_filter(code, audit, clone, ((1 << 40) | CLONE_NEWUSER, 0, 0, 0, 0, 0)) == eperm
    assert run_filter(code, audit, clone, ((0xFF << 32) | SIGCHLD, 0, 0, 0, 0, 0)) == allow
    personality = table["personality"][0]
    for value, verdict in ((0, allow), (0xFFFFFFFF, allow), (0x0040000, eperm), (8, eperm)):
        assert run_filter(code, audit, personality, (value, 0, 0, 0, 0, 0)) == verdict, value
    eafnosupport = seccomp.SECCOMP_RET_ERRNO | errno.EAFNOSUPPORT
    for name in ("socket", "socketpair"):
        number = table[name][0]
        for family in (1, 2, 10, 16):       # unix, inet, inet6, netlink
            assert run_filter(code, audit, number, (family, 1, 0, 0, 0, 0)) == allow, family
        for family in (40, 17, 31, 38, 0, 0xFFFF):  # vsock, packet, bluetooth, alg, ...
            assert run_filter(code, audit, number, (family, 1, 0, 0, 0, 0)) == eafnosupport
        # The family is an int: high bits of the register do not change it.
        assert run_filter(code, audit, number, ((1 << 40) | 40, 1, 0, 0, 0, 0)) == eafnosupport
    for number in (0, 1, 3, 39, 59, 60, 63, 231, 500):   # read, write, close, execve, ...
        if number not in {n for n, _ in table.values()}:
            assert run_filter(code, audit, number) == allow, number
    # Another ABI: its numbers mean other calls, so the process dies whatever the call.
    for other in (0x40000003, 0x40000028, 0xC00000B7 if arch == "x86_64" else 0xC000003E):
        assert run_filter(code, other, 39) == kill
    if arch == "x86_64":
        assert run_filter(code, audit, 0x40000000 | 39) == kill    # x32
        assert run_filter(code, audit, 0x40000000 | 272) == kill
    # Only clone and personality read an argument: every other call is decided by its number
    # alone, so the kernel can prove it allowed once and skip the filter.
    instructions = [struct.unpack("=HBBI", code[i:i + 8]) for i in range(0, len(code), 8)]
    first_arg_load = instructions.index((seccomp.LD_W_ABS, 0, 0, seccomp.ARG0))
    assert instructions[first_arg_load - 1] == (seccomp.RET, 0, 0, allow)


def _header_numbers(path: str, names) -> dict[str, int]:
    text = Path(path).read_text()
    found = {}
    for name in names:
        match = re.search(rf"#define __NR_{name}\s+(\d+)\b", text)
        if match:
            found[name] = int(match.group(1))
    return found


@pytest.mark.parametrize("arch,header", [
    ("x86_64", "/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
    ("aarch64", "/usr/include/asm-generic/unistd.h"),
])
def test_the_tables_agree_with_the_kernel_headers(arch, header):
    if not os.path.exists(header):
        pytest.skip(f"{header} is not installed")
    table = seccomp.table(arch)
    found = _header_numbers(header, table)
    assert len(found) >= len(table) - 2, sorted(set(table) - set(found))
    assert {name: table[name][0] for name in found} == found


def test_summary_says_what_is_filtered_or_why_not(monkeypatch):
    isolation = Isolation(drop_privileges=False)
    isolation.view_note = "the worker does not run as root"
    off = isolation.summary()["syscalls"]
    assert off["on"] is False and "no seccomp filter" in off["why"] and "root" in off["why"]
    isolation.view = HostLayout([], [])
    if ARCH is not None:
        on = isolation.summary()["syscalls"]
        assert on["on"] is True and "seccomp" in on["how"] and "EPERM" in on["how"]
    monkeypatch.setattr(seccomp, "machine", lambda: None)
    unknown = isolation.summary()["syscalls"]
    assert unknown["on"] is False and "no system call table for" in unknown["why"]


# -- installed on a process on the host, as root ------------------------------------------------

# Arguments that do nothing should the filter let a call through (bad fds, null pointers,
# paths that do not exist, flags no kernel accepts): zeros unless said here.
HARMLESS = {
    "unshare": (CLONE_NEWUSER,),
    "setns": (-1, 0),
    "umount2": (b"/nonexistent-dockyard", 0),
    "pivot_root": (b"/nonexistent-dockyard", b"/nonexistent-dockyard"),
    "chroot": (b"/nonexistent-dockyard",),
    "open_tree": (-1, b"/nonexistent-dockyard", 0),
    "fsopen": (b"nonexistent-dockyard", 0),
    "fsconfig": (-1, 0, 0, 0, 0),
    "fsmount": (-1, 0, 0),
    "io_uring_enter": (-1, 0, 0, 0, 0, 0),
    "io_uring_register": (-1, 0, 0, 0),
    "keyctl": (0xFFFF,),
    "bpf": (0xFFFF, 0, 0),
    "userfaultfd": (0xFFFF,),
    "kexec_load": (0, 0, 0, 0xFFFFFFFF),
    "kexec_file_load": (-1, -1, 0, 0, 0xFFFFFFFF),
    "finit_module": (-1, b"", 0),
    "delete_module": (b"nonexistent_dockyard", 0),
    "acct": (b"/nonexistent-dockyard",),
    "swapon": (b"/nonexistent-dockyard", 0),
    "swapoff": (b"/nonexistent-dockyard",),
    "reboot": (0, 0, 0, 0),       # no magic: EINVAL
    "syslog": (10, 0, 0),         # the size of the kernel's log buffer
    "ptrace": (16, 0x3FFFFFFF),   # PTRACE_ATTACH to no process
    "process_vm_readv": (0x3FFFFFFF, 0, 0, 0, 0, 0),
    "process_vm_writev": (0x3FFFFFFF, 0, 0, 0, 0, 0),
    "kcmp": (0x3FFFFFFF, 0x3FFFFFFF, 0, 0, 0),
    "quotactl_fd": (-1, 0, 0, 0),
}

EVERY_CALL = '''
for name, what in WHAT.items():
    if what == "EPERM":
        expect(name, errno.EPERM, *HARMLESS.get(name, ()))
expect("clone3", errno.ENOSYS, 0, 0)
expect("clone", errno.EPERM, CLONE_NEWUSER | 17, 0, 0, 0, 0)
expect("personality", errno.EPERM, 0x0040000)          # ADDR_NO_RANDOMIZE
for query in (0xFFFFFFFF, 0):
    result, err = call("personality", query)
    if result < 0:
        failures.append(f"personality({query:#x}): {errno.errorcode.get(err, err)}")
pid = os.fork()                                        # clone without namespace flags
if pid == 0:
    os._exit(7)
if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 7:
    failures.append("fork")
done()
'''


@needs_table
@needs_root
def test_the_filter_says_no_even_to_root():
    body = (f"HARMLESS = {HARMLESS!r}\nCLONE_NEWUSER = {CLONE_NEWUSER}\n"
            f"WHAT = {dict((n, w) for n, (_, w) in seccomp.table(ARCH).items())!r}\n")
    done = run_on_host(probe(body + EVERY_CALL, install=True))
    assert done.returncode == 0, done.stderr.strip().splitlines()[-1:]
    # Without the filter these calls are root's to make: the EPERMs above were the filter's.
    control = run_on_host(probe('''
        result, err = call("unshare", 0x10000000)
        assert result == 0, err
        for name, args in (("setns", (-1, 0)), ("chroot", (b"/nonexistent-dockyard",)),
                           ("keyctl", (0xFFFF,)), ("clone3", (0, 0)),
                           ("personality", (0x0040000,))):
            result, err = call(name, *args)
            assert err != errno.EPERM and err != errno.ENOSYS, (name, result, err)
        '''))
    assert control.returncode == 0, control.stderr


@needs_table
@needs_root
def test_a_call_through_another_abi_kills_the_process():
    if ARCH != "x86_64":
        pytest.skip("the other ABIs probed here are x86_64's (x32, i386)")
    # i386's getpid (20) through int 0x80, from a page of our own; x32's getpid (39 | x32 bit).
    body = '''
        import mmap, signal
        page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        page.write(bytes.fromhex("b814000000cd80c3"))   # mov eax, 20; int 0x80; ret
        int80 = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(page)))

        def died_of(what):
            pid = os.fork()
            if pid == 0:
                what()
                os._exit(0)
            status = os.waitpid(pid, 0)[1]
            return os.WTERMSIG(status) if os.WIFSIGNALED(status) else None

        i386 = died_of(int80)
        x32 = died_of(lambda: call(0x40000000 | 39))
        print(i386, x32)
        '''
    unfiltered = run_on_host(probe(body))
    filtered = run_on_host(probe(body, install=True))
    assert filtered.returncode == 0, filtered.stderr
    i386, x32 = filtered.stdout.split()
    assert x32 == str(int(signal.SIGSYS))
    if unfiltered.stdout.split()[0] == "None":   # this kernel runs i386 calls at all
        assert i386 == str(int(signal.SIGSYS))


def test_a_filter_that_cannot_be_installed_stops_the_start():
    """The server's last step fails (here: a prctl option the kernel does not know): the
    function's interpreter never runs, and the reason is one line on stderr."""
    if ARCH is None:
        pytest.skip(seccomp.describe(None))
    source = textwrap.dedent(f'''
        import sys
        sys.path.insert(0, {SANDBOX!r})
        import launch
        launch.seccomp.PR_SET_SECCOMP = 0x7FFF
        launch.run_server({{"argv": ["/bin/sh", "-c", "echo started"], "env": {{}},
                           "cwd": "/", "rlimits": {{}}}})
        ''')
    done = run_on_host(source)
    assert done.returncode == 125
    assert "started" not in done.stdout
    assert done.stderr.strip().splitlines() == [
        "dockyard sandbox: cannot start the function process: cannot install the seccomp "
        "filter: Invalid argument"]


# -- through the launcher, in a view -------------------------------------------------------------

@pytest.fixture(scope="module")
def layout():
    return HostLayout.probe()


def _run(layout, source: str, network: bool = False) -> str | None:
    return run_sandboxed(layout, [PYTHON, "-I", "-c", source], network=network)


@pytest.mark.parametrize("network", [False, True])
@needs_table
@needs_root
@needs_python
def test_a_function_process_cannot_reach_what_the_filter_denies(layout, network):
    assert _run(layout, probe('''
        with open("/proc/self/status") as f:
            status = dict(line.split(":\\t", 1) for line in f.read().splitlines())
        if status["Seccomp"].strip() != "2" or status["NoNewPrivs"].strip() != "1":
            failures.append(f"seccomp {status['Seccomp']}, no_new_privs {status['NoNewPrivs']}")
        expect("unshare", errno.EPERM, 0x10000000)                # CLONE_NEWUSER
        expect("clone", errno.EPERM, 0x10000000 | 17, 0, 0, 0, 0)
        expect("mount", errno.EPERM, b"none", b"/tmp", b"tmpfs", 0, 0)
        expect("io_uring_setup", errno.EPERM, 1, 0)
        expect("add_key", errno.EPERM, b"user", b"dockyard", b"x", 1, -4)   # the user keyring
        expect("keyctl", errno.EPERM, 0, -4, 1)                    # KEYCTL_GET_KEYRING_ID
        expect("bpf", errno.EPERM, 0, 0, 0)
        expect("perf_event_open", errno.EPERM, 0, 0, -1, -1, 0)
        expect("setns", errno.EPERM, 0, 0)
        expect("clone3", errno.ENOSYS, 0, 0)
        expect("socket", errno.EAFNOSUPPORT, 40, 1, 0)              # AF_VSOCK: the host's vsock
        expect("socket", errno.EAFNOSUPPORT, 17, 3, 0)              # AF_PACKET
        expect("socketpair", errno.EAFNOSUPPORT, 40, 1, 0, bytes(8))
        pid = os.fork()
        if pid == 0:
            os._exit(call("ptrace", 0)[1])                          # PTRACE_TRACEME
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        if code != errno.EPERM:
            failures.append(f"ptrace(PTRACE_TRACEME): errno {code}")
        done()
        '''), network=network) is None


ORDINARY_WORK = '''
import multiprocessing, socket, subprocess, threading

pid = os.fork()
if pid == 0:
    os._exit(3)
assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 3, "fork"
assert subprocess.run(["/bin/true"]).returncode == 0, "subprocess"
# What the process starts is filtered too, and cannot undo it.
status = subprocess.run(["/bin/cat", "/proc/self/status"], capture_output=True, text=True).stdout
assert "Seccomp:\\t2" in status, status

results = []
threads = [threading.Thread(target=lambda n=n: results.append(n * n)) for n in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert sorted(results) == [n * n for n in range(8)], "threads"

def square(n):
    return n * n

if __name__ == "__main__":
    with multiprocessing.Pool(2) as pool:     # the default start method
        assert pool.map(square, range(10)) == [n * n for n in range(10)], "multiprocessing"
    queue = multiprocessing.Queue()
    worker = multiprocessing.Process(target=queue.put, args=("hello",))
    worker.start()
    assert queue.get(timeout=30) == "hello"
    worker.join()

for family, kind in ((socket.AF_INET, socket.SOCK_STREAM), (socket.AF_INET6, socket.SOCK_DGRAM),
                     (socket.AF_UNIX, socket.SOCK_STREAM)):
    try:
        socket.socket(family, kind).close()
    except OSError as exc:
        if exc.errno != errno.EAFNOSUPPORT:
            raise
# The resolver's family is allowed.
socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0).close()
a, b = socket.socketpair()
a.sendall(b"ping")
assert b.recv(4) == b"ping"
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen()
client = socket.create_connection(server.getsockname())
conn, _ = server.accept()
client.sendall(b"pong")
assert conn.recv(4) == b"pong"

with open("/etc/passwd") as f:
    assert "root:" in f.read()
assert os.listdir("/usr/lib")
with open("/tmp/written", "w") as f:
    f.write("x")
os.unlink("/tmp/written")
result, err = call("personality", 0xFFFFFFFF)
assert result >= 0, f"personality query: errno {err}"
'''


@needs_table
@needs_root
@needs_python
def test_ordinary_work_runs_under_the_filter(layout):
    source = probe("\ntry:\n" + textwrap.indent(ORDINARY_WORK, "    ") + textwrap.dedent("""
        except Exception as exc:
            import traceback
            line = [f.lineno for f in traceback.extract_tb(exc.__traceback__)
                    if f.filename == "<string>"][-1]
            sys.exit(f"{type(exc).__name__}: {exc} at line {line}")
        """))
    # With the host's network: a new network namespace has no interface up, not even lo.
    assert _run(layout, source, network=True) is None
    assert _run(layout, "import asyncio, ssl, sqlite3, json; asyncio.run(asyncio.sleep(0))",
                network=True) is None
