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
import socket
import sys

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


def _send(sock: socket.socket, header: dict) -> None:
    from _agent import protocol

    sock.sendall(protocol.encode(header))


def main() -> None:
    sys.path.insert(0, _HERE)
    from _agent import isolation, linux, server  # noqa: F401  (import everything before the pivot)
    from _agent import kernel, landlock, protocol  # noqa: F401

    sock = socket.socket(fileno=int(sys.argv[1]))
    cfg = _recv_frame(sock)["config"]
    try:
        linux.prctl(linux.PR_SET_PDEATHSIG, 9)
        linux.unshare(linux.CLONE_NEWUSER | linux.CLONE_NEWNS | linux.CLONE_NEWNET
                      | linux.CLONE_NEWIPC | linux.CLONE_NEWUTS)
        # Still the host's uid (only our capabilities moved to the new namespace): we can reach
        # paths owned by us, like a pyenv under a 0700 /root, and binds must come from this new
        # mount namespace, so the host paths are opened now.
        plan = isolation.plan_host_paths(cfg)
        _send(sock, {"t": "unshared", "pid": os.getpid()})
        if _recv_frame(sock)["t"] != "go":
            os._exit(70)
        if cfg["setup_uid"] == 0:
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
        linux.unshare(linux.CLONE_NEWCGROUP | linux.CLONE_NEWPID)
    except Exception as exc:  # report the failing step to the host, plainly
        _send(sock, {"t": "boot_error", "error": "%s: %s" % (type(exc).__name__, exc)})
        os._exit(71)

    pid = os.fork()
    if pid == 0:
        _init(sock, cfg, plan)
    # The host kills the sandbox through pid 1 (the whole pid namespace dies with it, and we reap it).
    _send(sock, {"t": "init", "pid": pid})
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


def _init(sock: socket.socket, cfg: dict, plan: list) -> None:
    from _agent import isolation, server

    try:
        isolation.build_template_root(cfg, plan)
        isolation.enter_sandbox_root(cfg)
        import _agent

        # Modules imported later (the matplotlib backend, say) must resolve inside the new root.
        _agent.__path__[:] = ["/opt/sandlot/_agent"]
        sys.path[:] = ["/opt/sandlot"] + [p for p in sys.path if p.startswith(tuple(cfg["prefixes"]))]
        linux_hostname(cfg.get("hostname", "sandbox"))
        isolation.bring_up_loopback()
        isolation.set_rlimits(cfg["limits"])
        isolation.drop_privileges(cfg)
        os.chdir(isolation.HOME)
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
