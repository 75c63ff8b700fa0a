"""Builds the sandbox's world from inside its fresh namespaces: root, mounts, identity, fences.

Runs as root *of the sandbox's user namespace* (no privilege on the host), in the process that is
about to become pid 1 of the sandbox. The host sends a plan (``cfg``); this module carries it out in
an order where every step still has the rights it needs and each fence goes up before user code.
Stdlib only.
"""

from __future__ import annotations

import fcntl
import os
import resource
import socket
import struct
from typing import Iterable

from . import landlock, linux

USER_UID = 1000
HOME = "/home/user"
SCRATCH = "/.sandlot-scratch"  # one tmpfs backs home, /tmp and /dev/shm: one disk quota for all
ZYGOTE_SCRATCH = "/.sandlot-zygote"  # the zygote's own scratch while it imports its preload list
DEVICES = ("null", "zero", "full", "random", "urandom")
# /etc entries the interpreter and common libraries read; everything else of the host's /etc stays out.
ETC_ENTRIES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "ssl", "ca-certificates",
               "fonts", "alternatives", "mime.types", "nsswitch.conf", "protocols", "services",
               "gai.conf", "host.conf", "debian_version", "os-release", "timezone", "matplotlibrc")
SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin")

_LOCKED_FLAGS = {os.ST_NOSUID: linux.MS_NOSUID, os.ST_NODEV: linux.MS_NODEV,
                 os.ST_NOEXEC: linux.MS_NOEXEC, os.ST_NOATIME: linux.MS_NOATIME,
                 os.ST_NODIRATIME: linux.MS_NODIRATIME, os.ST_RELATIME: linux.MS_RELATIME}


def _mkdirs(path: str) -> None:
    os.makedirs(path, mode=0o755, exist_ok=True)


def _bind_readonly(source: str, target: str, is_dir: bool, readonly: bool = True) -> None:
    """Bind ``source`` at ``target`` read-only, nosuid, nodev, keeping the flags the host locked.
    (``readonly=False``: only a build step's private copy of an image root.)"""
    if is_dir:
        _mkdirs(target)
    else:
        _mkdirs(os.path.dirname(target))
        if not os.path.exists(target):
            open(target, "w").close()
    linux.mount(source, target, None, linux.MS_BIND | linux.MS_REC)
    # A bind mount in a user namespace must keep the flags its source mount was locked with,
    # or the kernel refuses the remount with EPERM.
    kept = 0
    for st_flag, ms_flag in _LOCKED_FLAGS.items():
        if os.statvfs(target).f_flag & st_flag:
            kept |= ms_flag
    linux.mount(None, target, None, linux.MS_REMOUNT | linux.MS_BIND | (linux.MS_RDONLY if readonly else 0)
                | linux.MS_NOSUID | linux.MS_NODEV | kept)


def plan_host_paths(cfg: dict) -> list:
    """Open every host path the root will show, while we still hold the host's rights.

    Runs before our uid changes: afterwards it is an unprivileged one that may not
    even traverse the interpreter's parents (pyenv under a 0700 /root, say). Binding from an
    O_PATH descriptor needs no traversal. Symlinks (/bin -> usr/bin) are recreated, not bound.
    """
    if cfg.get("rootfs"):
        # An image template: the image's own root (unpacked and prepared by the host, every mount
        # point a real directory) becomes '/', nothing of the host's /usr or /etc; then the agent,
        # and what the agent's interpreter needs (the host's, only for an image without Python).
        wanted = [(cfg["rootfs"], "/")] + [(cfg["agent_dir"], "/opt/sandlot/_agent")]
        wanted += [(host, inside) for host, inside in cfg.get("binds", [])]
    else:
        wanted = list(SYSTEM_DIRS) + ["/etc/" + name for name in ETC_ENTRIES]
        wanted += [(p, p) for p in cfg["prefixes"]] + [(cfg["agent_dir"], "/opt/sandlot/_agent")]
    plan = []
    for item in wanted:
        host, inside = item if isinstance(item, tuple) else (item, item)
        if os.path.islink(host) and not isinstance(item, tuple):
            plan.append({"inside": inside, "link": os.readlink(host)})
        elif os.path.exists(host):
            fd = os.open(host, os.O_PATH | os.O_CLOEXEC)
            plan.append({"inside": inside, "fd": fd, "dir": os.path.isdir(host)})
    return plan


