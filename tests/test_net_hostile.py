"""Hostile review of the network: what untrusted code inside a sandbox with a NARROW grant can try.

Each test states a hole it once proved (the test failed before the fix named in it) and runs real
sandboxes through the public SDK inside the fake internet (tests/netlab.py), like test_network.py.
"""

from __future__ import annotations

import json
import textwrap

from sandlot._net import peek
from sandlot._net.dns import SyntheticAddresses

from . import netlab
from .conftest import needs_sandbox
from .test_network import drive

lab = netlab.lab_fixture()

# Raw HTTP/1 requests for ANOTHER host sent on a connection dialled to www.example.com. Lenient servers
# (Python's http.server here; nginx, Node and Go accept some of these too) read them as requests for
# other.example.com, so each must be refused by the broker's Host check, never spliced unchecked.
SMUGGLED = {
    "version_1_2": b"GET / HTTP/1.2\r\nHost: other.example.com\r\nConnection: close\r\n\r\n",
    "two_spaces": b"GET  / HTTP/1.1\r\nHost: other.example.com\r\nConnection: close\r\n\r\n",
    "tabs": b"GET\t/\tHTTP/1.1\r\nHost: other.example.com\r\nConnection: close\r\n\r\n",
    "bare_lf_long_head": (b"GET / HTTP/1.1\nHost: other.example.com\nConnection: close\nX-Pad: " + b"a" * 9000
                          + b"\n\n"),
    "trailing_space": b"GET / HTTP/1.1 \r\nHost: other.example.com\r\nConnection: close\r\n\r\n",
}


CONTROL = b"GET / HTTP/1.1\r\nHost: www.example.com\r\nConnection: close\r\n\r\n"
RAW = """
import socket
def raw(payload, host="www.example.com"):
    data = b""
    try:
        s = socket.create_connection((host, 80), timeout=10)
        s.sendall(payload)
        while b"hello from" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        s.close()
    except OSError as exc:
        data += repr(exc).encode()
    return data.decode("latin-1")
"""


@needs_sandbox
def test_a_non_canonical_request_line_cannot_carry_a_request_for_another_host(lab):
    """Hole: peek.looks_like_http() decided "HTTP or not" with one strict regex (single spaces, HTTP/1.0
    or 1.1, CRLF within 8 KiB); anything else was "other" and spliced UNCHECKED to the allowed name's
    server, which happily served Host: other.example.com (a shared-address / CDN bypass of the policy).
    Fix: anything that looks like an HTTP request to a lenient server is HTTP, and refused unless it is
    a request line the broker can check."""
    lab.clear_logs()
    payloads = {k: v.hex() for k, v in SMUGGLED.items()}
    out = drive(lab, f"""
        PAYLOADS = {payloads!r}
        with sandlot.Sandbox(network={{"allow": ["www.example.com"]}}) as sb:
            sb.run_code({RAW!r})
            out["control"] = sb.run_code("raw(bytes.fromhex({CONTROL.hex()!r}))").text
            for key, hexed in PAYLOADS.items():
                out[key] = sb.run_code(f"raw(bytes.fromhex({{hexed!r}}))").text
    """)
    assert "hello from 203.0.113.10 (www.example.com)" in out["control"], out["control"]
    leaked = {k: out[k] for k in SMUGGLED if "hello from" in out[k]}
    assert not leaked, leaked
    assert lab.requests(host="other.example.com") == []


def test_first_bytes_that_a_lenient_server_reads_as_http_are_never_other():
    """The same hole at the unit level, with forms the lab's server does not accept but others do
    (nginx skips empty lines before a request line)."""
    for payload in [*SMUGGLED.values(), b"\r\nGET / HTTP/1.1\r\nHost: other.example.com\r\n\r\n",
                    b"\nGET / HTTP/1.1\nHost: other.example.com\n\n"]:
        try:
            seen = peek.classify(payload)
        except peek.NeedMore:
            continue  # waiting for more is safe: the broker refuses an incomplete head in time
        assert seen.protocol == "http" and (seen.problem or seen.host == "other.example.com"), (payload[:40], seen)
    # line-based protocols whose first word is upper case stay "other" (SMTP, Redis)
    assert peek.classify(b"EHLO client.example\r\n").protocol == "other"
    assert peek.classify(b"PING\r\n").protocol == "other"
    assert peek.classify(b"GET / HTTP/1.1\r\nHost: www.example.com\r\n\r\n").host == "www.example.com"


