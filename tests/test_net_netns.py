"""Issue #13: the sandbox's network namespace funnels every connection to the host's broker.

After ``configure(pid)``, whatever address code inside dials over TCP lands on the broker's listener, which
learns the dialled address through SO_ORIGINAL_DST; DNS to any resolver lands on the :53 listener; other
UDP (QUIC) fails at once; the sandbox's own loopback stays local. Code without capabilities (a real
sandbox's uid 1000) can change none of it. The host's own namespace is never touched (checked around
the module). Namespaces are a holder process's (tests/netns_holder.py) or a real sandbox's.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import threading
import time

import pytest

from sandlot._net import netns

from .conftest import needs_sandbox, processes_in_sandbox
from .netns_holder import NetnsHolder, netns_problem

PROBLEM = netns_problem()
pytestmark = [needs_sandbox, pytest.mark.skipif(PROBLEM is not None, reason=str(PROBLEM))]


def _host_network() -> list[str]:
    return [subprocess.run(cmd, capture_output=True, text=True).stdout for cmd in (
        ["nft", "list", "ruleset"], ["ip", "addr"], ["ip", "route"], ["ip", "-6", "route"])]


@pytest.fixture(scope="module", autouse=True)
def host_network_untouched():
    before = _host_network()
    yield
    assert _host_network() == before, "the host's own network configuration changed"


@pytest.fixture
def configured():
    """A configured sandbox-like namespace with the broker's listeners open: (pid, listeners)."""
    with NetnsHolder() as pid:
        netns.configure(pid)
        listeners = netns.open_listeners(pid)
        try:
            yield pid, listeners
        finally:
            listeners.close()


def _accept(listener: socket.socket, timeout: float = 5.0) -> socket.socket:
    listener.settimeout(timeout)
    conn, _ = listener.accept()
    return conn


@pytest.mark.parametrize("family,address", [(socket.AF_INET, "203.0.113.7"), (socket.AF_INET6, "2001:db8::7")])
@pytest.mark.parametrize("port", [443, 80, 22])
def test_any_tcp_destination_lands_on_the_broker_which_sees_where_it_was_going(configured, family, address, port):
    pid, listeners = configured
    client = netns.socket_inside(pid, family)
    with client:
        client.settimeout(5)
        client.connect((address, port))
        client.sendall(b"hello")
        with _accept(listeners.tcp[0 if family == socket.AF_INET else 1]) as conn:
            assert netns.original_destination(conn) == (address, port)
            assert conn.recv(5) == b"hello"


def test_dns_to_any_resolver_lands_on_the_dns_listeners(configured):
    pid, listeners = configured
    for i, (family, resolver) in enumerate(((socket.AF_INET, "192.0.2.99"), (socket.AF_INET6, "2001:db8::99"))):
        with netns.socket_inside(pid, family, socket.SOCK_DGRAM) as udp:
            udp.sendto(b"query-udp", (resolver, 53))
            listeners.dns_udp[i].settimeout(5)
            data, peer = listeners.dns_udp[i].recvfrom(100)
            assert data == b"query-udp"
            listeners.dns_udp[i].sendto(b"answer", peer)  # the reply comes back from the resolver's address
            udp.settimeout(5)
            answer, source = udp.recvfrom(100)
            assert answer == b"answer" and source[:2] == (resolver, 53)
        with netns.socket_inside(pid, family) as tcp:
            tcp.settimeout(5)
            tcp.connect((resolver, 53))
            tcp.sendall(b"query-tcp")
            with _accept(listeners.dns_tcp[i]) as conn:
                assert conn.recv(100) == b"query-tcp"
                assert netns.original_destination(conn) == (resolver, 53)


@pytest.mark.parametrize("family,address", [(socket.AF_INET, "203.0.113.7"), (socket.AF_INET6, "2001:db8::7")])
def test_udp_other_than_dns_fails_at_once_so_quic_falls_back_to_tcp(configured, family, address):
    pid, listeners = configured
    with netns.socket_inside(pid, family, socket.SOCK_DGRAM) as udp:
        udp.settimeout(5)
        udp.connect((address, 443))
        started = time.monotonic()
        with pytest.raises(OSError) as refused:
            udp.send(b"\xc0quic initial")
            udp.recv(100)  # if the send went, the ICMP port-unreachable answers here
        assert refused.value.errno in (errno.EPERM, errno.ECONNREFUSED), refused.value
        assert time.monotonic() - started < 0.5
    for udp_listener in listeners.dns_udp:
        udp_listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            udp_listener.recvfrom(100)  # nothing was redirected to DNS either


