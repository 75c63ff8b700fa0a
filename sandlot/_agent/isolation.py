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
    linux.mount("proc", root + "/proc", "proc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)

    # Make it '/' and drop every trace of the host's tree (and of the zygote's view of it).
    os.chdir(root)
    linux.pivot_root(".", ".")
    linux.umount2(".", linux.MNT_DETACH)
    os.chdir("/")


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


def become_user_effectively() -> None:
    """gVisor tier: pid 1 starts as gVisor's root with CAP_SETUID/SETGID/SETPCAP only. It keeps real
    and saved uid 0 and takes the user's ids as effective ones, then drops every capability: files
    it writes belong to the user and its access checks are the user's, but code running as the user
    (all ids 1000) cannot signal or trace it. gVisor, unlike Linux, does not shield its init from
    SIGKILL and SIGSTOP sent from inside. Children become the user for good (``become_user``)."""
    linux.drop_bounding_set()
    os.setgroups([])
    os.setresgid(0, USER_UID, 0)
    os.setresuid(0, USER_UID, 0)
    linux.clear_capabilities()
    linux.prctl(linux.PR_SET_DUMPABLE, 0)  # and its /proc files (environ...) are closed to the user


def acting_as_user() -> bool:
    """pid 1 holds the user's ids as effective ones only (the gVisor tier): its children must drop
    the others. False on the process tier (pid 1 is the user) and in a build (pid 1 is root)."""
    return os.geteuid() == USER_UID and os.getuid() != USER_UID


def become_user() -> None:
    """In a child of pid 1: all ids the user's (allowed without capabilities, since the effective
    ids already are). Does nothing unless pid 1 is ``acting_as_user()``."""
    if acting_as_user():
        os.setresgid(USER_UID, USER_UID, USER_UID)
        os.setresuid(USER_UID, USER_UID, USER_UID)
        linux.prctl(linux.PR_SET_DUMPABLE, 1)  # an ordinary process of the user again


def drop_privileges(cfg: dict) -> None:
    """Become the unprivileged sandbox user for good, then raise the kernel fences."""
    if cfg.get("build_root"):
        linux.drop_bounding_set(keep=BUILD_CAPS)
        os.setgroups([])
        linux.set_capabilities(BUILD_CAPS)
    else:
        linux.drop_bounding_set()
        os.setgroups([])
        os.setresgid(USER_UID, USER_UID, USER_UID)
        os.setresuid(USER_UID, USER_UID, USER_UID)
        linux.clear_capabilities()
    if not cfg.get("forked"):  # a zygote's fork ends with its channel (its parent exits at once)
        linux.prctl(linux.PR_SET_PDEATHSIG, 9)  # cleared by the uid change above, so set it after
    os.setsid()
    linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)  # Landlock requires it; seccomp would set it anyway
    writable = ["/"] if cfg.get("writable") else [HOME, "/tmp", "/dev/shm"]
    landlock.restrict(read_paths=["/"], write_paths=writable, device_paths=["/dev/" + d for d in DEVICES])
    linux.install_seccomp(bytes.fromhex(cfg["seccomp"]))  # also sets no_new_privs