@needs_sandbox
def test_dns_over_tcp_cannot_pile_up_host_file_descriptors(lab):
    """Hole: the DNS responder accepted DNS-over-TCP connections without bound (each idle up to 10 s,
    kept forever by a query every few seconds). The responder lives in the HOST process (the SDK's, or
    the server's shared by every tenant): a sandbox with a one-name grant opened thousands of
    connections to 127.0.0.1:53 and held as many of the host's file descriptors. Fix: at most
    dns.MAX_TCP_CLIENTS at once per sandbox; more are closed at once."""
    flood = textwrap.dedent("""
        import os, socket, sys, time
        held = []
        for _ in range(900):
            s = socket.socket()
            s.settimeout(5)
            try:
                s.connect(("127.0.0.1", 53))
            except OSError:
                pass
            held.append(s)
        print("held", flush=True)
        time.sleep(8)
    """)
    out = drive(lab, f"""
        import os
        def fds():
            return len(os.listdir("/proc/self/fd"))
        with sandlot.Sandbox(network={{"allow": ["www.example.com"]}}) as sb:
            sb.files.write("/home/user/flood.py", {flood!r})
            out["before"] = fds()
            runs = [sb.commands.run("python3 /home/user/flood.py", background=True) for _ in range(3)]
            deadline = time.time() + 30
            while sum("held" in r.stdout for r in runs) < 3 and time.time() < deadline:
                time.sleep(0.2)
            out["held"] = sum("held" in r.stdout for r in runs)
            time.sleep(0.5)
            out["during"] = fds()
            for r in runs:
                r.wait()
            out["dns_works"] = sb.commands.run(
                "python3 -c 'import socket; print(socket.gethostbyname(\\"www.example.com\\"))'").stdout.strip()
    """)
    assert out["held"] == 3, out
    grown = out["during"] - out["before"]
    assert grown < 400, f"the host process holds {grown} more file descriptors for one sandbox's DNS clients"
    assert out["dns_works"].startswith("198.18."), out


def test_the_synthetic_table_has_a_bound_in_both_families():
    """Hole: the v6 synthetic range (100::/64) never runs out, so a sandbox allowed "*.example.com" (or
    "public") that resolved ever new names grew the host process's memory without bound (the v4 table
    stops at 131,070 names, the v6 one never). Fix: at most dns.MAX_NAMES names per family; the least
    recently resolved is forgotten (and its address reused), as the v4 range already did."""
    from sandlot._net import dns

    table = SyntheticAddresses()
    first = table.assign("n0.example.com", ["2001:db8::10"])
    bound = getattr(dns, "MAX_NAMES", 65536)
    for i in range(1, bound + 10):
        table.assign(f"n{i}.example.com", ["2001:db8::10"])
    assert len(table.names()) <= bound
    assert len(table._reals) <= bound  # nothing of a forgotten name stays behind
    assert table.lookup(first) is None or table.lookup(first)[0] != "n0.example.com"
    latest = table.assign("latest.example.com", ["2001:db8::10"])
    assert table.lookup(latest)[0] == "latest.example.com"
    assert json.dumps(table.names()["latest.example.com"])  # still a plain snapshot


def _with_body(method: bytes) -> bytes:
    inner = b"GET / HTTP/1.1\r\nHost: other.example.com\r\n\r\n"
    return (method + b" / HTTP/1.1\r\nHost: www.example.com\r\nContent-Length: " + str(len(inner)).encode()
            + b"\r\n\r\n" + inner)


@needs_sandbox
def test_a_request_body_cannot_smuggle_a_request_for_another_host(lab):
    """Hole (desync): every plaintext request is checked by h11, whose framing is the standard's; a server
    that does not read a request's body (Python's http.server on GET, or on a method it does not
    implement: 501 and keep-alive) reads that body as the NEXT request, unchecked: here one for
    other.example.com through www.example.com's server."""
    lab.clear_logs()
    out = drive(lab, f"""
        with sandlot.Sandbox(network={{"allow": ["www.example.com"]}}) as sb:
            sb.run_code({RAW!r})
            for key, payload in {{"get": {_with_body(b"GET").hex()!r}, "patch": {_with_body(b"PATCH").hex()!r}}}.items():
                out[key] = sb.run_code(f"raw(bytes.fromhex({{payload!r}}))").text
    """)
    assert lab.requests(host="other.example.com") == [], (out, lab.requests())