def _write(path: str, text: str, mode: int = 0o644) -> None:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def build_template_root(cfg: dict, plan: list) -> str:
    """Make the template's read-only root at cfg['mountpoint'], in our (private) mount namespace.

    A zygote does this once and every sandbox forked from it shares the result (read-only, so
    sharing the superblock is safe); a sandbox started directly does it for itself.
    """
    root = cfg["mountpoint"]
    image = bool(cfg.get("rootfs"))
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    if image:
        # The image root itself is the new root's mount (its /etc files were written by the host
        # when it was unpacked); a build step's private copy is the only one bound writable.
        first = plan[0]
        _bind_readonly("/proc/self/fd/%d" % first["fd"], root, True, readonly=not cfg.get("writable"))
        os.close(first["fd"])
        plan = plan[1:]
    else:
        linux.mount("sandlot-root", root, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=0755,size=1m")
        _mkdirs(root + "/etc")
    for entry in plan:
        target = root + entry["inside"]
        if "link" in entry:
            _mkdirs(os.path.dirname(target))
            os.symlink(entry["link"], target)
        else:
            _bind_readonly("/proc/self/fd/%d" % entry["fd"], target, entry["dir"])
            os.close(entry["fd"])

    if not image:
        _write(root + "/etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"
               "user:x:%d:%d:user:%s:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n" % (USER_UID, USER_UID, HOME))
        _write(root + "/etc/group", "root:x:0:\nuser:x:%d:\nnogroup:x:65534:\n" % USER_UID)
        _write(root + "/etc/hostname", "sandbox\n")
        _write(root + "/etc/hosts", "127.0.0.1 localhost sandbox\n::1 localhost\n")
        _write(root + "/etc/resolv.conf", "")

    _mkdirs(root + "/dev")
    linux.mount("sandlot-dev", root + "/dev", "tmpfs", linux.MS_NOSUID | linux.MS_NOEXEC, "mode=0755,size=64k")
    for dev in DEVICES:
        open(root + "/dev/" + dev, "w").close()
        linux.mount("/dev/" + dev, root + "/dev/" + dev, None, linux.MS_BIND)
    for name, dest in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                       ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(dest, root + "/dev/" + name)
    # Mount points for what each sandbox brings itself (its storage and its /proc).
    # (An image root made its own at unpack time; only the builtin template has a zygote.)
    for path in (SCRATCH, HOME, "/tmp", "/dev/shm", "/proc") + (() if image else (ZYGOTE_SCRATCH,)):
        _mkdirs(root + path)
    linux.mount(None, root + "/dev", None, linux.MS_REMOUNT | linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NOEXEC)
    if not image:  # an image root is a bind, made read-only (or not, for a build step) above
        linux.mount(None, root, None, linux.MS_REMOUNT | linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV)
    return root


def enter_sandbox_root(cfg: dict) -> None:
    """Give this sandbox its own storage and /proc on the template root, then pivot into it.

    Runs in pid 1 of the sandbox, in the sandbox's own mount namespace.
    """
    root = cfg["mountpoint"]
    limits = cfg["limits"]
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    # A template root inherited from a zygote is locked in our namespace, and pivot_root refuses a
    # locked new root; a recursive bind onto itself makes a mount of our own (same read-only tree).
    linux.mount(root, root, None, linux.MS_BIND | linux.MS_REC)
    shadows = make_mount_points(root, cfg.get("mounts") or [])
    # The only writable storage: one tmpfs with byte and inode caps, split into home, /tmp, /dev/shm.
    scratch = root + SCRATCH
    linux.mount("sandlot-scratch", scratch, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV,
                "mode=0755,size=%d,nr_inodes=%d" % (limits["disk"], limits["inodes"]))
    for sub, mode in (("home", 0o700), ("tmp", 0o1777), ("shm", 0o1777)):
        os.mkdir(scratch + "/" + sub, mode)
        # mkdir's mode is masked by the umask (022 here), which left /tmp and /dev/shm at 1755:
        # not writable by the sandbox user at all. Set the mode explicitly.
        os.chmod(scratch + "/" + sub, mode)
    os.chown(scratch + "/home", USER_UID, USER_UID)
    # An interpreter prefix may live under a path we are about to cover (a venv in /tmp/ci, say):
    # hold it by descriptor now and bind it back on top of our own storage afterwards.
    covered = [p for p in cfg.get("prefixes", ()) if any(p == m or p.startswith(m + "/") for m in (HOME, "/tmp", "/dev/shm"))]
    held = [(p, os.open(root + p, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)) for p in covered]
    for mount_at, sub in ((HOME, "home"), ("/tmp", "tmp"), ("/dev/shm", "shm")):
        linux.mount(scratch + "/" + sub, root + mount_at, None, linux.MS_BIND)
    for prefix, fd in held:
        _mkdirs(root + prefix)
        linux.mount("/proc/self/fd/%d" % fd, root + prefix, None, linux.MS_BIND | linux.MS_REC)
        os.close(fd)
    linux.umount2(scratch, linux.MNT_DETACH)  # the binds keep it alive; no second path to the same files
    attach_grants(root, cfg.get("mounts") or [], shadows)
    linux.mount("proc", root + "/proc", "proc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)

    # Make it '/' and drop every trace of the host's tree (and of the zygote's view of it).
    os.chdir(root)
    linux.pivot_root(".", ".")
    linux.umount2(".", linux.MNT_DETACH)
    os.chdir("/")


def _in_scratch(target: str) -> bool:
    return any(target.startswith(area + "/") for area in (HOME, "/tmp", "/dev/shm"))


def make_mount_points(root: str, mounts: list) -> list:
    """Room for the granted mounts' targets in a read-only root. A target that exists is mounted over; one
    in the sandbox's own storage (home, /tmp) is made there later; any other needs a new directory where
    the root is read-only and shared with other sandboxes. The deepest existing directory above such a
    target is *shadowed*: a private tmpfs takes its place, holding the same entries (bound from the
    original, submounts included) plus the new directories, and goes read-only once the mounts are in.
    Returns the shadowed paths."""
    shadows: list = []
    for mount in mounts:
        target = mount["target"]
        if _in_scratch(target):
            continue
        _refuse_symlinks(root, target)  # before anything follows the path: it is still the host's tree here
        if os.path.isdir(root + target):
            continue
        if os.path.lexists(root + target):
            raise OSError("mount target %s exists and is not a directory" % target)
        above = os.path.dirname(target)
        while not os.path.isdir(root + above):
            if os.path.lexists(root + above):
                raise OSError("mount target %s: %s is not a directory" % (target, above))
            above = os.path.dirname(above)
        if (root + above).rstrip("/") not in shadows:
            _shadow(root + above if above != "/" else root)
            shadows.append((root + above).rstrip("/"))
        _mkdirs(root + target)
    return shadows


def _refuse_symlinks(root: str, target: str) -> None:
    """A target must be a plain path in the root: an image's symlink on the way (say /data -> /tmp) would
    be followed on the host's tree, where pid 1 still is, not in the sandbox's."""
    path = root
    for part in target.split("/")[1:]:
        path += "/" + part
        if os.path.islink(path):
            raise OSError("mount target %s passes through a symlink in the template's root" % target)
        if not os.path.lexists(path):
            return


def _shadow(path: str) -> None:
    old = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        linux.mount("sandlot-shadow", path, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=0755,size=64k")
        base = "/proc/self/fd/%d/" % old
        for name in os.listdir(base):
            source, here = base + name, path + "/" + name
            if os.path.islink(source):
                os.symlink(os.readlink(source), here)
            elif os.path.isdir(source):
                os.mkdir(here, 0o755)
                linux.mount(source, here, None, linux.MS_BIND | linux.MS_REC)
            else:
                open(here, "w").close()
                linux.mount(source, here, None, linux.MS_BIND | linux.MS_REC)
    finally:
        os.close(old)


def attach_grants(root: str, mounts: list, shadows: list) -> None:
    """Attach each granted mount (a detached, id-mapped copy the host made and sent as a descriptor) at
    its target, then seal the shadowed directories read-only."""
    for mount in mounts:
        target = root + mount["target"]
        if _in_scratch(mount["target"]):  # the user's own directories in their home or /tmp
            path = root
            for part in mount["target"].split("/")[1:]:
                path += "/" + part
                if not os.path.isdir(path):
                    os.mkdir(path, 0o755)
                    os.chown(path, USER_UID, USER_UID)
        linux.move_mount(mount["fd"], target)
        os.close(mount["fd"])
    for path in shadows:
        linux.mount(None, path, None, linux.MS_REMOUNT | linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV)


def bring_up_loopback() -> None:
    """The network namespace starts with lo down; bring it up so local servers work (nothing else exists)."""
    SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def set_rlimits(limits: dict) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits["open_files"], limits["open_files"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["disk"], limits["disk"]))
    resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_seconds"], limits["cpu_seconds"] + 5))
    # A little above the cgroup's pids.max: the cgroup refuses first, and its counter names the limit
    # in the result (RLIMIT_NPROC also counts zombies and would refuse silently). Under gVisor the
    # cgroup has room for runsc's own threads, and this is the app's real limit.
    nproc = limits["pids"] + (0 if limits.get("nproc_exact") else 8)
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))


