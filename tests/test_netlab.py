"""The fake internet itself (tests/netlab.py): from inside the lab namespace, names resolve through the lab's
resolver, HTTP and HTTPS (verified against the test CA) reach v4 and v6 hosts, the internet records what it
saw, and nothing outside the lab is routable. Network tests build on these facts."""

from __future__ import annotations

import json
import os
import sys

import pytest

from tests import netlab
from tests.conftest import needs_sandbox
from tests.netlab import Lab

LAB_PROBLEM = netlab.skip_reason()
pytestmark = [needs_sandbox, pytest.mark.skipif(LAB_PROBLEM is not None, reason=str(LAB_PROBLEM))]


@pytest.fixture(scope="module")
def lab():
    with Lab(records={"added.example.com": [netlab.OTHER_V4]}) as built:
        yield built


@pytest.fixture(autouse=True)
def fresh_logs(lab):
    lab.clear_logs()


def _driver_json(lab: Lab, code: str, **kwargs) -> object:
    """Run a driver whose last stdout line is JSON; return it."""
    done = lab.python(code, **kwargs)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_names_resolve_through_the_lab_resolver(lab):
    answers = _driver_json(lab, """
import json, socket
from dnslib import DNSRecord
def ask(name, qtype, server):
    reply = DNSRecord.parse(DNSRecord.question(name, qtype).send(server, 53, timeout=5))
    return sorted(str(rr.rdata) for rr in reply.rr)
out = {
    "www_a": ask("www.example.com", "A", "192.0.2.53"),
    "www_aaaa": ask("www.example.com", "AAAA", "192.0.2.53"),
    "added": ask("added.example.com", "A", "192.0.2.53"),
    "second": ask("api.example.com", "A", "198.51.100.53"),
    # the C library's resolver (getaddrinfo) through the lab's resolv.conf
    "gai": sorted({ai[4][0] for ai in socket.getaddrinfo("www.example.com", 80, proto=socket.IPPROTO_TCP)}),
}
print(json.dumps(out))
""", resolv=True)
    assert answers["www_a"] == [netlab.WEB_V4]
    assert answers["www_aaaa"] == [netlab.WEB_V6]
    assert answers["added"] == [netlab.OTHER_V4]  # records the test gives
    assert answers["second"] == [netlab.API_V4]
    assert answers["gai"] == sorted([netlab.WEB_V4, netlab.WEB_V6])
    seen = {(q["server"], q["name"], q["qtype"]) for q in lab.queries()}
    assert (netlab.DNS, "www.example.com", "A") in seen
    assert (netlab.DNS, "www.example.com", "AAAA") in seen
    assert (netlab.DNS2, "api.example.com", "A") in seen
    assert all(q["client"] == netlab.LAB_V4 for q in lab.queries())


def test_unknown_names_are_nxdomain_and_recorded(lab):
    rcode = _driver_json(lab, """
import json
from dnslib import DNSRecord, RCODE
reply = DNSRecord.parse(DNSRecord.question("nothing-here.example.com", "A").send("192.0.2.53", 53, timeout=5))
print(json.dumps(RCODE.get(reply.header.rcode)))
""")
    assert rcode == "NXDOMAIN"
    assert lab.queries(name="nothing-here.example.com", server=netlab.DNS)


def test_records_change_live(lab):
    code = """
import json
from dnslib import DNSRecord
reply = DNSRecord.parse(DNSRecord.question("live.example.com", "A").send("192.0.2.53", 53, timeout=5))
print(json.dumps([str(rr.rdata) for rr in reply.rr]))
"""
    lab.set_record("live.example.com", [netlab.API_V4])
    try:
        assert _driver_json(lab, code) == [netlab.API_V4]
        lab.set_record("live.example.com", [netlab.WEB_V4])
        assert _driver_json(lab, code) == [netlab.WEB_V4]
    finally:
        lab.set_record("live.example.com", None)
    assert _driver_json(lab, code) == []