def test_a_body_or_ambiguous_framing_is_refused_but_ordinary_bodies_pass():
    """Unit level of the desync hole, and the ordinary bodies that must still pass (JSON, forms, text)."""
    inner = b"GET / HTTP/1.1\r\nHost: other.example.com\r\n\r\n"
    cl_te = (b"POST / HTTP/1.1\r\nHost: www.example.com\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
             + f"{len(inner):x}\r\n".encode() + inner + b"\r\n0\r\n\r\n")
    for payload in (_with_body(b"GET"), _with_body(b"PATCH"), cl_te):
        forward, problem = peek.HttpRequests("www.example.com").feed(payload)
        assert problem and "desync" in problem and forward == b"", (payload[:30], problem)
    # the smuggled request split across writes is cut before its line is complete
    checker = peek.HttpRequests("www.example.com")
    head, body = _with_body(b"GET").split(b"\r\n\r\n", 1)
    assert checker.feed(head + b"\r\n\r\n" + body[:5]) [1] is None
    assert checker.feed(body[5:])[1]
    for body in (b'{"a": 1}', b"a=1&b=2", b"hello world\n", b"true", b"GET is a verb\n"):
        request = (b"POST / HTTP/1.1\r\nHost: www.example.com\r\nContent-Length: " + str(len(body)).encode()
                   + b"\r\n\r\n" + body)
        forward, problem = peek.HttpRequests("www.example.com").feed(request)
        assert problem is None and forward == request, (body, problem)


@needs_sandbox
def test_a_tenant_cannot_grant_itself_the_servers_private_network_or_metadata(lab, tmp_path):
    """Hole (server): special addresses (private, link-local, metadata, the host's own) open to an
    explicit IP/CIDR rule - which on a server the TENANT writes. With --allow-network, any tenant could
    reach the operator's private network and the cloud metadata endpoint (create body or PUT .../network).
    Fix: a server refuses rules that open special addresses unless its operator also gives
    --allow-private-network."""
    from .test_network import _server_drive

    lab.clear_logs()
    out = _server_drive(lab, tmp_path, """
        for rules in (["10.0.0.0/8"], ["169.254.169.254:80"], ["[::ffff:10.0.0.5]:80"], ["2002:a00:5::/48"]):
            try:
                with sandlot.Sandbox(network={"allow": rules}, api_url=url, api_key=key) as sb:
                    sb.run_code(FETCH)
                    out[rules[0]] = sb.run_code("fetch('http://10.0.0.5/') + fetch('http://169.254.169.254/')").text
            except sandlot.InvalidRequest as exc:
                out[rules[0]] = "refused: " + str(exc)
        with sandlot.Sandbox(network={"allow": ["www.example.com"]}, api_url=url, api_key=key) as sb:
            try:
                sb.network.update(allow=["www.example.com", "10.0.0.5"])
                sb.run_code(FETCH)
                out["update"] = sb.run_code("fetch('http://10.0.0.5/')").text
            except sandlot.InvalidRequest as exc:
                out["update"] = "refused: " + str(exc)
            out["policy"] = sb.network.update(allow=["www.example.com", "203.0.113.0/24:80"])
    """, "--allow-network")
    assert not lab.requests(server=netlab.PRIVATE_V4) and not lab.requests(server=netlab.METADATA_V4), out
    for key, value in out.items():
        if key != "policy":
            assert value.startswith("refused: ") and "--allow-private-network" in value, (key, value)
    assert out["policy"]["allow"] == ["www.example.com", "203.0.113.0/24:80"]  # public rules still fine


@needs_sandbox
def test_an_operator_can_still_give_tenants_the_private_network(lab, tmp_path):
    from .test_network import _server_drive

    lab.clear_logs()
    out = _server_drive(lab, tmp_path, """
        with sandlot.Sandbox(network={"allow": ["10.0.0.5:80"]}, api_url=url, api_key=key) as sb:
            sb.run_code(FETCH)
            out["private"] = sb.run_code("fetch('http://10.0.0.5/')").text
    """, "--allow-network --allow-private-network")
    assert "hello from 10.0.0.5" in out["private"], out


def test_which_rules_open_special_addresses():
    from sandlot._net.policy import NetworkPolicy

    policy = NetworkPolicy.build({"allow": ["*", "pypi.org", "0.0.0.0/0", "203.0.113.0/24", "10.0.0.0/8:443",
                                            "169.254.169.254", "[fd00::1]:80", "::ffff:192.168.1.1",
                                            "64:ff9b::a00:5", "203.0.113.1", "2001:db8::/32"]})
    assert policy.special_rules(["203.0.113.1"]) == ["10.0.0.0/8:443", "169.254.169.254", "[fd00::1]:80",
                                                     "192.168.1.1", "64:ff9b::a00:5", "203.0.113.1"]