# A build step (apt, pip as root) keeps Docker's default capabilities, *within its own user namespace*
# (over files it owns there: its private copy of the image root), and stays that namespace's root.
BUILD_CAPS = (0, 1, 3, 4, 5, 6, 7, 10, 29, 31)  # CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID
#                                                NET_BIND_SERVICE AUDIT_WRITE SETFCAP


# Whether the session process is made dumpable again once it is the user (``become_user``). gVisor
# tier: yes. Process tier: no, as it always was (it inherits pid 1's state): a command, all ids 1000
# as well, could otherwise take the session's descriptors (pidfd_getfd) or open its /proc/PID/mem.
_session_dumpable = False


def become_user_effectively(session_dumpable: bool = False) -> None:
    """pid 1, on both tiers: keep real and saved uid 0 of the sandbox's user namespace and take the
    user's ids as effective ones only, then drop every capability (bounding set first, which needs
    CAP_SETPCAP). Files it writes belong to the user (fsuid follows euid) and its access checks are
    the user's, but code running as the user (all ids 1000) fails every kernel check that compares
    its ids with *all* of pid 1's: kill, prlimit, ptrace and /proc access, pidfd_getfd. gVisor, unlike
    Linux, does not shield its init from SIGKILL and SIGSTOP sent from inside, and on Linux any
    process of the same uid could change pid 1's rlimits. Children become the user for good
    (``become_user``), which needs no capability: 1000 is already their effective id."""
    global _session_dumpable
    _session_dumpable = session_dumpable
    linux.drop_bounding_set()
    os.setgroups([])
    os.setresgid(0, USER_UID, 0)
    os.setresuid(0, USER_UID, 0)
    linux.clear_capabilities()
    linux.prctl(linux.PR_SET_DUMPABLE, 0)  # and its /proc files (environ, maps, fd...) are closed to the user


