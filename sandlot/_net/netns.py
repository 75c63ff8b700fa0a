"""Host side: configure a sandbox's network namespace and open the broker's sockets inside it.

A sandbox already lives in a network namespace of its own (boot.py unshares CLONE_NEWNET) where its
code has no capabilities. The host (root, or the owner of the sandbox's user namespace) enters that
namespace and:

- ``configure(pid)``: brings lo up, routes everything (v4 and v6) to lo, and loads the nftables ruleset
  that redirects DNS to :53 and every other TCP connection to :1001, keeps the sandbox's own loopback
  local, and rejects all other UDP (QUIC) at once so clients fall back to TCP;
- ``open_listeners(pid)``: creates the broker's listening sockets there (ports below 1024, which code
  without CAP_NET_BIND_SERVICE can never bind first), kept as file descriptors by the host process;
- ``socket_inside(pid, family, type)``: any socket created in that namespace (get_url's connections to
  the sandbox's own servers; the tests' clients).

Safety: the namespace is opened ONCE as a file descriptor, checked to differ from this process's own,
and only that descriptor is used afterwards (a pid that dies and is reused cannot redirect a command to
another namespace, least of all the host's). Sockets are made on a dedicated short-lived thread that
setns()es into the namespace and back; setns on a thread moves only that thread, and the thread is
never reused: if it cannot get back, it ends there without running anything else.

Rootless (this process is not root but owns the sandbox's user namespace): setns() of a thread needs
CAP_SYS_ADMIN in this process's own namespace, so instead a single-threaded helper enters the owning
user namespace and the network namespace (``nsenter --user --net``): it runs ip/nft there, or makes the
sockets and passes them back over a Unix socket (SCM_RIGHTS).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import json
import os
import sys
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, TypeVar

from .._exceptions import SandlotError
from ._sockmaker import make_sockets

CLONE_NEWNET = 0x40000000
NS_GET_USERNS = 0xB701  # linux/nsfs.h: _IO(0xb7, 0x1), the user namespace owning a namespace
BROKER_PORT = 1001
DNS_PORT = 53

# The whole policy lives in the broker; the netns only funnels traffic to it. Filter output sees the
# destination AFTER nat output (priority -100 < 0), so "loopback destination" covers both the sandbox's
# own local traffic and everything redirected to the broker/DNS sockets.
RULESET = f"""\
table inet sandlot
delete table inet sandlot
table inet sandlot {{
    chain nat_output {{
        type nat hook output priority -100; policy accept;
        ip daddr 127.0.0.0/8 return
        ip6 daddr ::1 return
        meta l4proto {{ tcp, udp }} th dport 53 redirect to :{DNS_PORT}
        meta l4proto tcp redirect to :{BROKER_PORT}
    }}
    chain filter_output {{
        type filter hook output priority 0; policy drop;
        ip daddr 127.0.0.0/8 accept
        ip6 daddr ::1 accept
        meta l4proto tcp accept
        meta l4proto udp reject with icmpx type port-unreachable
    }}
}}
"""
# Everything leaves through lo: there is no other interface (and this kernel has no veth/dummy).
# `::/0` makes ip pick IPv6 for the second route inside one batch.
ROUTES = "link set lo up\nroute replace default dev lo src 127.0.0.1\nroute replace ::/0 dev lo src ::1\n"


class NetnsError(SandlotError):
    """A sandbox's network namespace could not be configured or entered."""


# -- the namespace, opened once --------------------------------------------------------------------------