def test_an_ipv4_translated_spelling_of_loopback_is_special():
    """Hole (small): ::ffff:0:a.b.c.d (IPv4-translated, RFC 2765 SIIT) was the one IPv4-embedding spelling
    not recognised, so an AAAA answer ::ffff:0:7f00:1 passed the rebinding check and "*" allowed it as a
    literal. A SIIT translator on the host's path would turn it into 127.0.0.1 or 10.x."""
    from sandlot._net.policy import NetworkPolicy, special_reason

    for text in ("::ffff:0:7f00:1", "::ffff:0:a00:5", "::ffff:0:a9fe:a9fe"):
        assert special_reason(text), text
        assert not NetworkPolicy.build("public").check_address(text, 80).allowed, text


def test_one_name_cannot_make_the_host_remember_thousands_of_addresses():
    """Hole (memory): the synthetic table kept EVERY address an upstream answer gave (a TCP answer can
    carry ~4,000 A records), times MAX_NAMES names: gigabytes of host memory for a sandbox allowed "*"
    resolving names of a zone its author controls. Fix: at most dns.MAX_REALS addresses per name and
    family (the broker dials the first that answers anyway)."""
    from sandlot._net import dns

    table = SyntheticAddresses()
    reals = [f"203.0.{i // 256}.{i % 256}" for i in range(4000)]
    synthetic = table.assign("many.example.com", reals)
    name, remembered = table.lookup(synthetic)
    assert name == "many.example.com" and 1 <= len(remembered) <= getattr(dns, "MAX_REALS", 64)
    assert remembered[0] == reals[0]


OTHER_REQUEST = b"GET / HTTP/1.1\r\nHost: other.example.com\r\nConnection: close\r\n\r\n"


@needs_sandbox
def test_a_denied_name_is_not_reached_by_its_ip_literal_under_a_wide_grant(lab):
    """Hole: with {"allow": ["*"], "deny": ["other.example.com"]} the name got NXDOMAIN, but its address
    dialled as a literal (known in advance, or from DoH to any allowed resolver) was "a public address",
    and a request naming other.example.com (Host, or TLS SNI as curl --resolve sends) went through.
    Fix (best effort, it cannot stop a client that names nothing): while a name deny rule exists, the
    first bytes of an IP-literal connection are read too, and a Host/SNI naming a denied name is refused."""
    lab.clear_logs()
    out = drive(lab, f"""
        with sandlot.Sandbox(network={{"allow": ["*"], "deny": ["other.example.com"]}}, env=LAB_TLS) as sb:
            trust_lab(sb)
            sb.run_code({RAW!r})
            out["name"] = sb.commands.run("curl -sS -m 5 http://other.example.com/").exit_code
            out["literal_http"] = sb.run_code(
                "raw(bytes.fromhex({OTHER_REQUEST.hex()!r}), {netlab.OTHER_V4!r})").text
            out["literal_tls"] = sb.commands.run(
                "curl -sS -m 5 --resolve other.example.com:443:{netlab.OTHER_V4} https://other.example.com/").stdout
            out["control"] = sb.commands.run("curl -sS -m 5 http://{netlab.WEB_V4}/").stdout
            out["log"] = [e["reason"] for e in sb.network.log() if e["kind"] == "tcp" and e["verdict"] == "deny"]
    """)
    assert out["name"] != 0
    assert "hello from" in out["control"], out
    assert "hello from" not in out["literal_tls"], out
    assert "hello from" not in out["literal_http"], out
    assert lab.requests(host="other.example.com") == [], out


TEMPLATE_SERVER = """
import subprocess
from sandlot.server.store import create_key
db = os.environ["LAB_DB"]
key = create_key("netlab", db)
port = int(os.environ["LAB_PORT"])
launcher = ("import dataclasses, sys\\n"
            "from sandlot._templates import get_template, register_transient\\n"
            "register_transient(dataclasses.replace(get_template('python'), name='netdefault', network='public'))\\n"
            "from sandlot.server.runner import main\\n"
            "sys.exit(main(sys.argv[1:]))\\n")
server = subprocess.Popen([sys.executable, "-c", launcher, "--port", str(port), "--db", db, "--log-level", "warning"])
import httpx
url = f"http://127.0.0.1:{port}"
for _ in range(600):
    try:
        if httpx.get(url + "/healthz", timeout=1).status_code == 200:
            break
    except httpx.HTTPError:
        time.sleep(0.05)
try:
    try:
        with sandlot.Sandbox(template="netdefault", api_url=url, api_key=key) as sb:
            sb.run_code(FETCH)
            out["web"] = sb.run_code("fetch('http://www.example.com/')").text
    except sandlot.InvalidRequest as exc:
        out["web"] = "refused: " + str(exc)
finally:
    server.terminate(); server.wait(30)
"""


