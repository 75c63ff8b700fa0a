"""Thin ctypes wrappers for the Linux calls the standard library lacks (stdlib only).

Every wrapper raises OSError with the real errno, so callers see exactly which step failed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
libc.syscall.restype = ctypes.c_long

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
SECBIT_NOROOT = 1 << 0
SECBIT_NOROOT_LOCKED = 1 << 1
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
PR_SET_SECCOMP = 22
PR_SET_MEMORY_MERGE = 67  # Linux >= 6.4: every anonymous page of this process (and its forks, execs) may be merged by KSM
SECCOMP_MODE_FILTER = 2

_MACHINE = platform.machine()
SYS = {
    "x86_64": {"pivot_root": 155, "landlock_create_ruleset": 444, "landlock_add_rule": 445,
               "landlock_restrict_self": 446},
    "aarch64": {"pivot_root": 41, "landlock_create_ruleset": 444, "landlock_add_rule": 445,
                "landlock_restrict_self": 446},
}.get(_MACHINE, {})
if SYS:  # the new mount API has one number on every architecture
    SYS.update({"open_tree": 428, "move_mount": 429, "mount_setattr": 442, "fsconfig": 431, "fspick": 433})

# The new mount API: a host directory is cloned as a detached mount (open_tree), given its id mapping
# and flags while still detached (mount_setattr), and attached inside a sandbox (move_mount).
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = 0o2000000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_IDMAP = 0x100000


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, "%s: %s" % (what, os.strerror(err)))
    return ret


def syscall(name: str, *args) -> int:
    if name not in SYS:
        raise OSError(38, "%s: unsupported architecture %s" % (name, _MACHINE))
    return _check(libc.syscall(SYS[name], *args), name)


def unshare(flags: int) -> None:
    _check(libc.unshare(flags), "unshare")


SIGCHLD = 17
_CLONE = {"x86_64": 56, "aarch64": 220}.get(_MACHINE)
_libc_holding_gil = None  # made on first use: only a zygote forks this way (not every interpreter has pythonapi)


def fork_into(flags: int) -> int:
    """os.fork(), with the child born in new namespaces (``flags``: CLONE_NEW*): clone(2), no new stack.

    Returns 0 in the child, its pid (in our pid namespace) in the parent. With CLONE_NEWPID the child is
    pid 1 of its namespace at once: no unshare and second fork. CPython's own fork bookkeeping runs on both
    sides as in os.fork (PyOS_BeforeFork / AfterFork_Parent / AfterFork_Child: the import lock, the GIL,
    threading's state, os.register_at_fork hooks such as random's reseed). libc's fork is bypassed, so its
    atfork handlers do not run and the child's thread descriptor keeps the parent's kernel tid (glibc's
    fork would have set it): only a single-threaded caller may use this, which the caller checks (no lock
    can be held by another thread, no library thread pool needs stopping: OpenBLAS stops its own at libc's
    fork), and the child must not rely on that cached tid (pid 1 runs a single thread; glibc >= 2.34 asks
    the kernel for the tid in raise and pthread_kill; processes it forks with os.fork get their own).
    """
    global _libc_holding_gil
    if _CLONE is None:
        raise OSError(38, "clone: unsupported architecture %s" % _MACHINE)
    if _libc_holding_gil is None:
        # The same libc, called with the GIL held across the call (os.fork holds it too): nothing else
        # of this interpreter runs while the child's copy of the address space is taken.
        held = ctypes.PyDLL(libc._name, use_errno=True)
        held.syscall.restype = ctypes.c_long
        for name in ("PyOS_BeforeFork", "PyOS_AfterFork_Parent", "PyOS_AfterFork_Child"):
            getattr(ctypes.pythonapi, name).restype = None
        _libc_holding_gil = held
    ctypes.pythonapi.PyOS_BeforeFork()
    # clone(flags, stack=NULL: the child runs on its copy of our stack, as after fork, ptid, ctid, tls)
    pid = _libc_holding_gil.syscall(ctypes.c_long(_CLONE), ctypes.c_ulong(flags | SIGCHLD), None, None, None, None)
    if pid == 0:
        ctypes.pythonapi.PyOS_AfterFork_Child()
        return 0
    err = ctypes.get_errno()
    ctypes.pythonapi.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(err, "clone: %s" % os.strerror(err))
    return pid


def mount(source, target, fstype, flags: int = 0, data=None) -> None:
    enc = lambda s: s.encode() if isinstance(s, str) else s  # noqa: E731
    ret = libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data))
    _check(ret, "mount %s on %s" % (source, target))


def umount2(target: str, flags: int = 0) -> None:
    _check(libc.umount2(target.encode(), flags), "umount " + target)


def pivot_root(new_root: str, put_old: str) -> None:
    syscall("pivot_root", new_root.encode(), put_old.encode())


def open_tree(dirfd: int, path: str, flags: int) -> int:
    """A new descriptor of the mount at ``path`` (with OPEN_TREE_CLONE: a detached copy of it)."""
    return syscall("open_tree", dirfd, path.encode(), ctypes.c_uint(flags))


def move_mount(from_fd: int, to_path: str) -> None:
    """Attach the detached mount ``from_fd`` at ``to_path`` (in the caller's mount namespace)."""
    syscall("move_mount", from_fd, b"", -100, to_path.encode(), ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH))


