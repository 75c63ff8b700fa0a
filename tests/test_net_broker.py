"""Issue #13: the broker carries exactly what the policy grants, refuses the rest at once, and logs it all.

Setup per test: the fake internet (tests/netlab.py); a sandbox-like namespace (a user + net namespace
holder, configured by sandlot._net.netns exactly as a sandbox's is); the broker on a thread that lives in
the LAB namespace (the "host"), so its upstream dials and DNS queries can reach only the fake internet.
Clients are real sockets (and curl) inside the sandbox-like namespace: they resolve through whatever
resolver they like (port 53 is redirected to the broker's DNS) and dial the address they got.
What must NOT happen is checked on the internet's own records (lab.requests / lab.queries).
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import subprocess
import time

import dnslib
import pytest

from sandlot._net import netns
from sandlot._net.broker import Broker

from . import netlab
from .conftest import needs_sandbox
from .netns_holder import LoopInNamespace, NetnsHolder, netns_problem
from .test_net_netns import host_network_untouched  # noqa: F401 - autouse: the host's network is never changed

PROBLEM = netns_problem() or netlab.skip_reason()
pytestmark = [needs_sandbox, pytest.mark.skipif(PROBLEM is not None, reason=str(PROBLEM))]

SYNTHETIC_V4 = ipaddress.ip_network("198.18.0.0/15")
SYNTHETIC_V6 = ipaddress.ip_network("100::/64")
ANY_RESOLVER = "192.0.2.99"  # not a lab resolver, not routed anywhere: only the redirect can answer


@pytest.fixture(scope="module")
def lab():
    with netlab.Lab() as lab:
        yield lab


class Net:
    """One sandbox-like namespace served by a broker; helpers act as code inside would."""

    def __init__(self, lab: netlab.Lab, pid: int, loop: LoopInNamespace, broker: Broker, log) -> None:
        self.lab, self.pid, self.loop, self.broker, self.log = lab, pid, loop, broker, log

    def update(self, allow=(), deny=()) -> list[dict]:
        from sandlot._net.policy import NetworkPolicy

        policy = NetworkPolicy.build({"allow": list(allow), "deny": list(deny)})
        return self.loop.call(self.broker.update, policy)

    def stats(self) -> dict:
        return self.loop.call(self.broker.stats)

    def entries(self) -> list[dict]:
        return self.loop.call(lambda: list(self.log.entries()))

    def tcp_entries(self) -> list[dict]:
        return [e for e in self.entries() if e["kind"] == "tcp"]

    def resolve(self, name: str, qtype: str = "A") -> list[str]:
        with netns.socket_inside(self.pid, socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.settimeout(5)
            udp.sendto(dnslib.DNSRecord.question(name, qtype).pack(), (ANY_RESOLVER, 53))
            reply = dnslib.DNSRecord.parse(udp.recv(4096))
        return [str(r.rdata) for r in reply.rr if r.rtype == getattr(dnslib.QTYPE, qtype)]

    def connect(self, address: str, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        s = netns.socket_inside(self.pid, family)
        s.settimeout(5)
        s.connect((address, port))
        return s

    def http_get(self, address: str, port: int = 80, host: str = "", path: str = "/") -> bytes:
        with self.connect(address, port) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            return _read_all(s)

    def https_get(self, address: str, sni: str, host: str | None = None, path: str = "/") -> bytes:
        context = ssl.create_default_context(cafile=str(self.lab.ca_path))
        context.check_hostname = False  # what is checked here is the broker's refusal, not the name
        with context.wrap_socket(self.connect(address, 443), server_hostname=sni) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host or sni}\r\nConnection: close\r\n\r\n".encode())
            return _read_all(s)

    def assert_reset(self, address: str, port: int, first: bytes = b"", sni: str | None = None,
                     within: float = 1.0) -> float:
        """The connection is refused with a reset, at once (not after a timeout); seconds it took."""
        started = time.monotonic()
        with pytest.raises((ConnectionResetError, ssl.SSLError, ConnectionRefusedError, BrokenPipeError)) as refused:
            s = self.connect(address, port)
            with s:
                if sni is not None:
                    context = ssl.create_default_context(cafile=str(self.lab.ca_path))
                    s = context.wrap_socket(s, server_hostname=sni)
                elif first:
                    s.sendall(first)
                data = s.recv(100)
                if data == b"":
                    pytest.fail("closed without a reset")
        took = time.monotonic() - started
        if isinstance(refused.value, ssl.SSLError):
            assert "EOF" in str(refused.value) or "reset" in str(refused.value).lower(), refused.value
        assert took < within, f"refusal took {took:.2f}s"
        return took


def _read_response(s: socket.socket) -> bytes:
    """One HTTP/1.1 response with a Content-Length (the connection stays open)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += s.recv(65536)
    return head + b"\r\n\r\n" + body