@needs_sandbox
def test_a_templates_default_network_is_not_a_way_around_a_server_without_network(lab, tmp_path):
    """Hole (server): the operator did not give --allow-network, yet a sandbox of a template whose
    sandbox.yaml says `network: public` got the public internet (the engine applies the template's
    default after the server's check, which only looks at the body's `network`). Fix: the registry
    refuses such a template on a server without --allow-network, saying why."""
    from .serverproc import free_port

    lab.clear_logs()
    out = drive(lab, TEMPLATE_SERVER, env={"LAB_DB": str(tmp_path / "sandlot.db"), "LAB_PORT": str(free_port())})
    assert "hello from" not in out["web"] and not lab.requests(), out
    assert "--allow-network" in out["web"], out


@needs_sandbox
def test_a_tenant_cannot_read_or_change_another_tenants_network(lab, tmp_path):
    """Checked, no hole: PUT .../network and GET .../network/log of another tenant's sandbox are 404s."""
    from .test_network import _server_drive

    out = _server_drive(lab, tmp_path, """
        other = create_key("intruder", db)
        with sandlot.Sandbox(network={"allow": ["www.example.com"]}, api_url=url, api_key=key) as sb:
            sb.run_code(FETCH)
            sb.run_code("fetch('http://www.example.com/')")
            headers = {"Authorization": f"Bearer {other}"}
            base = f"{url}/v1/sandboxes/{sb.sandbox_id}/network"
            out["put"] = httpx.put(base, json={"allow": ["*"]}, headers=headers).status_code
            out["log"] = httpx.get(base + "/log", headers=headers).status_code
            out["after"] = sb.run_code("fetch('http://api.example.com/')").text  # still not granted
    """, "--allow-network")
    assert out["put"] == 404 and out["log"] == 404, out
    assert "hello from" not in out["after"], out


def test_an_upgrade_to_h2c_is_refused_like_h2c_prior_knowledge():
    """Hole (small): "PRI * HTTP/2.0" (h2c with prior knowledge) was refused as uncheckable, but the same
    protocol reached by "Upgrade: h2c" became opaque after the server's 101, and HTTP/2 streams may name
    any :authority (a server with several virtual hosts serves them all). Fix: an h2c upgrade is refused."""
    for upgrade in (b"h2c", b"H2C", b"websocket, h2c"):
        request = (b"GET / HTTP/1.1\r\nHost: www.example.com\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                   b"Upgrade: " + upgrade + b"\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n")
        forward, problem = peek.HttpRequests("www.example.com").feed(request)
        assert problem and "h2c" in problem and forward == b"", (upgrade, problem)
    websocket = (b"GET /ws HTTP/1.1\r\nHost: www.example.com\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    assert peek.HttpRequests("www.example.com").feed(websocket) == (websocket, None)


def test_every_spelling_of_a_special_address_is_refused_under_public():
    """Checked, no hole: the IPv6 spellings of loopback, private and metadata addresses (mapped, compat,
    NAT64, 6to4, Teredo), link-local, site-local, ULA, the synthetic ranges and the host's own address."""
    from sandlot._net.policy import NetworkPolicy

    public = NetworkPolicy.build("public")
    for text in ("127.0.0.1", "0.0.0.0", "::", "::1", "::ffff:127.0.0.1", "::127.0.0.1", "64:ff9b::7f00:1",
                 "2002:7f00:1::1", "2001:0:4136:e378:8000:63bf:f5ff:fffe", "::ffff:169.254.169.254",
                 "64:ff9b::a9fe:a9fe", "fd00:ec2::254", "100.100.100.200", "fe80::1%lo", "fec0::1", "fd00:5::5",
                 "64:ff9b:1::1", "198.18.0.1", "198.19.255.254", "100::1", "10.0.0.5", "100.64.0.1",
                 "224.0.0.1", "ff02::1", "255.255.255.255", "240.0.0.1", "203.0.113.1", "2001:db8:1::1",
                 "2002:cb00:7101::1"):
        verdict = public.check_address(text, 80, host_addresses=["203.0.113.1", "2001:db8:1::1"])
        assert not verdict.allowed, (text, verdict)
    assert public.check_address("203.0.113.10", 80).allowed
