"""The seccomp filter of a function process (standard library only: launch.py imports it and
runs with python -I -S, so nothing here may import more than ctypes, os, struct and sys).

The launcher's server installs it last, after the uid drop (no_new_privs is set there) and
just before it execs the function's interpreter: it binds the function and everything the
function starts, and no process can remove it.

It is a denylist, written as a classic BPF program by hand:
- the architecture comes first: a system call made through an ABI the filter was not built for
  (i386 from an x86_64 process, x32, 32-bit ARM) kills the process, since its numbers mean
  other calls;
- new namespaces (unshare, clone with a CLONE_NEW* flag, setns), mounts, io_uring, the kernel
  keyrings, bpf, perf events, ptrace and a few administrative calls fail with EPERM;
- clone3 fails with ENOSYS (its flags are in memory, where a filter cannot look): glibc then
  falls back to clone, whose flags are checked;
- everything else is allowed.

Only x86_64 and aarch64 (little-endian, 64-bit) have a system call table here; elsewhere
`machine()` is None, the launcher installs nothing and the isolation summary says so.
"""

import ctypes
import os
import struct
import sys

# Classic BPF (linux/filter.h, linux/bpf_common.h).
LD_W_ABS = 0x20     # BPF_LD | BPF_W | BPF_ABS: A = 32-bit word at offset k of seccomp_data
JEQ = 0x15          # BPF_JMP | BPF_JEQ | BPF_K
JSET = 0x45         # BPF_JMP | BPF_JSET | BPF_K
RET = 0x06          # BPF_RET | BPF_K

# linux/seccomp.h
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
EPERM, ENOSYS, EAFNOSUPPORT = 1, 38, 97

# struct seccomp_data {int nr; u32 arch; u64 instruction_pointer; u64 args[6];}
NR, ARCH, ARG0 = 0, 4, 16     # ARG0: the low 32 bits of args[0] (little-endian only)

AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
X32_SYSCALL_BIT = 0x40000000

# The namespace flags of clone (linux/sched.h); the kernel reads only clone's low 32 bits.
CLONE_NEW = (0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000
             | 0x40000000)  # NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET
PERSONALITY_QUERY = 0xFFFFFFFF   # personality(0xffffffff) reads it; personality(0) is PER_LINUX
# The socket families a function may open (linux/socket.h): AF_UNIX, AF_INET, AF_INET6, and
# AF_NETLINK (the resolver's getaddrinfo asks the interfaces through it). Every other family
# (AF_VSOCK to the host, AF_PACKET, AF_BLUETOOTH, AF_ALG, ...) fails with EAFNOSUPPORT, as on
# a kernel built without it.
SOCKET_FAMILIES = (1, 2, 10, 16)

# What the filter does with each call it knows, and the call's number per architecture
# (x86_64: asm/unistd_64.h; aarch64: asm-generic/unistd.h). Kept as text: a launcher compiles
# this module on each start where no bytecode cache exists, and a string costs nothing to
# compile. unshare is denied whatever its flags: its only use in practice is making
# namespaces, and refusing all of it needs no flag parsing (no question of which bits the
# kernel reads, nor of a namespace flag added later); what else it can do (CLONE_FILES,
# CLONE_FS, CLONE_SYSVSEM) no function needs.
ARCHES = ("x86_64", "aarch64")
SYSCALLS = """
clone               56  220  clone: EPERM with a CLONE_NEW* flag
personality        135   92  personality: EPERM unless 0 (PER_LINUX) or 0xffffffff (a query)
socket              41  198  socket: EAFNOSUPPORT unless a family of SOCKET_FAMILIES
socketpair          53  199  socket: likewise
clone3             435  435  ENOSYS
unshare            272   97  EPERM
setns              308  268  EPERM
mount              165   40  EPERM
umount2            166   39  EPERM
pivot_root         155   41  EPERM
chroot             161   51  EPERM
open_tree          428  428  EPERM
move_mount         429  429  EPERM
fsopen             430  430  EPERM
fsconfig           431  431  EPERM
fsmount            432  432  EPERM
fspick             433  433  EPERM
mount_setattr      442  442  EPERM
io_uring_setup     425  425  EPERM
io_uring_enter     426  426  EPERM
io_uring_register  427  427  EPERM
keyctl             250  219  EPERM
add_key            248  217  EPERM
request_key        249  218  EPERM
bpf                321  280  EPERM
perf_event_open    298  241  EPERM
userfaultfd        323  282  EPERM
kexec_load         246  104  EPERM
kexec_file_load    320  294  EPERM
init_module        175  105  EPERM
finit_module       313  273  EPERM
delete_module      176  106  EPERM
acct               163   89  EPERM
swapon             167  224  EPERM
swapoff            168  225  EPERM
reboot             169  142  EPERM
syslog             103  116  EPERM
ptrace             101  117  EPERM
process_vm_readv   310  270  EPERM
process_vm_writev  311  271  EPERM
kcmp               312  272  EPERM
name_to_handle_at  303  264  EPERM
open_by_handle_at  304  265  EPERM
lookup_dcookie     212   18  EPERM
quotactl           179   60  EPERM
quotactl_fd        443  443  EPERM
vhangup            153   58  EPERM
nfsservctl         180   42  EPERM
"""