def reconfigure(path: str, key: str, value: str) -> None:
    """Set one parameter of the file system mounted at ``path`` (e.g. a tmpfs's size), with fspick and
    fsconfig: the superblock is changed in place; no mount flag is touched, nothing is exec'd."""
    _reconfigure(-100, path, 0, key, value)


def reconfigure_fd(fd: int, key: str, value: str) -> None:
    """``reconfigure`` of the mount root held by ``fd`` (an O_PATH descriptor): no path walked again."""
    _reconfigure(fd, "", 0x8 | 0x2 | 0x4, key, value)  # FSPICK_EMPTY_PATH | SYMLINK_NOFOLLOW | NO_AUTOMOUNT


def _reconfigure(dirfd: int, path: str, flags: int, key: str, value: str) -> None:
    FSPICK_CLOEXEC, FSCONFIG_SET_STRING, FSCONFIG_CMD_RECONFIGURE = 1, 1, 7
    fd = syscall("fspick", dirfd, path.encode(), ctypes.c_uint(FSPICK_CLOEXEC | flags))
    try:
        syscall("fsconfig", fd, ctypes.c_uint(FSCONFIG_SET_STRING), key.encode(), value.encode(), 0)
        syscall("fsconfig", fd, ctypes.c_uint(FSCONFIG_CMD_RECONFIGURE), None, None, 0)
    finally:
        os.close(fd)


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def mount_setattr(fd: int, attr_set: int, userns_fd: int = 0, attr_clr: int = 0) -> None:
    """Set flags (and, with MOUNT_ATTR_IDMAP, the id mapping of ``userns_fd``) on the mount ``fd``."""
    attr = _MountAttr(attr_set, attr_clr, 0, userns_fd)
    syscall("mount_setattr", fd, b"", ctypes.c_uint(AT_EMPTY_PATH), ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)))


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(libc.prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(arg3),
                             ctypes.c_ulong(arg4), ctypes.c_ulong(arg5)), "prctl %d" % option)


def merge_memory() -> bool:
    """Mark this process's memory mergeable by KSM (kept across fork and execve). False where the kernel
    cannot (older than 6.4, KSM not built in, gVisor): the sandbox then simply runs unmerged."""
    try:
        prctl(PR_SET_MEMORY_MERGE, 1)
        return True
    except OSError:
        return False


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def drop_all_capabilities() -> None:
    """Empty the bounding, ambient, effective, permitted and inheritable sets."""
    drop_bounding_set()
    clear_capabilities()


def drop_bounding_set(keep=()) -> None:
    """Needs CAP_SETPCAP, so it comes before the uid change that empties our capabilities."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
    except OSError:
        last = 40
    for cap in range(last + 1):
        if cap in keep:
            continue
        try:
            prctl(PR_CAPBSET_DROP, cap)
        except OSError as exc:
            if exc.errno != 22:  # EINVAL: cap unknown to this kernel
                raise


def _clear_ambient() -> None:
    try:
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError as exc:
        if exc.errno != 22:  # EINVAL: a kernel without ambient capabilities (gVisor 2022) has none to clear
            raise


def clear_capabilities() -> None:
    _clear_ambient()
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    _check(libc.capset(ctypes.byref(header), data), "capset")


def set_capabilities(caps) -> None:
    """Keep exactly ``caps`` (numbers) as effective and permitted; nothing inheritable or ambient."""
    _clear_ambient()
    header = _CapHeader(0x20080522, 0)
    data = (_CapData * 2)()
    for cap in caps:
        word, bit = divmod(cap, 32)
        data[word].effective |= 1 << bit
        data[word].permitted |= 1 << bit
    _check(libc.capset(ctypes.byref(header), data), "capset")


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install_seccomp(bpf: bytes) -> None:
    """Load a compiled classic-BPF seccomp program (8 bytes per instruction)."""
    if not bpf or len(bpf) % 8:
        raise ValueError("seccomp program has a bad length")
    buf = ctypes.create_string_buffer(bpf, len(bpf))
    prog = _SockFprog(len(bpf) // 8, ctypes.cast(buf, ctypes.c_void_p))
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    _check(libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(prog),
                      ctypes.c_ulong(0), ctypes.c_ulong(0)), "seccomp")