def keep_identity_across_exec() -> None:
    """In pid 1 after it execve'd an image's interpreter: the exec copied the effective ids into the
    saved ones (1000), which would let the user's code signal pid 1 again. Put back saved 0 (allowed
    without capabilities: it is our real id) and stay non-dumpable (the kernel made us so for the
    exec, unless the host runs with fs.suid_dumpable=1)."""
    if acting_as_user():
        os.setresgid(0, USER_UID, 0)
        os.setresuid(0, USER_UID, 0)
        linux.prctl(linux.PR_SET_DUMPABLE, 0)


def acting_as_user() -> bool:
    """pid 1 holds the user's ids as effective ones only (``become_user_effectively``): its children
    must drop the others. False in a build (pid 1 is root) and in a child that already dropped them."""
    return os.geteuid() == USER_UID and os.getuid() != USER_UID


def become_user() -> None:
    """In a child of pid 1: all ids the user's (allowed without capabilities, since the effective
    ids already are). Does nothing unless pid 1 is ``acting_as_user()``."""
    if acting_as_user():
        os.setresgid(USER_UID, USER_UID, USER_UID)
        os.setresuid(USER_UID, USER_UID, USER_UID)
        if _session_dumpable:
            linux.prctl(linux.PR_SET_DUMPABLE, 1)  # an ordinary process of the user again