def table(arch):
    """{name: (number, what)} on `arch`; what is "clone", "personality", "socket", "ENOSYS" or
    "EPERM"."""
    column = 1 + ARCHES.index(arch)
    out = {}
    for line in SYSCALLS.splitlines():
        if line:
            words = line.split()
            out[words[0]] = (int(words[column]), words[3].rstrip(":"))
    return out


INSTRUCTION = struct.Struct("=HBBI")   # struct sock_filter {u16 code; u8 jt; u8 jf; u32 k;}


class _Fprog(ctypes.Structure):      # struct sock_fprog {unsigned short len; filter *filter;}
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def machine():
    """The table this process's system calls use, or None where there is none."""
    name = os.uname().machine
    if name in ARCHES and sys.byteorder == "little" and struct.calcsize("P") == 8:
        return name
    return None


def _assemble(source):
    """source: instructions (code, jt, jf, k) and label names; a jump target may be a label."""
    at, labels = 0, {}
    for item in source:
        if isinstance(item, str):
            labels[item] = at
        else:
            at += 1
    out = []
    for item in source:
        if isinstance(item, str):
            continue
        code, jt, jf, k = item
        here = len(out)
        jt = labels[jt] - here - 1 if isinstance(jt, str) else jt
        jf = labels[jf] - here - 1 if isinstance(jf, str) else jf
        if not (0 <= jt <= 255 and 0 <= jf <= 255):
            raise ValueError("a jump of the seccomp filter is out of range")
        out.append(INSTRUCTION.pack(code, jt, jf, k))
    return b"".join(out)


def program(arch):
    """The filter for `arch` (one of ARCHES), as the bytes of a sock_filter array.

    Every path that does not concern clone, personality or socket reads only the architecture and the
    number, so the kernel can prove those calls allowed once and skip the filter for them."""
    labels = {"clone": "clone", "personality": "personality", "socket": "socket",
              "ENOSYS": "enosys", "EPERM": "eperm"}
    source = [
        (LD_W_ABS, 0, 0, ARCH),
        (JEQ, 0, "kill", AUDIT_ARCH[arch]),
        (LD_W_ABS, 0, 0, NR),
    ]
    if arch == "x86_64":
        source.append((JSET, "kill", 0, X32_SYSCALL_BIT))   # the x32 ABI: other numbers
    source += [(JEQ, labels[what], 0, number) for number, what in table(arch).values()]
    source += [
        (RET, 0, 0, SECCOMP_RET_ALLOW),
        "clone",
        (LD_W_ABS, 0, 0, ARG0),                 # clone's flags, on x86_64 and aarch64 alike
        (JSET, "eperm", "allow", CLONE_NEW),
        "personality",
        (LD_W_ABS, 0, 0, ARG0),                 # the kernel takes an unsigned int
        (JEQ, "allow", 0, 0),
        (JEQ, "allow", "eperm", PERSONALITY_QUERY),
        "socket",
        (LD_W_ABS, 0, 0, ARG0),                 # the family (an int)
        *[(JEQ, "allow", 0, family) for family in SOCKET_FAMILIES],
        (RET, 0, 0, SECCOMP_RET_ERRNO | EAFNOSUPPORT),
        "allow",
        (RET, 0, 0, SECCOMP_RET_ALLOW),
        "eperm",
        (RET, 0, 0, SECCOMP_RET_ERRNO | EPERM),
        "enosys",
        (RET, 0, 0, SECCOMP_RET_ERRNO | ENOSYS),
        "kill",
        (RET, 0, 0, SECCOMP_RET_KILL_PROCESS),
    ]
    return _assemble(source)


def install(arch):
    """Install the filter for `arch` on this thread, for good (no_new_privs must be set, or
    the process must have CAP_SYS_ADMIN). Raises OSError if the kernel refuses it."""
    code = program(arch)
    buffer = ctypes.create_string_buffer(code, len(code))
    fprog = _Fprog(len(code) // INSTRUCTION.size, ctypes.addressof(buffer))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(fprog),
                  ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        errno = ctypes.get_errno()
        raise OSError(f"cannot install the seccomp filter: {os.strerror(errno)}")


def describe(arch):
    """What the filter does on `arch` (None: no table), for the isolation summary."""
    if arch is None:
        return (f"no seccomp filter: no system call table for {os.uname().machine} "
                f"({struct.calcsize('P') * 8}-bit {sys.byteorder}-endian; only x86_64 and "
                "aarch64 have one)")
    return (f"a seccomp filter ({arch}) on the function process and all it starts, set before "
            "exec and never lifted: EPERM for new namespaces (unshare, setns, clone with "
            "CLONE_NEW*), mounts, io_uring, keyrings, bpf, perf_event_open, ptrace, "
            "process_vm_*, userfaultfd, modules, kexec, reboot, swap, syslog, personality "
            "changes; EAFNOSUPPORT for sockets other than unix, inet, inet6 and netlink "
            "(vsock, packet, ...); ENOSYS for clone3 (glibc falls back to clone); a call through another "
            "ABI" + (" (i386, x32)" if arch == "x86_64" else " (32-bit ARM)")
            + " kills the process")