def _open_netns(pid: int) -> int:
    """An fd on ``pid``'s network namespace, refusing this process's own (the host's) namespace."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        raise NetnsError(f"not a process id: {pid!r}")
    try:
        fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise NetnsError(f"cannot open the network namespace of pid {pid}: {e.strerror}") from e
    target = os.fstat(fd)
    for own in ("/proc/self/ns/net", "/proc/thread-self/ns/net"):
        mine = os.stat(own)
        if (target.st_dev, target.st_ino) == (mine.st_dev, mine.st_ino):
            os.close(fd)
            raise NetnsError(f"pid {pid} shares this process's network namespace: refusing to touch it")
    return fd


def _tool(name: str) -> str:
    found = shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if not found:
        raise NetnsError(f"`{name}` is not installed (Debian packages iproute2, nftables, util-linux)")
    return found


# -- configure ---------------------------------------------------------------------------------------------

def _rootless() -> bool:
    return os.geteuid() != 0


class _Entered:
    """``with _Entered(pid) as (argv_prefix, fds):`` nsenter argv entering pid's namespace(s) by fd."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fds: list[int] = []

    def __enter__(self) -> tuple[list[str], tuple[int, ...]]:
        net = _open_netns(self.pid)
        self.fds.append(net)
        argv = [_tool("nsenter")]
        if _rootless():
            try:
                owner = fcntl.ioctl(net, NS_GET_USERNS)
            except OSError as e:
                self.__exit__()
                raise NetnsError(f"cannot find the user namespace owning pid {self.pid}'s network: {e.strerror}") from e
            self.fds.append(owner)
            # keep our ids: setgroups is denied in user namespaces made rootless; our uid is their root
            argv += [f"--user=/proc/self/fd/{owner}", "--preserve-credentials"]
        argv += [f"--net=/proc/self/fd/{net}", "--"]
        return argv, tuple(self.fds)

    def __exit__(self, *exc: object) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def configure(pid: int) -> float:
    """Route and filter ``pid``'s network namespace so all its traffic reaches the broker; seconds taken.

    One subprocess: nsenter (into the namespace via an fd we already checked) runs ``ip -batch`` for lo
    and the routes, then execs ``nft -f`` for the ruleset (atomic; re-running replaces it). About 20 ms,
    most of it nft.
    """
    started = time.monotonic()
    ip, nft = _tool("ip"), _tool("nft")
    script = f'{ip} -batch - <<"EOF"\n{ROUTES}EOF\nexec {nft} -f /dev/fd/3 3<<"EOF"\n{RULESET}EOF\n'
    with _Entered(pid) as (enter, fds):
        done = subprocess.run(
            enter + ["/bin/sh", "-ec", script], pass_fds=fds, stdin=subprocess.DEVNULL, capture_output=True,
            text=True, timeout=30, env={"PATH": "/usr/sbin:/sbin:/usr/bin:/bin", "LC_ALL": "C"})
    if done.returncode != 0:
        raise NetnsError(f"configuring the network of pid {pid} failed: {(done.stderr or done.stdout).strip()}")
    return time.monotonic() - started


