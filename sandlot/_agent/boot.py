"""Entry point of a sandbox: exec'd fresh by the host (never forked from it), stdlib only.

    python -I -S boot.py FD

FD is the host's end of a socketpair. The dance:

1. read the plan; unshare user, mount, net, ipc and uts namespaces; tell the host our pid;
2. the host writes our uid/gid maps and puts us in the sandbox's cgroup, then says "go";
3. become root of the new user namespace, unshare cgroup and pid namespaces, fork;
4. the child is pid 1 of the sandbox: it builds the root, drops everything and serves the agent;
   this parent just waits for it, so the host's child process lives exactly as long as the sandbox.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import NamedTuple

_HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _recv_frame(sock: socket.socket) -> dict:
    from _agent import protocol

    def exact(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise EOFError("host closed the channel during boot")
            data += chunk
        return data

    head_len, payload_len = protocol.check_prefix(exact(protocol.PREFIX.size))
    header = protocol.decode_header(exact(head_len))
    exact(payload_len)
    return header


MAX_MOUNTS = 16  # as sandlot/_storage/mounts.py: a fork request's channel plus one descriptor per mount


def _send(sock: socket.socket, header: dict) -> None:
    from _agent import protocol

    sock.sendall(protocol.encode(header))


def _forget_ignored_signals() -> None:
    """Signals the host ignored start at their defaults here: a sandbox must not depend on how its host was started.

    An ignored signal stays ignored across fork and exec, and hosts are often started with some: SIGHUP
    under nohup, SIGINT and SIGQUIT in a script's background job, any the launcher chose. The session
    and every command in the sandbox inherited them (a command's `kill -TERM` of its own child did
    nothing). SIGPIPE and SIGXFSZ are Python's own ignores: subprocess restores them in what it execs.
    """
    for sig in signal.valid_signals():
        if sig in (signal.SIGPIPE, signal.SIGXFSZ) or signal.getsignal(sig) is not signal.SIG_IGN:
            continue
        try:
            signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            pass  # SIGKILL, SIGSTOP and signals the C library keeps for itself: never ignored anyway


def main() -> None:
    _forget_ignored_signals()
    sys.path.insert(0, _HERE)
    if len(sys.argv) > 2 and sys.argv[2] == "serve":
        _serve()  # an image's own interpreter, exec'd by pid 1: imports only what it needs
        return
    from _agent import isolation, linux, server  # noqa: F401  (import everything before the pivot)
    from _agent import kernel, landlock, protocol  # noqa: F401

    if len(sys.argv) > 2 and sys.argv[2] in ("gvisor", "pod"):
        _gvisor(pod=sys.argv[2] == "pod")
        return
    sock = socket.socket(fileno=int(sys.argv[1]))
    cfg = _recv_frame(sock)["config"]
    if len(sys.argv) > 2 and sys.argv[2] == "zygote":
        _keeper(sock, cfg)
    else:
        _direct(sock, cfg)


def _gvisor(pod: bool = False) -> None:
    """pid 1 of a gVisor container: runsc already gave us our namespaces and root. With ``pod``, the agent
    of a Kubernetes pod (the child of pod.py, which holds our pipes): the pod's runtime (gVisor) gave us our
    isolation, and the pod runs as the sandbox's user, so there are no ids to drop (nothing of ours is
    the sandbox's to lose but itself), and the seccomp filter comes only when the server's machine matches.

    The channel is our stdin/stdout (host pipes that survive checkpoint and restore); they move to
    high descriptors so that nothing printing to fd 1 can ever corrupt it. Our own fences still go
    up (no_new_privs, rlimits, the seccomp allowlist, Landlock if the kernel offers it: gVisor
    answers ENOSYS), then the template's modules are imported here, ahead of the first call.
    """
    from _agent import isolation, linux, server

    channel = server.PipeChannel(os.dup(0), os.dup(1))
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    isolation.close_inherited([channel.read_fd, channel.write_fileno])  # anything else runsc passed
    cfg = _recv_frame(channel)["config"]
    try:
        os.environ.clear()
        os.environ.update(cfg["env"])
        # An image's interpreter keeps all of its own path; the builtin one what is under its prefixes.
        sys.path[:] = ["/opt/sandlot"] + _interpreter_path(dict(cfg, prefixes=["/"]) if cfg.get("rootfs") else cfg)
        isolation.set_rlimits(cfg["limits"])
        try:
            os.setsid()
        except OSError:
            pass  # already a session leader
        linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
        if not pod or os.getuid() == 0:
            isolation.become_user_effectively(session_dumpable=True)
        granted = [m["target"] for m in cfg.get("mounts") or [] if not m["ro"]]
        isolation.landlock.restrict(read_paths=["/"], write_paths=[isolation.HOME, "/tmp", "/dev/shm"] + granted,
                                    device_paths=["/dev/" + d for d in isolation.DEVICES])
        if cfg["seccomp"] or not pod:
            linux.install_seccomp(bytes.fromhex(cfg["seccomp"]))
        _chdir_workdir(cfg)
        import site

        site.main()
    except Exception as exc:
        _send(channel, {"t": "boot_error", "error": "%s: %s" % (type(exc).__name__, exc)})
        os._exit(72)
    _preload(cfg)
    _send(channel, {"t": "init", "pid": os.getpid()})
    server.serve(_relay(channel), cfg)
    os._exit(0)


def _relay(channel) -> socket.socket:
    """Hand the agent a socket that two threads relay to and from the host pipes.

    After a checkpoint/restore, gVisor (Debian's 2022 runsc) stops delivering readiness events for
    host pipes to epoll, so the agent's event loop never saw the next request. Blocking reads and
    writes on the pipes keep working, and a socketpair inside the sandbox is gVisor's own object,
    so the loop waits on that instead.
    """
    import threading

    inner, outer = socket.socketpair()
    read_fd, write_fd = channel.read_fd, channel.write_fileno
    os.set_blocking(read_fd, True)
    os.set_blocking(write_fd, True)

    def host_to_agent() -> None:
        while True:
            try:
                data = os.read(read_fd, 1 << 20)
            except InterruptedError:
                continue
            if not data:
                os._exit(0)  # the host is gone: so is the sandbox
            outer.sendall(data)

    def agent_to_host() -> None:
        while True:
            data = outer.recv(1 << 20)
            if not data:
                os._exit(0)
            view = memoryview(data)
            while view:
                view = view[os.write(write_fd, view):]

    for target in (host_to_agent, agent_to_host):
        threading.Thread(target=target, daemon=True).start()
    return inner


def _interpreter_path(cfg: dict) -> list:
    """sys.path entries of our interpreter the sandbox keeps: under the template's prefixes (the
    builtin template), or all of an image interpreter's own ("/"), never our own script dir."""
    here = os.path.dirname(os.path.abspath(__file__))
    return [p for p in sys.path if p and p.startswith(tuple(cfg["prefixes"])) and p != here
            and not p.startswith("/opt/sandlot/_agent")]