def test_truncated_udp_answer_is_complete_over_tcp(lab):
    out = _driver_json(lab, """
import json
from dnslib import DNSRecord
q = DNSRecord.question("truncated.example.com", "A")
udp = DNSRecord.parse(q.send("192.0.2.53", 53, timeout=5))
tcp = DNSRecord.parse(q.send("192.0.2.53", 53, tcp=True, timeout=5))
print(json.dumps({"udp_tc": udp.header.tc, "udp": len(udp.rr), "tcp_tc": tcp.header.tc,
                  "tcp": [str(rr.rdata) for rr in tcp.rr]}))
""")
    assert out == {"udp_tc": 1, "udp": 0, "tcp_tc": 0, "tcp": [netlab.WEB_V4]}
    assert {q["proto"] for q in lab.queries(name="truncated.example.com")} == {"udp", "tcp"}


def test_http_and_https_reach_v4_and_v6_hosts_verified_by_the_test_ca(lab):
    bodies = _driver_json(lab, f"""
import json, ssl, urllib.request
ctx = ssl.create_default_context(cafile={str(lab.ca_path)!r})  # the test CA, nothing else
def get(url):
    return urllib.request.urlopen(url, timeout=10, context=ctx).read().decode()
print(json.dumps([get("http://other.example.com/a"), get("https://other.example.com/b"),
                  get("http://[{netlab.WEB_V6}]/c"), get("https://[{netlab.WEB_V6}]/d"),
                  get("https://v6only.example.com/e"), get("https://{netlab.API_V4}/f")]))
""", resolv=True)
    assert bodies[0].startswith(f"hello from {netlab.OTHER_V4} (other.example.com)")
    assert bodies[1].startswith(f"hello from {netlab.OTHER_V4} (other.example.com)")
    assert bodies[2].startswith(f"hello from {netlab.WEB_V6}")
    assert bodies[3].startswith(f"hello from {netlab.WEB_V6}")
    assert bodies[4].startswith(f"hello from {netlab.V6ONLY} (v6only.example.com)")
    assert bodies[5].startswith(f"hello from {netlab.API_V4}")
    seen = {(r["scheme"], r["server"], r["path"], r["sni"]) for r in lab.requests()}
    assert seen == {("http", netlab.OTHER_V4, "/a", None), ("https", netlab.OTHER_V4, "/b", "other.example.com"),
                    ("http", netlab.WEB_V6, "/c", None), ("https", netlab.WEB_V6, "/d", None),
                    ("https", netlab.V6ONLY, "/e", "v6only.example.com"), ("https", netlab.API_V4, "/f", None)}
    assert all(r["client"] in (netlab.LAB_V4, netlab.LAB_V6) for r in lab.requests())


def test_https_is_refused_without_the_test_ca(lab):
    """Verification is real: the system's trust store does not know the lab's CA."""
    out = lab.python("""
import ssl, urllib.request
try:
    urllib.request.urlopen("https://203.0.113.10/", timeout=10, context=ssl.create_default_context(cafile=None,
                           cadata=None, capath="/nonexistent"))
except Exception as exc:
    print("refused", type(exc).__name__, exc)
else:
    print("accepted")
""", env={"SSL_CERT_FILE": "/nonexistent"})
    assert out.stdout.startswith("refused") and "CERTIFICATE_VERIFY_FAILED" in out.stdout


def test_curl_in_the_lab_trusts_the_test_ca(lab):
    done = lab.run(["curl", "-sS", "--max-time", "10", "https://api.example.com/curl"], resolv=True)
    assert done.stdout.split()[2] in (netlab.API_V4, netlab.API_V6) and "(api.example.com)" in done.stdout
    assert lab.requests(path="/curl")[0]["sni"] == "api.example.com"


def test_private_and_metadata_hosts_are_reachable_from_the_lab(lab):
    """So that a test proving a policy refuses them proves the policy, not the lab."""
    bodies = _driver_json(lab, f"""
import json, urllib.request
print(json.dumps([urllib.request.urlopen(u, timeout=10).read().decode() for u in
                  ("http://{netlab.PRIVATE_V4}/", "http://[{netlab.PRIVATE_V6}]/", "http://{netlab.METADATA_V4}/")]))
""")
    assert [b.split()[2] for b in bodies] == [netlab.PRIVATE_V4, netlab.PRIVATE_V6, netlab.METADATA_V4]