def ruleset(pid: int) -> str:
    """The nftables ruleset of ``pid``'s namespace, as ``nft list ruleset`` prints it (read only)."""
    with _Entered(pid) as (enter, fds):
        done = subprocess.run(enter + [_tool("nft"), "list", "ruleset"], pass_fds=fds, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise NetnsError(f"reading the ruleset of pid {pid} failed: {done.stderr.strip()}")
    return done.stdout


# -- sockets made inside ------------------------------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
T = TypeVar("T")


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def run_inside(pid: int, job: Callable[[], T]) -> T:
    """Run ``job()`` on a fresh thread inside ``pid``'s network namespace; return its result or raise.

    The thread enters, runs the job, and returns to this process's namespace before it ends. If it
    cannot return (which would take a kernel refusing setns on our own namespace), its result is thrown
    away and the thread ends without touching anything else; it is never reused for other work.
    """
    target = _open_netns(pid)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    outcome: dict = {}

    def work() -> None:
        try:
            _setns(target)
        except OSError as e:
            outcome["error"] = NetnsError(f"cannot enter the network namespace of pid {pid}: {e.strerror}")
            return
        try:
            outcome["value"] = job()
        except BaseException as e:  # handed to the caller below
            outcome["error"] = e
        finally:
            try:
                _setns(home)
            except OSError as e:
                value = outcome.pop("value", None)
                for made in value if isinstance(value, list) else [value]:
                    if isinstance(made, socket.socket):
                        made.close()
                outcome["error"] = NetnsError(f"a thread could not leave pid {pid}'s namespace: {e.strerror}")

    thread = threading.Thread(target=work, name=f"sandlot-netns-{pid}", daemon=True)
    try:
        thread.start()
        thread.join()
    finally:
        os.close(target)
        os.close(home)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


with open(os.path.join(os.path.dirname(__file__), "_sockmaker.py")) as _f:
    _SOCKMAKER_SOURCE = _f.read()  # given with -c: inside the user namespace our files may not be readable


def _helper_python() -> str:
    """The helper is stdlib-only: the system's python3 works even where this venv's (under a private home)
    cannot be executed from inside the sandbox's user namespace."""
    return shutil.which("python3", path="/usr/bin:/bin") or sys.executable


def sockets_inside(pid: int, specs: list) -> list[socket.socket]:
    """Sockets made inside ``pid``'s namespace from specs ([family, type, host|None, port|None, listen]).

    Root: on a setns thread (run_inside). Rootless: by a helper process that entered the namespace's
    owning user namespace and the namespace, which passes the descriptors back.
    """
    if not _rootless():
        return run_inside(pid, lambda: make_sockets(specs))
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _Entered(pid) as (enter, fds):
            helper = subprocess.Popen(
                enter + [_helper_python(), "-I", "-S", "-c", _SOCKMAKER_SOURCE, json.dumps(specs), str(child.fileno())],
                pass_fds=fds + (child.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE)
        child.close()
        parent.settimeout(30)
        message, received, _, _ = socket.recv_fds(parent, 4096, len(specs))
        _, stderr = helper.communicate(timeout=30)
    finally:
        parent.close()
        child.close()
    made = [socket.socket(fileno=fd) for fd in received]
    if len(made) != len(specs):
        for s in made:
            s.close()
        why = json.loads(message) if message.startswith(b"{") else {"error": stderr.decode(errors="replace").strip()}
        if why.get("errno") in (errno.EACCES, errno.EADDRINUSE):
            raise OSError(why["errno"], why["error"])
        raise NetnsError(f"making sockets in pid {pid}'s namespace failed: {why.get('error') or 'helper died'}")
    return made


def socket_inside(pid: int, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
    """A new socket living in ``pid``'s network namespace (usable from any thread of this process)."""
    return sockets_inside(pid, [[family, type, None, None, False]])[0]


def open_connection_inside(pid: int, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> socket.socket:
    """A TCP connection to ``host:port`` as seen from inside ``pid``'s namespace (the sandbox's own servers)."""
    s = socket_inside(pid, socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        s.settimeout(timeout)
        s.connect((host, port))  # a socket keeps the namespace it was made in: connecting from here is fine
        s.settimeout(None)
        return s
    except BaseException:
        s.close()
        raise


@dataclass
class Listeners:
    """The broker's sockets inside one sandbox's namespace (all non-blocking, owned by the host)."""

    tcp: list[socket.socket] = field(default_factory=list)      # 127.0.0.1:1001, [::1]:1001
    dns_udp: list[socket.socket] = field(default_factory=list)  # 127.0.0.1:53, [::1]:53
    dns_tcp: list[socket.socket] = field(default_factory=list)  # 127.0.0.1:53, [::1]:53

    def all(self) -> list[socket.socket]:
        return [*self.tcp, *self.dns_udp, *self.dns_tcp]

    def close(self) -> None:
        for s in self.all():
            s.close()


def open_listeners(pid: int, *, broker_port: int = BROKER_PORT, dns_port: int = DNS_PORT) -> Listeners:
    """Create the broker's and the DNS responder's listening sockets inside ``pid``'s namespace.

    Call after ``configure(pid)`` (lo must be up for [::1]).
    """
    specs = []
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        specs += [[family, socket.SOCK_STREAM, host, broker_port, True],
                  [family, socket.SOCK_DGRAM, host, dns_port, False],
                  [family, socket.SOCK_STREAM, host, dns_port, True]]
    try:
        made = sockets_inside(pid, specs)
    except OSError as e:
        raise NetnsError(f"cannot open the broker's sockets in pid {pid}'s namespace: {e}") from e
    for s in made:
        s.setblocking(False)
    return Listeners(tcp=made[0::3], dns_udp=made[1::3], dns_tcp=made[2::3])


def original_destination(conn: socket.socket) -> tuple[str, int]:
    """The address a redirected connection was dialled to (SO_ORIGINAL_DST, v4 or v6)."""
    SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST has the same value
    if conn.family == socket.AF_INET6:
        raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)  # struct sockaddr_in6
        port = int.from_bytes(raw[2:4], "big")
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    raw = conn.getsockopt(socket.IPPROTO_IP, SO_ORIGINAL_DST, 16)  # struct sockaddr_in
    return socket.inet_ntop(socket.AF_INET, raw[4:8]), int.from_bytes(raw[2:4], "big")