@pytest.mark.parametrize("family,loopback", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_the_sandboxs_own_loopback_servers_stay_local(configured, family, loopback):
    pid, listeners = configured
    server = netns.run_inside(pid, lambda: socket.create_server((loopback, 8000), family=family))
    with server, netns.socket_inside(pid, family) as client:
        client.settimeout(5)
        client.connect((loopback, 8000))
        with _accept(server) as conn:
            client.sendall(b"local")
            assert conn.recv(5) == b"local"
    broker = listeners.tcp[0 if family == socket.AF_INET else 1]
    broker.setblocking(False)
    with pytest.raises(BlockingIOError):
        broker.accept()


def test_configure_is_idempotent_and_refuses_this_processs_own_namespace():
    with NetnsHolder() as pid:
        netns.configure(pid)
        netns.configure(pid)  # replaces, never doubles
        rules = netns.ruleset(pid)
        assert rules.count("table inet sandlot") == 1 and "redirect to :1001" in rules
    child = subprocess.Popen(["sleep", "60"])  # another process in the host's namespace
    try:
        for pid in (os.getpid(), child.pid):
            with pytest.raises(netns.NetnsError, match="shares this process's network namespace"):
                netns.configure(pid)
            with pytest.raises(netns.NetnsError, match="shares this process's network namespace"):
                netns.socket_inside(pid)
    finally:
        child.kill()
        child.wait()
    with pytest.raises(netns.NetnsError, match="cannot open"):
        netns.configure(child.pid)  # gone


def test_the_setns_thread_goes_back_home_and_errors_reach_the_caller():
    home = os.stat("/proc/thread-self/ns/net").st_ino
    with NetnsHolder() as pid:
        theirs = os.stat(f"/proc/{pid}/ns/net").st_ino
        seen = {}

        def look() -> int:
            seen["thread"] = threading.get_ident()
            return os.stat("/proc/thread-self/ns/net").st_ino

        assert netns.run_inside(pid, look) == theirs
        assert seen["thread"] != threading.get_ident()  # a thread of its own, not the caller's

        def fail() -> None:
            raise ValueError("inside")

        with pytest.raises(ValueError, match="inside"):
            netns.run_inside(pid, fail)
        assert os.stat("/proc/thread-self/ns/net").st_ino == home
        assert not [t for t in threading.enumerate() if t.name.startswith("sandlot-netns-")]
        # a socket made inside works from the caller's thread, in the namespace it was made in
        with netns.socket_inside(pid, socket.AF_INET, socket.SOCK_DGRAM) as s:
            with pytest.raises(OSError) as unreachable:
                s.sendto(b"x", ("192.0.2.1", 9))  # that namespace has no route at all (not configured)
            assert unreachable.value.errno == errno.ENETUNREACH


# -- a real sandbox ---------------------------------------------------------------------------------------

def _host_pid1(sandbox_id: str) -> int:
    for pid in processes_in_sandbox(sandbox_id):
        try:
            with open(f"/proc/{pid}/status") as f:
                if f.read().split("\nNSpid:")[1].split("\n")[0].split()[-1] == "1":
                    return pid
        except (OSError, IndexError):
            continue
    raise AssertionError(f"no pid 1 for {sandbox_id}")


TAMPER = r"""
import errno, os, socket, subprocess, json
out = {}
def tool(*argv):
    done = subprocess.run(argv, capture_output=True, text=True)
    return done.returncode, (done.stderr or done.stdout).strip()[-200:]
out["nft_flush"] = tool("/usr/sbin/nft", "flush", "ruleset")
out["nft_delete"] = tool("/usr/sbin/nft", "delete", "table", "inet", "sandlot")
out["route_add"] = tool("/usr/bin/ip", "route", "add", "203.0.113.0/24", "dev", "lo")
out["route_del"] = tool("/usr/bin/ip", "route", "del", "default")
out["lo_down"] = tool("/usr/bin/ip", "link", "set", "lo", "down")
out["unprivileged_port_sysctl"] = tool("/bin/sh", "-c", "echo 0 > /proc/sys/net/ipv4/ip_unprivileged_port_start")
def attempt(make):
    try:
        make()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
out["raw4"] = attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP))
out["raw6"] = attempt(lambda: socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_UDP))
out["packet"] = attempt(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW))
out["ping"] = attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP).sendto(b"\x08\0\0\0\0\0\0\0", ("203.0.113.7", 0)))
for name, family, type, addr in (("bind53", socket.AF_INET, socket.SOCK_DGRAM, ("127.0.0.1", 53)),
                                 ("bind53tcp6", socket.AF_INET6, socket.SOCK_STREAM, ("::1", 53)),
                                 ("bind1001", socket.AF_INET, socket.SOCK_STREAM, ("0.0.0.0", 1001))):
    out[name] = attempt(lambda: socket.socket(family, type).bind(addr))
for name, family, addr in (("v4", socket.AF_INET, ("203.0.113.7", 443)), ("v6", socket.AF_INET6, ("2001:db8::7", 443))):
    s = socket.socket(family)
    s.settimeout(5)
    s.connect(addr)
    s.sendall(name.encode())
    out["sent_" + name] = s.recv(10).decode()
print(json.dumps(out))
"""


@pytest.mark.tiers("process")
def test_code_in_a_real_sandbox_is_redirected_and_cannot_undo_it(tier, sandbox):
    import json

    pid1 = _host_pid1(sandbox.sandbox_id)
    netns.configure(pid1)
    listeners = netns.open_listeners(pid1)
    seen: list = []

    def broker() -> None:
        for listener in listeners.tcp:
            with _accept(listener, 60) as conn:
                seen.append((netns.original_destination(conn), conn.recv(10).decode()))
                conn.sendall(b"back")

    thread = threading.Thread(target=broker)
    thread.start()
    try:
        ex = sandbox.run_code(TAMPER)
        thread.join(70)
        assert ex.error is None, ex.error
        out = json.loads("".join(ex.logs.stdout))
        assert seen == [(("203.0.113.7", 443), "v4"), (("2001:db8::7", 443), "v6")]
        assert out["sent_v4"] == out["sent_v6"] == "back"
        for step in ("nft_flush", "nft_delete", "route_add", "route_del", "lo_down", "unprivileged_port_sysctl"):
            code, message = out[step]
            assert code != 0 and ("not permitted" in message or "denied" in message or "Read-only" in message), (step, message)
        assert out["raw4"] == out["raw6"] == out["packet"] == "EPERM", out
        assert out["ping"] in ("EACCES", "EPERM"), out  # ping sockets are off in a fresh namespace
        assert out["bind53"] == out["bind53tcp6"] == out["bind1001"] == "EACCES", out
        rules = netns.ruleset(pid1)
        assert "redirect to :1001" in rules and "redirect to :53" in rules
    finally:
        listeners.close()
        thread.join(5)


ROOTLESS_DRIVER = r"""
import json, os, socket
from sandlot._net import netns
from tests.netns_holder import NetnsHolder
out = {"uid": os.geteuid()}
with NetnsHolder() as pid:
    out["configure_ms"] = 1000 * netns.configure(pid)
    listeners = netns.open_listeners(pid)
    with netns.socket_inside(pid) as client:
        client.settimeout(5)
        client.connect(("203.0.113.7", 443))
        listeners.tcp[0].setblocking(True)
        conn, _ = listeners.tcp[0].accept()
        out["original"] = list(netns.original_destination(conn))
        conn.close()
    with netns.socket_inside(pid, socket.AF_INET6, socket.SOCK_DGRAM) as udp:
        udp.sendto(b"q", ("2001:db8::99", 53))
        listeners.dns_udp[1].setblocking(True)
        out["dns"] = listeners.dns_udp[1].recv(10).decode()
    try:
        netns.run_inside(pid, lambda: None)
        out["thread_setns"] = "worked"
    except netns.NetnsError as e:
        out["thread_setns"] = str(e)
    out["rules"] = "redirect to :1001" in netns.ruleset(pid)
    listeners.close()
print(json.dumps(out))
"""


def test_rootless_a_non_root_owner_configures_and_serves_its_sandboxs_namespace(tmp_path):
    """The host side need not be root: the owner of the sandbox's user namespace enters it with nsenter
    --user --net (a helper hands the sockets back), since it may not setns() one of its threads."""
    import json
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
                           sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {root!r})\n" + ROOTLESS_DRIVER],
                          capture_output=True, text=True, timeout=120, cwd=str(tmp_path),
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(tmp_path)})
    if "Operation not permitted" in done.stderr and "unshare" in done.stderr:
        pytest.skip("unprivileged user namespaces are disabled on this host")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["uid"] == 65534
    assert out["original"] == ["203.0.113.7", 443] and out["dns"] == "q" and out["rules"]
    assert "cannot enter" in out["thread_setns"] and "Operation not permitted" in out["thread_setns"]


def test_a_held_namespace_for_a_runtime_is_new_configured_and_ends_with_its_holder():
    """sandlot/_net/holder.py: what gVisor's runsc --network=host joins. Never this process's namespace;
    configurable like a sandbox's; gone (no process left in it) once closed."""
    from sandlot._net.holder import NetnsHolder as RuntimeNetns

    own = os.stat("/proc/self/ns/net").st_ino
    holder = RuntimeNetns().start()
    try:
        pid, inode = holder.pid, os.stat(holder.path).st_ino
        assert inode != own and holder.path == f"/proc/{pid}/ns/net"
        netns.configure(pid)
        assert "redirect to :1001" in netns.ruleset(pid)
    finally:
        holder.close()
    assert not os.path.exists(f"/proc/{pid}/ns/net") or os.stat(f"/proc/{pid}/ns/net").st_ino != inode
    holder.close()  # twice is harmless