def _read_all(s: socket.socket) -> bytes:
    data = b""
    while True:
        more = s.recv(65536)
        if not more:
            return data
        data += more


@pytest.fixture
def net(lab):
    """Net(...) with an empty policy; tests grant with net.update(allow=...)."""
    from sandlot._net.dns import Upstream
    from sandlot._net.log import DecisionLog
    from sandlot._net.policy import NetworkPolicy

    lab.clear_logs()
    with NetnsHolder() as pid:
        netns.configure(pid)
        listeners = netns.open_listeners(pid)
        loop = LoopInNamespace(lab.ns_path)
        try:
            log = DecisionLog()

            async def start() -> Broker:
                broker = Broker(NetworkPolicy.build({"allow": [], "deny": []}), log, Upstream([(netlab.DNS, 53)]),
                                head_wait=1.0)
                await broker.start(listeners)
                return broker

            broker = loop.run(start())
            try:
                yield Net(lab, pid, loop, broker, log)
            finally:
                loop.run(broker.close())
        finally:
            loop.close()
            listeners.close()


# -- allowed ---------------------------------------------------------------------------------------------------

def test_an_allowed_name_works_over_http_and_https_on_v4_and_v6(net, lab):
    net.update(allow=["www.example.com"])
    v4, = net.resolve("www.example.com", "A")
    v6, = net.resolve("www.example.com", "AAAA")
    assert ipaddress.ip_address(v4) in SYNTHETIC_V4 and ipaddress.ip_address(v6) in SYNTHETIC_V6

    assert b"hello from 203.0.113.10 (www.example.com)" in net.http_get(v4, 80, "www.example.com")
    assert b"hello from 203.0.113.10 (www.example.com)" in net.https_get(v4, "www.example.com")
    assert b"hello from 2001:db8::10 (www.example.com)" in net.https_get(v6, "www.example.com")

    seen = lab.requests(host="www.example.com")
    assert [(r["scheme"], r["server"], r["sni"]) for r in seen] == [
        ("http", netlab.WEB_V4, None), ("https", netlab.WEB_V4, "www.example.com"),
        ("https", netlab.WEB_V6, "www.example.com")]
    assert {r["client"] for r in seen} <= {netlab.LAB_V4, netlab.LAB_V6}  # dialled by the host side
    allowed = [e for e in net.tcp_entries() if e["verdict"] == "allow"]
    assert [(e["name"], e["address"], e["port"], e["rule"]) for e in allowed] == [
        ("www.example.com", netlab.WEB_V4, 80, "www.example.com"),
        ("www.example.com", netlab.WEB_V4, 443, "www.example.com"),
        ("www.example.com", netlab.WEB_V6, 443, "www.example.com")]