def test_udp_and_tcp_echo_and_the_banner(lab):
    out = _driver_json(lab, f"""
import json, socket
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(5)
u.sendto(b"ping", ("{netlab.ECHO_V4}", {netlab.ECHO_PORT}))
echoed = u.recv(100).decode()
t = socket.create_connection(("{netlab.ECHO_V6}", {netlab.ECHO_PORT}), timeout=5); t.sendall(b"hello")
tcp = t.recv(100).decode()
b = socket.create_connection(("{netlab.ECHO_V4}", {netlab.BANNER_PORT}), timeout=5)
print(json.dumps([echoed, tcp, b.recv(100).decode()]))
""")
    assert out == ["ping", "hello", netlab.BANNER.decode()]
    assert [p["data"] for p in lab.udp_packets(server=netlab.ECHO_V4)] == [b"ping"]


def test_the_lab_has_no_route_out_of_the_machine(lab):
    routes = lab.run(["ip", "-j", "route", "show", "table", "all"]).stdout
    table = json.loads(routes)
    assert not [r for r in table if r["dst"] == "default"], "the lab must have no default route"
    expected = set(netlab.INTERNET_HOSTS) | {netlab.GATEWAY_V4, netlab.GATEWAY_V6, netlab.LAB_V4, netlab.LAB_V6,
                                             "fe80::/64", "fe80::", "ff00::/8", "multicast"}
    for route in table:
        dst = route["dst"].split("/")[0] if route["dst"] not in ("fe80::/64", "ff00::/8") else route["dst"]
        if route.get("dev") == "lo" or dst.startswith("127.") or dst == "::1":
            continue  # loopback's own routes
        assert dst in expected, f"unexpected route in the lab: {route}"
    out = _driver_json(lab, f"""
import errno, json, socket
def dial(address):
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM); s.settimeout(5)
    try:
        s.connect((address, 80))
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc))
    return "connected"
print(json.dumps([dial("{netlab.NOT_IN_LAB_V4}"), dial("{netlab.NOT_IN_LAB_V6}")]))
""")
    assert out == ["ENETUNREACH", "ENETUNREACH"]
    assert lab.run(["ip", "route", "get", netlab.NOT_IN_LAB_V4], check=False).returncode != 0


def test_the_lab_is_not_the_hosts_namespace(lab):
    assert os.stat(lab.ns_path).st_ino != os.stat("/proc/self/ns/net").st_ino
    assert os.stat(lab.internet_ns_path).st_ino != os.stat("/proc/self/ns/net").st_ino


def test_closing_the_lab_leaves_nothing_behind():
    with Lab() as temporary:
        pids = [ns.pid for ns in temporary._namespaces] + [temporary._cable.pid]
        stray = temporary.popen(["sleep", "600"])
        directory = temporary.dir
    stray.wait(timeout=5)
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}"), f"process {pid} outlived the lab"
    assert not directory.exists()


def test_pip_installs_the_wheel_from_the_lab_index(lab, tmp_path):
    target = tmp_path / "site"
    lab.run([sys.executable, "-m", "pip", "install", "--isolated",
             "--cert", str(lab.ca_path), "--index-url", "https://pypi.org/simple/", "--target", str(target),
             "--no-cache-dir", "--disable-pip-version-check", netlab.WHEEL_PROJECT], resolv=True, timeout=180)
    value = lab.python(f"import {netlab.WHEEL_MODULE} as m; print(m.VALUE)",
                       env={"PYTHONPATH": str(target)}).stdout.strip()
    assert value == netlab.WHEEL_VALUE
    fetched = [(r["host"], r["path"]) for r in lab.requests()]
    assert ("pypi.org", f"/simple/{netlab.WHEEL_PROJECT}/") in fetched
    assert ("files.pythonhosted.org", f"/packages/{lab.wheel_path.name}") in fetched


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_git_clones_the_lab_repository(lab, tmp_path, scheme):
    clone = tmp_path / "clone"
    lab.run(["git", "clone", "-q", f"{scheme}://git.example.com{netlab.GIT_REPO_PATH}", str(clone)], resolv=True,
            env={"GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1"})
    assert (clone / netlab.GIT_FILE).read_text() == netlab.GIT_CONTENT
    assert lab.requests(host="git.example.com", scheme=scheme)