def drop_privileges(cfg: dict, parent_waits: bool) -> None:
    """Take pid 1's final identity (the user's effective ids over uid 0 of the sandbox's user
    namespace; a build step stays that namespace's root), then raise the kernel fences.

    ``parent_waits``: a sandbox exec'd on its own has a parent that waits for pid 1 and must take
    it along when it dies; a zygote's fork has none (its outer process exits at once, and pid 1
    ends when its channel to the host closes).
    """
    if cfg.get("build_root"):
        linux.drop_bounding_set(keep=BUILD_CAPS)
        os.setgroups([])
        linux.set_capabilities(BUILD_CAPS)
    elif cfg.get("setup_uid", 0) != 0:
        # An unprivileged host maps one uid only (the user's 1000): pid 1 has no other id to keep,
        # so it is the user, as before; only the non-dumpable flag sets it apart (README: running as a
        # normal user).
        linux.drop_bounding_set()
        os.setgroups([])
        os.setresgid(USER_UID, USER_UID, USER_UID)
        os.setresuid(USER_UID, USER_UID, USER_UID)
        linux.clear_capabilities()
        linux.prctl(linux.PR_SET_DUMPABLE, 0)
    else:
        # Real and saved uid 0 must never mean privilege: not at an execve (an image's interpreter
        # replaces pid 1), whatever the bounding set. Locked, for pid 1 and every child.
        linux.prctl(linux.PR_SET_SECUREBITS, linux.SECBIT_NOROOT | linux.SECBIT_NOROOT_LOCKED)
        become_user_effectively()
    if parent_waits:
        linux.prctl(linux.PR_SET_PDEATHSIG, 9)  # cleared by the uid change above, so set it after
    os.setsid()
    linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)  # Landlock requires it; seccomp would set it anyway
    writable = ["/"] if cfg.get("writable") else [HOME, "/tmp", "/dev/shm"]
    writable += [m["target"] for m in cfg.get("mounts") or [] if not m["ro"]]
    landlock.restrict(read_paths=["/"], write_paths=writable, device_paths=["/dev/" + d for d in DEVICES])
    linux.install_seccomp(bytes.fromhex(cfg["seccomp"]))  # also sets no_new_privs


def close_inherited(keep: Iterable[int]) -> None:
    """Close every descriptor but the standard streams and ``keep``: an allowlist, so whatever the
    process that made pid 1 held (a zygote's descriptor of the host's /proc, a pipe all its forks
    share, anything its preload opened) is gone before user code runs, named or not."""
    keep = set(keep) | {0, 1, 2}
    for name in os.listdir("/proc/self/fd"):
        if int(name) not in keep:
            try:
                os.close(int(name))
            except OSError:
                pass  # the listing's own descriptor, closed already