def _chdir_workdir(cfg: dict) -> None:
    """The image's WorkingDir when it has one that exists, else the home directory."""
    workdir = cfg.get("workdir")
    if isinstance(workdir, str) and workdir.startswith("/") and os.path.isdir(workdir):
        os.chdir(workdir)
    else:
        os.chdir("/home/user")


def _preload(cfg: dict) -> None:
    for name in cfg.get("preload", []):
        try:
            __import__(name)
            if name == "matplotlib":
                import matplotlib.pyplot  # noqa: F401
                from _agent import mpl_backend  # noqa: F401
        except Exception:
            pass  # the session reports a missing module when the user imports it


def _exec_agent(sock: socket.socket, cfg: dict) -> None:
    """Image templates, process tier: pid 1 (the host's interpreter so far, which built the root and
    raised every fence) becomes the image's interpreter for good, serving on the same channel.

    The plan travels in a memfd (any size, no path); the new program starts with a bare environment
    (no LD_* or PYTHON* variable of the owner can touch the agent) and sets the sandbox's own itself.
    seccomp, Landlock, no_new_privs, rlimits, securebits and the (empty) capability sets survive
    execve. The effective uid differs from the real one, so the kernel treats the exec as setuid (the
    new program starts non-dumpable, in glibc's secure mode) and copies the effective ids into the
    saved ones: the new interpreter puts those back first (isolation.keep_identity_across_exec).
    """
    import json

    data = json.dumps(dict(cfg, seccomp=None)).encode()
    fd = os.memfd_create("sandlot-agent-config", 0)  # inheritable: the new interpreter reads it
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    os.set_inheritable(sock.fileno(), True)
    argv = list(cfg["exec"]) + ["/opt/sandlot/_agent/boot.py", str(sock.fileno()), "serve", str(fd)]
    try:
        os.execve(argv[0], argv, {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"})
    except OSError as exc:
        raise OSError(exc.errno, "cannot start the image's interpreter %s: %s" % (argv[0], exc.strerror)) from None


def _serve() -> None:
    """``boot.py FD serve CFG_FD``: the agent under an image's interpreter (or the host's, lent to an
    image without Python), already inside the finished sandbox. Stdlib only, Python >= 3.8."""
    import json

    sock = socket.socket(fileno=int(sys.argv[1]))
    try:
        cfg_fd = int(sys.argv[3])
        chunks = []
        while True:
            chunk = os.read(cfg_fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
        os.close(cfg_fd)
        cfg = json.loads(b"".join(chunks).decode())
        sys.path[:] = ["/opt/sandlot"] + _interpreter_path(dict(cfg, prefixes=["/"]))
        import site

        site.main()  # the image's site-packages (-I keeps the user's site out)
        os.environ.clear()
        os.environ.update(cfg["env"])
        _chdir_workdir(cfg)
        from _agent import isolation, server

        isolation.keep_identity_across_exec()
    except Exception as exc:
        _send(sock, {"t": "boot_error", "error": "%s: %s" % (type(exc).__name__, exc)})
        os._exit(72)
    _preload(cfg)
    server.serve(sock, cfg)
    os._exit(0)


def _handshake(sock: socket.socket, cfg: dict, die_with_parent: bool = True, pid: int = 0) -> None:
    """Tell the host our pid (``pid``: as the host sees it, when ours is another namespace's); it writes
    our uid/gid maps (unless a zygote did) and puts us in our cgroup, then says go."""
    _send(sock, {"t": "unshared", "pid": pid or os.getpid()})
    if _recv_frame(sock)["t"] != "go":
        os._exit(70)
    if cfg["setup_uid"] == 0:
        parent = os.getppid()
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
        if not die_with_parent:
            return
        # A uid change clears the parent-death signal: arm it again, and if our parent died in
        # between (we were reparented), follow it now.
        from _agent import linux

        linux.prctl(linux.PR_SET_PDEATHSIG, 9)
        if os.getppid() != parent:
            os._exit(0)


def _direct(sock: socket.socket, cfg: dict) -> None:
    """A sandbox exec'd on its own: builds the template root itself (no preloaded modules)."""
    from _agent import isolation, linux

    if cfg.get("ksm"):
        linux.merge_memory()  # as a zygote's forks: kept by pid 1, the session, and an image's interpreter (execve)
    try:
        if not cfg.get("durable"):  # a durable sandbox's agent decides its end by its lease (server.py)
            linux.prctl(linux.PR_SET_PDEATHSIG, 9)
        linux.unshare(linux.CLONE_NEWUSER | linux.CLONE_NEWNS | linux.CLONE_NEWNET | linux.CLONE_NEWIPC
                      | linux.CLONE_NEWUTS)
        # Still the host's uid (only our capabilities moved to the new namespace): we can reach
        # paths owned by us, like a pyenv under a 0700 /root, and binds must come from this new
        # mount namespace, so the host paths are opened now.
        plan = isolation.plan_host_paths(cfg)
        _handshake(sock, cfg, die_with_parent=not cfg.get("durable"))
        linux.unshare(linux.CLONE_NEWCGROUP | linux.CLONE_NEWPID)
    except Exception as exc:  # report the failing step to the host, plainly
        _send(sock, {"t": "boot_error", "error": "%s: %s" % (type(exc).__name__, exc)})
        os._exit(71)
    _spawn_init(sock, cfg, lambda: isolation.build_template_root(cfg, plan))


def _keeper(ctl: socket.socket, cfg: dict) -> None:
    """The process the host starts for a zygote: it forks the zygote and stays, a subreaper, to reap
    the sandboxes' pid 1s once the zygote, their parent, is gone (while it lives, the kernel reaps
    them for it: it ignores SIGCHLD), or once the outer process that forked one exits. Sandboxes do
    not depend on the zygote, so it can die and be replaced while they run; the keeper stays until
    its last sandbox has ended, then exits. It runs nothing else and holds nothing (it dies with the
    host)."""
    from _agent import linux

    linux.prctl(linux.PR_SET_PDEATHSIG, 9)
    linux.prctl(36, 1)  # PR_SET_CHILD_SUBREAPER
    pid = os.fork()
    if pid == 0:
        try:
            _zygote(ctl, cfg)
        finally:
            os._exit(71)
    ctl.close()
    while True:
        try:
            os.wait()
        except ChildProcessError:  # the zygote and every sandbox it forked are gone
            os._exit(0)
        except InterruptedError:
            continue


def _zygote(ctl: socket.socket, cfg: dict) -> None:
    """A template's zygote: its user and mount namespace, its read-only root, its modules imported.

    Never runs user code. Each "fork" request carries a fresh channel (SCM_RIGHTS); the child is
    born pid 1 of a sandbox, in its own nested user namespace and every other namespace of its own.
    The zygote imports from inside the template root (chroot: after the uid change the host's
    paths, like a pyenv under a 0700 /root, are out of reach), keeping descriptors to the host's
    root and /proc so that children can go back to build their own root and the zygote can write
    their uid maps.
    """
    import gc
    import signal

    from _agent import isolation, linux

    try:
        linux.prctl(linux.PR_SET_PDEATHSIG, 9)  # dies with its keeper, which dies with the host
        linux.unshare(linux.CLONE_NEWUSER | linux.CLONE_NEWNS)
        plan = isolation.plan_host_paths(cfg)
        _handshake(ctl, cfg)
        # The uid change made us non-dumpable, which hands our children's /proc files to the
        # host's root: we could not write their uid maps. Sandboxes drop it again at their own
        # uid change (pid 1 becomes uid 1000).
        linux.prctl(4, 1)  # PR_SET_DUMPABLE
        root = isolation.build_template_root(cfg, plan)
        host_root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        host_proc = os.open("/proc", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        # A private scratch for the preload (matplotlib's font cache), unmounted once it is done: on
        # a mount point of its own, not /tmp, which may hold the interpreter (a venv in /tmp/ci).
        # /dev/shm too: libraries probe it at import (joblib picks serial mode without it).
        for scratch in (isolation.ZYGOTE_SCRATCH, "/dev/shm"):
            linux.mount("sandlot-zygote-tmp", root + scratch, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV,
                        "size=64m,mode=0700")
        os.chroot(root)
        os.chdir("/")
        import _agent

        # The agent's modules imported from here on (our matplotlib backend) are found where the root has
        # them: the host's path of the package is not in it.
        _agent.__path__[:] = ["/opt/sandlot/_agent"]
        template_root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        os.environ.clear()
        os.environ.update(cfg["env"])
        os.environ.update({"MPLCONFIGDIR": isolation.ZYGOTE_SCRATCH + "/matplotlib", "HOME": isolation.ZYGOTE_SCRATCH,
                           "TMPDIR": isolation.ZYGOTE_SCRATCH})
        import site

        site.main()
    except Exception as exc:
        _send(ctl, {"t": "boot_error", "error": "%s: %s" % (type(exc).__name__, exc)})
        os._exit(71)
    failed = {}
    for name in cfg.get("preload", []):
        try:
            __import__(name)
            if name == "matplotlib":
                import matplotlib.pyplot  # noqa: F401  (loads the font list once, for every sandbox)
                from _agent import mpl_backend  # noqa: F401  (our inline backend, compiled once)
        except Exception as exc:  # a missing optional module must not stop the zygote
            failed[name] = "%s: %s" % (type(exc).__name__, exc)
    for scratch in (isolation.ZYGOTE_SCRATCH, "/dev/shm"):
        linux.umount2(scratch, linux.MNT_DETACH)
    import tempfile

    tempfile.tempdir = None  # sandboxes pick their own /tmp
    # Once here, in our root, for what reseeding imports on first use (numpy's takes `secrets`): a fork
    # reseeds on the host's tree, where (not yet the sandbox's root) the interpreter may be out of reach.
    _reseed()
    gc.collect()
    gc.freeze()  # keep the collector off the shared pages, so forks stay copy-on-write
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # our forks (each sandbox's pid 1) are reaped by the kernel
    if cfg.get("ksm"):
        # Host opted in (SANDLOT_KSM): our pages, and every fork's (the flag is inherited), may be merged
        # by ksmd with identical pages of other sandboxes. Before the first fork, so no sandbox misses it.
        linux.merge_memory()
    # Sandboxes do not depend on us once forked: each ends with its owner (EOF on its channel, which
    # only the owner holds), and the keeper reaps it. If we die, they live on; the host starts a new zygote.
    held = _Held(host_root, host_proc, template_root, os.pidfd_open(os.getpid()))
    _send(ctl, {"t": "ready", "failed": failed})
    _serve_forks(ctl, cfg, held)


class _Held(NamedTuple):
    """What the zygote keeps open for its forks (all close-on-exec, and closed by pid 1)."""

    host_root: int  # the host's tree, where each fork is born (a chrooted caller gets no new user namespace)
    host_proc: int  # the host's /proc: we write each fork's uid maps
    template_root: int  # our chroot, re-entered after each fork
    pidfd: int  # ourselves: a fork checks we still live once it is set to die with us


def _serve_forks(ctl: socket.socket, cfg: dict, held: _Held) -> None:
    """The zygote's request loop. One request's content never ends it: each is checked and answered
    ("forked" or "error"); only a broken stream (bad framing, the host gone) does, and the host then
    starts a new zygote."""
    from _agent import protocol

    buffer = protocol.FrameBuffer()
    pending = []  # descriptors received for the request being read (a big frame spans many reads)
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(ctl, 1 << 16, 1 + MAX_MOUNTS)
        except InterruptedError:
            continue
        pending.extend(fds)
        if not data:
            os._exit(0)
        try:
            frames = buffer.feed(data)
        except protocol.ProtocolError:
            os._exit(73)  # out of step with the host: it restarts us
        for header, _ in frames:
            fds, pending = pending, []
            _answer_fork(ctl, header, fds, cfg, held)


def _answer_fork(ctl: socket.socket, header: dict, fds: list, cfg: dict, held: _Held) -> None:
    try:
        problem = _fork_request_problem(header, fds)
        if problem:
            _send(ctl, {"t": "error", "error": problem})
            return
        try:
            pid = _fork_sandbox(ctl, fds[0], fds[1:], cfg, header, held)
        except Exception as exc:
            _send(ctl, {"t": "error", "error": "fork failed: %s: %s" % (type(exc).__name__, exc)})
            return
        _send(ctl, {"t": "forked", "pid": pid})
    finally:
        for fd in fds:
            os.close(fd)


def _fork_request_problem(header: dict, fds: list):
    """Why a request cannot be a fork (None when it can): checked before anything is done for it."""
    config, slot = header.get("config"), header.get("slot")
    if not isinstance(config, dict) or not isinstance(config.get("env", {}), dict):
        return "bad zygote request: config"
    mounts = config.get("mounts", [])
    if not isinstance(mounts, list) or not all(isinstance(m, dict) for m in mounts):
        return "bad zygote request: mounts"
    if header.get("t") != "fork" or len(fds) != 1 + len(mounts):
        return "bad zygote request: a fork with one channel (and one descriptor per mount) is the only request"
    if not isinstance(slot, int) or isinstance(slot, bool) or not 0 <= slot < 32767:
        return "bad zygote request: slot"  # uids 2 + 2*slot and the next must fit our 65536
    return None


# pid 1 of a fork is born in all of these at once (clone); its cgroup namespace comes later, once the
# host has put it in its cgroup (the namespace's root is the cgroup it is made in).
_FORK_NAMESPACES = ("CLONE_NEWUSER", "CLONE_NEWNS", "CLONE_NEWNET", "CLONE_NEWIPC", "CLONE_NEWUTS", "CLONE_NEWPID")


def _fork_sandbox(ctl, fd: int, mount_fds: list, cfg: dict, header: dict, held: _Held) -> int:
    """Fork a new sandbox and write its uid maps. Returns the pid the host holds it by.

    The child is born pid 1 of the sandbox, in its namespaces (linux.fork_into: one fork). That bypasses
    libc's fork, which only a single-threaded zygote may do; one whose preload started threads (a BLAS
    pool a template asked for) forks an outer process that unshares and forks pid 1, then exits.
    """
    direct = _single_threaded(held.host_proc)
    pipe_r, pipe_w = os.pipe()
    try:
        pid = _clone_pid1(held) if direct else os.fork()
    except BaseException:
        os.close(pipe_r)
        os.close(pipe_w)
        raise
    if pid == 0:
        import signal

        try:  # the child never returns into the zygote's loop, whatever happens
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            ctl.close()
            child_cfg = dict(cfg, **header["config"])
            # The grants' descriptors came with the request, after the channel, one per mount in order.
            child_cfg["mounts"] = [dict(m, fd=mount_fd) for m, mount_fd in zip(child_cfg.get("mounts", []), mount_fds)]
            if direct:
                os.close(pipe_w)
                _born_pid1(socket.socket(fileno=fd), child_cfg, pipe_r, held.pidfd)
            else:
                os.close(pipe_r)
                _forked_outer(socket.socket(fileno=fd), child_cfg, pipe_w, held.host_root)
        finally:
            os._exit(71)
    if not direct:
        os.close(pipe_w)
        try:
            # The child unshares its user namespace; we (its parent namespace) write its maps.
            if os.read(pipe_r, 1) != b"u":
                raise OSError("sandbox child died before its user namespace existed")
        finally:
            os.close(pipe_r)
    else:
        os.close(pipe_r)
    try:
        # The child's user namespace is a child of ours: we write its maps (it waits for them).
        if cfg["setup_uid"] == 0:
            base = 2 + 2 * int(header["slot"])  # a uid pair of its own, inside our 65536
            maps = "0 %d 1\n1000 %d 1\n" % (base, base + 1)
        else:
            maps = "1000 1000 1\n"
        for name in ("uid_map", "gid_map"):
            out = os.open("%d/%s" % (pid, name), os.O_WRONLY, dir_fd=held.host_proc)
            try:
                os.write(out, maps.encode())
            finally:
                os.close(out)
        if direct:
            os.write(pipe_w, b"%d" % pid)  # its pid as the host sees it (it is pid 1 in its own namespace)
    finally:
        if direct:
            os.close(pipe_w)  # unwritten (a failure here): the child sees EOF and exits
    return pid


def _single_threaded(host_proc: int) -> bool:
    task = os.open("self/task", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=host_proc)
    try:
        return len(os.listdir(task)) == 1
    finally:
        os.close(task)


def _clone_pid1(held: _Held) -> int:
    """fork_into the sandbox's namespaces: 0 in the child (pid 1 of them), its pid in the zygote."""
    from _agent import linux

    flags = 0
    for name in _FORK_NAMESPACES:
        flags |= getattr(linux, name)
    pid = -1
    # The kernel refuses a new user namespace to a chrooted caller: we step out to the host's tree for
    # the clone (so the child is born there, and builds its root from it) and back at once.
    os.fchdir(held.host_root)
    os.chroot(".")
    try:
        pid = linux.fork_into(flags)
        return pid
    finally:
        if pid != 0:  # the zygote, not the child
            os.fchdir(held.template_root)
            os.chroot(".")


def _born_pid1(sock: socket.socket, cfg: dict, maps_r: int, zygote_pidfd: int) -> None:
    """pid 1 of a zygote's fork, born in its namespaces, on the host's tree, with the zygote's modules."""
    import select

    from _agent import linux

    try:
        # Until the host says go, we die with the zygote: a fork whose zygote died mid-request was never
        # answered, and the host gives its uid slot to the next one.
        linux.prctl(linux.PR_SET_PDEATHSIG, 9)
        _reseed()
        pid = os.read(maps_r, 32)  # once our uid maps are written; nothing (EOF) if they never will be
        os.close(maps_r)
        if not pid or select.select([zygote_pidfd], [], [], 0)[0]:  # (the zygote died before we were armed)
            os._exit(0)
        os.close(zygote_pidfd)
        pid = int(pid)
        _handshake(sock, cfg, die_with_parent=False, pid=pid)
        # From now on the sandbox is the host's, and outlives the zygote (the uid change above cleared the
        # parent-death signal already, unless the host is unprivileged and there was none).
        linux.prctl(linux.PR_SET_PDEATHSIG, 0)
        linux.unshare(linux.CLONE_NEWCGROUP)  # now that we are in our cgroup: the root we will see
    except Exception as exc:
        _send(sock, {"t": "boot_error", "error": "%s: %s" % (type(exc).__name__, exc)})
        os._exit(71)
    # The host holds pid 1 by pidfd (killing it ends the sandbox); the message is the one an outer
    # process sends for the pid 1 it forked (_spawn_init).
    _send(sock, {"t": "init", "pid": pid})
    _init(sock, cfg, None, parent_waits=False)


def _forked_outer(sock: socket.socket, cfg: dict, ready_w: int, host_root: int) -> None:
    """The outer process of a fork from a zygote that runs threads: it unshares, forks pid 1 and exits."""
    from _agent import linux

    try:
        linux.prctl(linux.PR_SET_PDEATHSIG, 9)
        _reseed()
        # Leave the zygote's chroot for the host tree (the kernel refuses a new user namespace to a
        # chrooted process); pid 1 builds its root from there and pivots, detaching the host tree.
        os.fchdir(host_root)
        os.chroot(".")
        os.close(host_root)
        # A nested user namespace of our own: its own uid pair on the host, so per-user kernel
        # counters (RLIMIT_NPROC, inotify, pending signals) are never shared between sandboxes.
        linux.unshare(linux.CLONE_NEWUSER)
        os.write(ready_w, b"u")
        os.close(ready_w)
        _handshake(sock, cfg)
        linux.unshare(linux.CLONE_NEWNS | linux.CLONE_NEWNET | linux.CLONE_NEWIPC | linux.CLONE_NEWUTS
                      | linux.CLONE_NEWCGROUP | linux.CLONE_NEWPID)
    except Exception as exc:
        _send(sock, {"t": "boot_error", "error": "%s: %s" % (type(exc).__name__, exc)})
        os._exit(71)
    _spawn_init(sock, cfg, None, outer_exits=True)


def _reseed() -> None:
    """Forks of one zygote share its random state; give each its own."""
    import random

    random.seed()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()


def _spawn_init(sock: socket.socket, cfg: dict, prepare, outer_exits: bool = False) -> None:
    """Fork pid 1 of the new pid namespace (a single-threaded zygote's fork is born pid 1 instead).

    Exec'd directly, we stay and wait for it, so the host's child lives exactly as long as the
    sandbox, and pid 1 dies with us (parent-death signal). The outer process of a fork from a zygote
    with threads exits at once; pid 1 moves to the zygote's keeper (a subreaper) and ends with its
    owner: EOF on the channel only the owner holds.
    """
    from _agent import linux

    pid = os.fork()
    if pid == 0:
        _init(sock, cfg, prepare, parent_waits=not outer_exits)
    # The host kills the sandbox through pid 1 (the whole pid namespace dies with it).
    _send(sock, {"t": "init", "pid": pid})
    if outer_exits:
        os._exit(0)
    sock.close()
    try:
        linux.drop_all_capabilities()
    except OSError:
        pass
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except ChildProcessError:
            status = 0
            break
        except InterruptedError:
            continue
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def _init(sock: socket.socket, cfg: dict, prepare, parent_waits: bool) -> None:
    from _agent import isolation, linux, server

    try:
        if prepare is not None:
            prepare()
        isolation.enter_sandbox_root(cfg)
        # pid 1 keeps its channel and nothing else it inherited: not the zygote's descriptor of the
        # host's /proc, not what the preload left open (a sandbox ends when its channel closes,
        # that is with its owner).
        # ...but the lock of its host uid range: held while it lives, even past its owner (a durable
        # sandbox), so no later sandbox is given the same host uids.
        lock = cfg.get("uid_lock_fd")
        # (it stays inheritable for an image's interpreter, exec'd below; the session and commands close it)
        isolation.close_inherited([sock.fileno()] + ([lock] if isinstance(lock, int) and lock > 2 else []))
        import _agent

        # Modules imported later (the matplotlib backend, say) must resolve inside the new root.
        _agent.__path__[:] = ["/opt/sandlot/_agent"]
        sys.path[:] = ["/opt/sandlot"] + [p for p in sys.path if p.startswith(tuple(cfg["prefixes"]))]
        linux_hostname(cfg.get("hostname", "sandbox"))
        isolation.bring_up_loopback()
        isolation.set_rlimits(cfg["limits"])
        isolation.drop_privileges(cfg, parent_waits)
        os.environ.clear()
        os.environ.update(cfg["env"])
        os.chdir(isolation.HOME)
        if cfg.get("exec"):
            _exec_agent(sock, cfg)  # an image template: its own interpreter serves from here on
    except Exception as exc:
        _send(sock, {"t": "boot_error", "error": "%s: %s" % (type(exc).__name__, exc)})
        os._exit(72)
    server.serve(sock, cfg)
    os._exit(0)


def linux_hostname(name: str) -> None:
    from _agent import linux

    encoded = name.encode()
    if linux.libc.sethostname(encoded, len(encoded)) != 0:
        raise OSError("sethostname failed")


if __name__ == "__main__":
    main()