def test_an_ipv6_only_name_and_dns_over_tcp(net, lab):
    net.update(allow=["v6only.example.com:443"])
    assert net.resolve("v6only.example.com", "A") == []  # mirrors upstream: no A records, no synthetic A
    with netns.socket_inside(net.pid) as tcp:  # DNS over TCP to any resolver lands on the broker's DNS too
        tcp.settimeout(5)
        tcp.connect((ANY_RESOLVER, 53))
        query = dnslib.DNSRecord.question("v6only.example.com", "AAAA").pack()
        tcp.sendall(len(query).to_bytes(2, "big") + query)
        length = int.from_bytes(tcp.recv(2), "big")
        reply = dnslib.DNSRecord.parse(tcp.recv(length))
    v6, = [str(r.rdata) for r in reply.rr]
    assert ipaddress.ip_address(v6) in SYNTHETIC_V6
    assert b"hello from 2001:db8::30 (v6only.example.com)" in net.https_get(v6, "v6only.example.com")
    assert [r["server"] for r in lab.requests()] == [netlab.V6ONLY]


def test_curl_inside_reaches_an_allowed_name_transparently(net, lab):
    """A real client that knows nothing of the broker: the host's resolv.conf, no proxy variables."""
    net.update(allow=["api.example.com:443"])
    done = subprocess.run(["nsenter", f"--net=/proc/{net.pid}/ns/net", "--", "curl", "-sS", "--max-time", "10",
                           "--cacert", str(lab.ca_path), "https://api.example.com/curl"],
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert "hello from" in done.stdout and "(api.example.com)" in done.stdout
    assert [r["path"] for r in lab.requests(host="api.example.com")] == ["/curl"]


def test_a_server_that_speaks_first_gets_through_after_the_short_wait(net):
    net.update(allow=[f"echo.example.com:{netlab.BANNER_PORT}"])
    address, = net.resolve("echo.example.com")
    with net.connect(address, netlab.BANNER_PORT) as s:
        started = time.monotonic()
        assert s.recv(100) == netlab.BANNER
        assert time.monotonic() - started < 2.0
        s.sendall(b"ping")
        assert s.recv(100) == b"ping"


# -- refused, at once -------------------------------------------------------------------------------------------

def test_a_denied_name_is_not_resolved_and_its_address_is_reset(net, lab):
    net.update(allow=["www.example.com"], deny=["api.example.com"])
    assert net.resolve("api.example.com") == []
    assert net.resolve("other.example.com") == []
    assert not lab.queries(name="api.example.com") and not lab.queries(name="other.example.com")
    # dialling the real address instead (an IP literal) is refused too: no IP rule grants it
    net.assert_reset(netlab.API_V4, 80, b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
    net.assert_reset(netlab.OTHER_V4, 443, sni="other.example.com")
    assert not lab.requests(server=netlab.API_V4) and not lab.requests(server=netlab.OTHER_V4)
    denied = [e for e in net.tcp_entries() if e["verdict"] == "deny"]
    assert [(e["address"], e["port"]) for e in denied] == [(netlab.API_V4, 80), (netlab.OTHER_V4, 443)]


def test_a_denied_port_of_an_allowed_name_is_reset(net, lab):
    net.update(allow=["www.example.com:443"])
    address, = net.resolve("www.example.com")
    net.assert_reset(address, 80, b"GET / HTTP/1.1\r\nHost: www.example.com\r\n\r\n")
    assert not lab.requests()
    entry, = net.tcp_entries()
    assert (entry["name"], entry["port"], entry["verdict"]) == ("www.example.com", 80, "deny")


def test_sni_or_host_asking_for_another_name_is_reset(net, lab):
    net.update(allow=["www.example.com", "other.example.com"])
    address, = net.resolve("www.example.com")
    net.assert_reset(address, 443, sni="other.example.com")
    net.assert_reset(address, 80, b"GET / HTTP/1.1\r\nHost: other.example.com\r\n\r\n")
    net.assert_reset(address, 80, b"GET http://other.example.com/ HTTP/1.1\r\nHost: www.example.com\r\n\r\n")
    net.assert_reset(address, 443, first=b"\x16\x03\x01\x00\x04\x02\x00\x00\x00")  # a ServerHello
    # a hello that never completes: refused after head_wait (1 s here), not kept open
    assert net.assert_reset(address, 443, first=b"\x16\x03\x01\x00\x05hello", within=2.5) >= 1.0
    assert not lab.requests()
    reasons = [e["reason"] for e in net.tcp_entries()]
    assert reasons[0].startswith("sni-mismatch: dialled www.example.com, TLS asks for other.example.com")
    assert reasons[1].startswith("host-mismatch") and reasons[2].startswith("host-mismatch")
    assert "not a ClientHello" in reasons[3] and reasons[4].startswith("incomplete")


def test_waiting_out_the_peek_or_reusing_the_connection_cannot_switch_hosts(net, lab):
    net.update(allow=["www.example.com:80"])
    web, = net.resolve("www.example.com")
    # silent past the short wait (as server-speaks-first clients are), then a request for another host
    with net.connect(web, 80) as s:
        time.sleep(0.8)
        s.sendall(b"GET /late HTTP/1.1\r\nHost: other.example.com\r\n\r\n")
        with pytest.raises(ConnectionResetError):
            s.recv(100)
    # an honest late client is served
    with net.connect(web, 80) as s:
        time.sleep(0.8)
        s.sendall(b"GET /late-ok HTTP/1.1\r\nHost: www.example.com\r\n\r\n")
        assert b"(www.example.com)" in _read_response(s)
    # keep-alive: the second request on the connection asks for another host; a body cannot hide one
    # (a body that IS a request is refused outright: test_net_hostile, desync)
    body = b'{"note": "GET /hidden HTTP/1.1\\r\\nHost: other.example.com"}'
    with net.connect(web, 80) as s:
        s.sendall(b"POST /first HTTP/1.1\r\nHost: www.example.com\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        assert _read_response(s).endswith(body)  # the lab echoes POST bodies
        s.sendall(b"GET /second HTTP/1.1\r\nHost: other.example.com\r\n\r\n")
        with pytest.raises(ConnectionResetError):
            s.recv(100)
    # an Upgrade the server declines (the lab's server ignores it): the next request is checked again
    with net.connect(web, 80) as s:
        s.sendall(b"GET /upgrade HTTP/1.1\r\nHost: www.example.com\r\nConnection: Upgrade\r\n"
                  b"Upgrade: websocket\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: other.example.com\r\n\r\n")
        with pytest.raises(ConnectionResetError):
            _read_response(s)
            s.recv(100)
    assert [r["path"] for r in lab.requests()] == ["/late-ok", "/first", "/upgrade"]
    reasons = [e["reason"] for e in net.tcp_entries() if e["verdict"] == "deny"]
    assert len(reasons) == 3 and all(r.startswith("host-mismatch") for r in reasons), reasons


def test_ip_literals_to_private_metadata_and_the_host_are_reset_even_with_public(net, lab):
    net.update(allow=["*"])
    assert b"hello from 203.0.113.10" in net.http_get(netlab.WEB_V4, 80, netlab.WEB_V4)  # public: granted
    for address in (netlab.PRIVATE_V4, netlab.METADATA_V4, netlab.LAB_V4, netlab.PRIVATE_V6, "127.0.0.1"):
        net.assert_reset(address, 80, f"GET / HTTP/1.1\r\nHost: {address}\r\n\r\n".encode())
    net.assert_reset("::ffff:169.254.169.254", 80, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert [r["server"] for r in lab.requests()] == [netlab.WEB_V4]
    # only an explicit IP rule opens a private address
    net.update(allow=[f"{netlab.PRIVATE_V4}:80"])
    assert b"hello from 10.0.0.5" in net.http_get(netlab.PRIVATE_V4, 80, netlab.PRIVATE_V4)


def test_the_real_address_is_checked_again_when_dialled(net, lab):
    """A name whose real address is private passes DNS only while an IP rule covers that address; when
    the rule goes, dialling its synthetic address is refused even though the name rule stays."""
    net.update(allow=["private.example.com", "10.0.0.0/8:80"])
    address, = net.resolve("private.example.com")
    net.update(allow=["private.example.com"])
    net.assert_reset(address, 80, b"GET / HTTP/1.1\r\nHost: private.example.com\r\n\r\n")
    entry = net.tcp_entries()[-1]
    assert (entry["name"], entry["address"], entry["verdict"]) == ("private.example.com", netlab.PRIVATE_V4, "deny")
    assert entry["reason"].startswith("special address") and not lab.requests()


def test_the_broker_port_dialled_directly_is_refused(net):
    net.update(allow=["*"])
    net.assert_reset("127.0.0.1", netns.BROKER_PORT, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")


# -- live changes, log, counters --------------------------------------------------------------------------------

def test_update_revoking_a_name_cuts_its_open_stream_and_keeps_others(net, lab):
    net.update(allow=[f"echo.example.com:{netlab.ECHO_PORT}", "www.example.com"])
    echo, = net.resolve("echo.example.com")
    web, = net.resolve("www.example.com")
    cut = net.connect(echo, netlab.ECHO_PORT)
    kept = net.connect(web, 80)
    with cut, kept:
        cut.sendall(b"before")
        assert cut.recv(100) == b"before"
        kept.sendall(b"GET / HTTP/1.1\r\nHost: www.example.com\r\n\r\n")
        assert b"200 OK" in _read_response(kept)

        revoked = net.update(allow=["www.example.com"])
        assert [(e["name"], e["port"], e["verdict"]) for e in revoked] == [
            ("echo.example.com", netlab.ECHO_PORT, "revoked")]
        started = time.monotonic()
        with pytest.raises(ConnectionResetError):
            cut.sendall(b"after")
            cut.recv(100)
        assert time.monotonic() - started < 1.0
        kept.sendall(b"GET / HTTP/1.1\r\nHost: www.example.com\r\n\r\n")  # keep-alive: still open
        assert b"200 OK" in _read_response(kept)
    assert net.resolve("echo.example.com") == []
    assert [e["verdict"] for e in net.tcp_entries() if e["name"] == "echo.example.com"] == ["allow", "revoked"]


def test_bytes_spliced_over_tls_are_counted(net):
    net.update(allow=["www.example.com:443"])
    web, = net.resolve("www.example.com")
    body = net.https_get(web, "www.example.com", path="/bytes/3000000")
    assert len(body) > 3000000
    stats = net.stats()
    assert stats["allowed"] == 1 and stats["bytes_in"] > 3000000 and stats["bytes_out"] > 300  # hello + request


def test_counters_follow_every_decision_and_byte(net):
    net.update(allow=["www.example.com:80"])
    web, = net.resolve("www.example.com")
    body = net.http_get(web, 80, "www.example.com", "/bytes/100000")
    net.assert_reset(web, 443, sni="www.example.com")
    net.assert_reset(netlab.WEB_V4, 80, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    stats = net.stats()
    assert (stats["connections"], stats["allowed"], stats["denied"], stats["open"]) == (3, 1, 2, 0)
    assert stats["bytes_in"] == len(body) and len(body) > 100000
    assert stats["bytes_out"] == len(b"GET /bytes/100000 HTTP/1.1\r\nHost: www.example.com\r\nConnection: close\r\n\r\n")
    entries = net.tcp_entries()
    assert [e["verdict"] for e in entries] == ["allow", "deny", "deny"]
    for e in entries:
        assert set(e) >= {"time", "kind", "name", "address", "port", "verdict", "rule", "reason"}


# -- a real sandbox -----------------------------------------------------------------------------------------------

SANDBOX_CLIENT = r"""
import json, socket, ssl, subprocess, urllib.request
out = {}
context = ssl.create_default_context(cafile="/home/user/lab-ca.pem")
out["urllib"] = urllib.request.urlopen("https://www.example.com/from-sandbox", context=context, timeout=10).read().decode()
curl = subprocess.run(["curl", "-sS", "--max-time", "10", "--cacert", "/home/user/lab-ca.pem",
                       "https://www.example.com/curl-in-sandbox"], capture_output=True, text=True)
out["curl"] = [curl.returncode, curl.stdout, curl.stderr]
try:
    socket.getaddrinfo("api.example.com", 443)
    out["denied_name"] = "resolved"
except socket.gaierror as e:
    out["denied_name"] = "gaierror"
try:  # the reset may already be there when connect() returns, or come at the first read
    s = socket.create_connection(("10.0.0.5", 80), timeout=5)
    s.sendall(b"GET / HTTP/1.1\r\nHost: 10.0.0.5\r\n\r\n")
    out["private"] = repr(s.recv(100))
except ConnectionResetError:
    out["private"] = "reset"
print(json.dumps(out))
"""


@pytest.fixture
def sandbox_net(tier, sandbox, lab):
    """A real sandbox (process tier) whose namespace is configured and served by a broker in the lab."""
    from sandlot._net.dns import Upstream
    from sandlot._net.log import DecisionLog
    from sandlot._net.policy import NetworkPolicy

    from .test_net_netns import _host_pid1

    lab.clear_logs()
    pid1 = _host_pid1(sandbox.sandbox_id)
    netns.configure(pid1)
    listeners = netns.open_listeners(pid1)
    loop = LoopInNamespace(lab.ns_path)
    log = DecisionLog()
    try:
        async def start() -> Broker:
            broker = Broker(NetworkPolicy.build(None), log, Upstream([(netlab.DNS, 53)]))
            await broker.start(listeners)
            return broker

        broker = loop.run(start())
        try:
            sandbox.files.write("/home/user/lab-ca.pem", lab.ca_path.read_bytes())
            yield Net(lab, pid1, loop, broker, log)
        finally:
            loop.run(broker.close())
    finally:
        loop.close()
        listeners.close()


def _run_json(sandbox, code: str) -> dict:
    import json

    ex = sandbox.run_code(code)
    assert ex.error is None, ex.error
    return json.loads("".join(ex.logs.stdout))


@pytest.mark.tiers("process")
def test_code_in_a_real_sandbox_gets_exactly_the_granted_name(sandbox_net, sandbox, lab):
    """The whole path as a user's code meets it: the sandbox's own (empty) resolv.conf, urllib, curl."""
    net = sandbox_net
    net.update(allow=["www.example.com:443"])
    out = _run_json(sandbox, SANDBOX_CLIENT)
    assert "hello from 203.0.113.10 (www.example.com)" in out["urllib"]
    assert out["curl"][0] == 0 and "(www.example.com)" in out["curl"][1], out["curl"]
    assert out["denied_name"] == "gaierror" and out["private"] == "reset"
    assert [r["path"] for r in lab.requests()] == ["/from-sandbox", "/curl-in-sandbox"]
    assert not lab.queries(name="api.example.com")
    verdicts = [(e["kind"], e["name"] or e["address"], e["verdict"]) for e in net.entries()]
    assert ("dns", "api.example.com", "deny") in verdicts and ("tcp", "10.0.0.5", "deny") in verdicts


PIP_AND_GIT = r"""
import json, os, subprocess, sys
env = dict(os.environ, GIT_SSL_CAINFO="/home/user/lab-ca.pem",
           GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL="/dev/null")
pip = subprocess.run([sys.executable, "-m", "pip", "install", "--isolated", "--no-cache-dir",
                      "--cert", "/home/user/lab-ca.pem",
                      "--disable-pip-version-check", "--index-url", "https://pypi.org/simple/",
                      "--target", "/home/user/site", "--retries", "0", "--timeout", "10", "PKG"],
                     capture_output=True, text=True, env=env)
value = subprocess.run([sys.executable, "-c", "import MODULE; print(MODULE.VALUE)"], capture_output=True,
                       text=True, env=dict(env, PYTHONPATH="/home/user/site"))
git = subprocess.run(["git", "clone", "-q", "https://git.example.com/git/project.git", "/home/user/clone"],
                     capture_output=True, text=True, env=env, timeout=60)
print(json.dumps({"pip": [pip.returncode, pip.stderr[-800:] + pip.stdout[-1500:]], "value": value.stdout.strip(),
                  "git": [git.returncode, git.stderr[-300:]]}))
"""


@pytest.mark.tiers("process")
def test_pip_install_in_a_real_sandbox_with_exactly_pypi_granted(sandbox_net, sandbox, lab):
    """Issue #13's "done when": pypi.org + files.pythonhosted.org granted, pip install works, the rest
    (here a git clone) is refused and logged."""
    net = sandbox_net
    net.update(allow=["pypi.org", "files.pythonhosted.org"])
    code = PIP_AND_GIT.replace("PKG", netlab.WHEEL_PROJECT).replace("MODULE", netlab.WHEEL_MODULE)
    out = _run_json(sandbox, code)
    assert out["pip"][0] == 0, out["pip"][1]
    assert out["value"] == netlab.WHEEL_VALUE
    assert out["git"][0] != 0 and "git.example.com" in out["git"][1], out["git"]
    assert {r["host"] for r in lab.requests()} == {"pypi.org", "files.pythonhosted.org"}
    assert not lab.queries(name="git.example.com")
    tcp = [(e["name"], e["verdict"]) for e in net.tcp_entries()]
    assert ("pypi.org", "allow") in tcp and ("files.pythonhosted.org", "allow") in tcp
    assert ("git.example.com", "deny") in [(e["name"], e["verdict"]) for e in net.entries() if e["kind"] == "dns"]


def test_a_sandbox_cannot_hold_more_connections_than_its_limit(net, lab):
    net.update(allow=[f"echo.example.com:{netlab.ECHO_PORT}"])
    net.loop.call(setattr, net.broker, "max_connections", 2)
    echo, = net.resolve("echo.example.com")
    held = [net.connect(echo, netlab.ECHO_PORT) for _ in range(2)]
    try:
        for s in held:
            s.sendall(b"x")
            assert s.recv(1) == b"x"
        net.assert_reset(echo, netlab.ECHO_PORT, b"y")
        assert net.tcp_entries()[-1]["reason"].startswith("too many connections")
    finally:
        for s in held:
            s.close()


class _RelayInterceptor:
    """A real (if simple) interceptor: takes over the connections of one name and relays them through
    the broker's checked dial, as the secrets interceptor does for its hosts."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: list[tuple[bytes, str, int, list]] = []

    def wants(self, name: str, port: int) -> bool:
        return name == self.name

    async def handle(self, client, first, name, port, addresses, broker) -> None:
        import asyncio

        self.seen.append((first, name, port, addresses))
        reader, writer = client
        up_reader, up_writer, _ = await broker.open_upstream(addresses, port, name)
        up_writer.write(first)

        async def relay(src, dst):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
            dst.write_eof()

        try:
            await asyncio.gather(relay(reader, up_writer), relay(up_reader, writer))
        finally:
            up_writer.close()


def test_an_interceptor_takes_over_its_names_and_is_cut_on_revoke(net, lab):
    interceptor = _RelayInterceptor("www.example.com")
    net.loop.call(setattr, net.broker, "interceptor", interceptor)
    net.update(allow=["www.example.com:80", "api.example.com:80"])
    web, = net.resolve("www.example.com")
    api, = net.resolve("api.example.com")
    assert b"(api.example.com)" in net.http_get(api, 80, "api.example.com")  # not its name: spliced as usual
    with net.connect(web, 80) as s:
        s.sendall(b"GET /via-interceptor HTTP/1.1\r\nHost: www.example.com\r\n\r\n")
        assert b"(www.example.com)" in _read_response(s)
        first, name, port, addresses = interceptor.seen[0]
        assert first.startswith(b"GET /via-interceptor") and (name, port) == ("www.example.com", 80)
        assert addresses == [netlab.WEB_V4]  # the real addresses (of the A answer), for its checked dial
        assert [e["reason"] for e in net.tcp_entries() if e["name"] == "www.example.com"] == ["intercepted"]
        revoked = net.update(allow=["api.example.com:80"])
        assert [(e["name"], e["verdict"]) for e in revoked] == [("www.example.com", "revoked")]
        with pytest.raises(ConnectionResetError):
            s.sendall(b"GET /after HTTP/1.1\r\nHost: www.example.com\r\n\r\n")
            s.recv(100)
    assert [r["path"] for r in lab.requests()] == ["/", "/via-interceptor"]
