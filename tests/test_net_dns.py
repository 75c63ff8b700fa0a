"""The sandbox's DNS (sandlot/_net/dns.py). The responder runs in a driver inside the network lab
(tests/netlab.py) with the lab's resolver 192.0.2.53 as its upstream, so "never forwarded" is checked
against what that resolver actually received."""

from __future__ import annotations

import ipaddress
import json
import textwrap

import pytest

from sandlot import InvalidRequest
from sandlot._net.dns import SyntheticAddresses, Upstream, upstream_from_env
from tests import netlab
from tests.conftest import needs_sandbox
from tests.netlab import Lab

LAB_PROBLEM = netlab.skip_reason()
in_lab = [needs_sandbox, pytest.mark.skipif(LAB_PROBLEM is not None, reason=str(LAB_PROBLEM))]

SYNTHETIC_V4 = ipaddress.ip_network("198.18.0.0/15")
SYNTHETIC_V6 = ipaddress.ip_network("100::/64")

# The driver: a responder on 127.0.0.1 (UDP and TCP) in the lab, then the test's scenario in a thread.
# scenario(ask, raw_udp, raw_tcp, set_policy) returns something JSON; the driver prints it with the
# decision log and the synthetic table.
DRIVER = '''
import asyncio, json, socket
from dnslib import DNSRecord, RCODE, QTYPE
from sandlot._net.dns import DnsResponder, SyntheticAddresses, upstream_from_env
from sandlot._net.log import DecisionLog
from sandlot._net.policy import NetworkPolicy

state = {"policy": NetworkPolicy.build(POLICY)}

def client(port):
    def ask(name, qtype="A", tcp=False):
        q = DNSRecord.question(name, qtype)
        reply = DNSRecord.parse(q.send("127.0.0.1", port, tcp=tcp, timeout=10))
        return {"rcode": RCODE.get(reply.header.rcode), "tc": reply.header.tc, "id_ok": reply.header.id == q.header.id,
                "answers": [[QTYPE.get(rr.rtype), str(rr.rdata), rr.ttl] for rr in reply.rr]}
    def raw_udp(data, wait=1.0):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(wait)
        s.sendto(data, ("127.0.0.1", port))
        try:
            return s.recv(4096).hex()
        except socket.timeout:
            return None
    def raw_tcp(data, wait=2.0):
        s = socket.create_connection(("127.0.0.1", port), timeout=wait)
        s.sendall(data)
        try:
            return s.recv(4096).hex()
        except socket.timeout:
            return "timeout"
    return ask, raw_udp, raw_tcp

SCENARIO

async def main():
    log, synthetic = DecisionLog(), SyntheticAddresses()
    responder = DnsResponder(lambda: state["policy"], upstream_from_env(), synthetic, log)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); udp.bind(("127.0.0.1", 0))
    port = udp.getsockname()[1]
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM); tcp.bind(("127.0.0.1", port)); tcp.listen(16)
    tasks = [asyncio.ensure_future(responder.serve_udp(udp)), asyncio.ensure_future(responder.serve_tcp(tcp))]
    ask, raw_udp, raw_tcp = client(port)
    def set_policy(value):
        state["policy"] = NetworkPolicy.build(value)
    out = await asyncio.to_thread(scenario, ask, raw_udp, raw_tcp, set_policy)
    alive = all(not t.done() for t in tasks)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps({"out": out, "log": log.entries(), "table": synthetic.names(), "alive": alive}))

asyncio.run(main())
'''


@pytest.fixture(scope="module")
def lab():
    if LAB_PROBLEM:
        pytest.skip(LAB_PROBLEM)
    with Lab() as built:
        yield built


def respond(lab: Lab, policy, scenario: str) -> dict:
    """Run the responder under policy in the lab; scenario is the body of scenario(ask, raw_udp, raw_tcp,
    set_policy)."""
    lab.clear_logs()
    body = "def scenario(ask, raw_udp, raw_tcp, set_policy):\n" + textwrap.indent(textwrap.dedent(scenario), "    ")
    code = DRIVER.replace("POLICY", repr(policy), 1).replace("SCENARIO", body, 1)
    done = lab.python(code, timeout=120)
    return json.loads(done.stdout.strip().splitlines()[-1])


def synthetic_of(answer: dict) -> list[str]:
    return [a[1] for a in answer["answers"]]


class TestInTheLab:
    pytestmark = in_lab

    def test_an_allowed_name_gets_a_synthetic_address_that_maps_back(self, lab):
        result = respond(lab, {"allow": ["www.example.com"]}, """
            return {"a": ask("www.example.com", "A"), "aaaa": ask("WWW.Example.COM.", "AAAA"),
                    "again": ask("www.example.com", "A")}
        """)
        a, aaaa, again = result["out"]["a"], result["out"]["aaaa"], result["out"]["again"]
        assert a["rcode"] == "NOERROR" and a["id_ok"]
        [(qtype, v4, ttl)] = a["answers"]
        assert qtype == "A" and ipaddress.ip_address(v4) in SYNTHETIC_V4 and ttl == 30
        [(qtype6, v6, _)] = aaaa["answers"]
        assert qtype6 == "AAAA" and ipaddress.ip_address(v6) in SYNTHETIC_V6
        assert synthetic_of(again) == [v4]  # stable for the name
        assert result["table"]["www.example.com"] == {"v4": v4, "v6": v6, "reals": [netlab.WEB_V4, netlab.WEB_V6]}
        asked = {(q["name"], q["qtype"]) for q in lab.queries(server=netlab.DNS)}
        assert {("www.example.com", "A"), ("www.example.com", "AAAA")} <= asked
        allowed = [e for e in result["log"] if e["verdict"] == "allow"]
        assert allowed and all(e["kind"] == "dns" and e["rule"] == "www.example.com" for e in allowed)
        assert allowed[0]["address"] == netlab.WEB_V4

    def test_a_name_not_allowed_is_nxdomain_and_never_reaches_upstream(self, lab):
        result = respond(lab, {"allow": ["www.example.com"]}, """
            return [ask("api.example.com", "A"), ask("api.example.com", "AAAA", tcp=True), ask("www.example.com")]
        """)
        denied_a, denied_aaaa, allowed = result["out"]
        assert denied_a["rcode"] == denied_aaaa["rcode"] == "NXDOMAIN"
        assert denied_a["answers"] == []
        assert not lab.queries(name="api.example.com")  # the resolver never saw it
        assert lab.queries(name="www.example.com")      # while it did see the allowed one
        assert allowed["rcode"] == "NOERROR"
        denied = [e for e in result["log"] if e["name"] == "api.example.com"]
        assert denied and all(e["verdict"] == "deny" and "never forwarded" in e["reason"] for e in denied)

    def test_tunnelling_through_random_labels_never_reaches_upstream(self, lab):
        result = respond(lab, {"allow": ["*.example.com"], "deny": ["*.tunnel.example.com"]}, """
            import secrets
            answers = []
            for i in range(40):
                label = secrets.token_hex(20)
                answers.append(ask(f"{label}.tunnel.example.com", ["A", "AAAA", "TXT", "MX"][i % 4], tcp=i % 5 == 0))
                answers.append(ask(f"{label}.elsewhere.test", "A"))
            return [a["rcode"] for a in answers] + [ask("www.example.com")["rcode"]]
        """)
        assert set(result["out"][:-1]) == {"NXDOMAIN"} and result["out"][-1] == "NOERROR"
        names = [q["name"] for q in lab.queries()]
        assert not [n for n in names if n.endswith("tunnel.example.com") or n.endswith("elsewhere.test")]
        assert "www.example.com" in names  # the control: allowed names do travel

    @pytest.mark.parametrize("name, qtype, real", [
        ("loopback.example.com", "A", "127.0.0.1"),
        ("private.example.com", "A", netlab.PRIVATE_V4),
        ("metadata.example.com", "A", netlab.METADATA_V4),
        ("loopback6.example.com", "AAAA", "::1"),
        ("mapped.example.com", "AAAA", "::ffff:127.0.0.1"),
        ("private6.example.com", "AAAA", netlab.PRIVATE_V6),
        ("mixed.example.com", "A", netlab.PRIVATE_V4),  # one public answer does not launder a private one
    ])
    def test_rebinding_to_special_addresses_is_refused(self, lab, name, qtype, real):
        result = respond(lab, {"allow": ["*.example.com"]}, f"""
            return ask({name!r}, {qtype!r})
        """)
        assert result["out"]["rcode"] == "NXDOMAIN" and result["out"]["answers"] == []
        assert lab.queries(name=name, qtype=qtype)  # it was resolved upstream, then refused
        [entry] = [e for e in result["log"] if e["name"] == name]
        assert entry["verdict"] == "deny" and entry["reason"].startswith("rebinding")
        assert ipaddress.ip_address(entry["address"]) == ipaddress.ip_address(real)
        assert name not in result["table"]

    def test_the_lab_hosts_own_address_is_refused_as_an_answer(self, lab):
        lab.set_record("self.example.com", [netlab.LAB_V4])
        try:
            result = respond(lab, {"allow": ["*.example.com"]}, 'return ask("self.example.com")')
        finally:
            lab.set_record("self.example.com", None)
        assert result["out"]["rcode"] == "NXDOMAIN"
        assert "this host" in result["log"][0]["reason"]

    def test_an_explicit_net_rule_lets_a_name_resolve_to_its_special_address(self, lab):
        result = respond(lab, {"allow": ["private.example.com", "10.0.0.5:80"]}, 'return ask("private.example.com")')
        [(_, synthetic, _)] = result["out"]["answers"]
        assert result["table"]["private.example.com"]["reals"] == [netlab.PRIVATE_V4]
        assert ipaddress.ip_address(synthetic) in SYNTHETIC_V4

    def test_answers_mirror_upstream_families(self, lab):
        result = respond(lab, {"allow": ["*.example.com"]}, """
            return {"v6only_a": ask("v6only.example.com", "A"), "v6only_aaaa": ask("v6only.example.com", "AAAA"),
                    "other_aaaa": ask("other.example.com", "AAAA"), "other_a": ask("other.example.com", "A")}
        """)
        out = result["out"]
        assert out["v6only_a"] == {"rcode": "NOERROR", "tc": 0, "id_ok": True, "answers": []}
        assert ipaddress.ip_address(synthetic_of(out["v6only_aaaa"])[0]) in SYNTHETIC_V6
        assert out["other_aaaa"]["rcode"] == "NOERROR" and out["other_aaaa"]["answers"] == []
        assert ipaddress.ip_address(synthetic_of(out["other_a"])[0]) in SYNTHETIC_V4
        assert result["table"]["v6only.example.com"]["v4"] is None
        assert result["table"]["other.example.com"]["v6"] is None

    def test_other_query_types_are_answered_empty_and_not_forwarded(self, lab):
        result = respond(lab, {"allow": ["*.example.com"]}, """
            return [ask("txt.example.com", t) for t in ("TXT", "MX", "SRV", "NS", "CNAME", "PTR", "ANY", "HTTPS")]
        """)
        assert all(a["rcode"] == "NOERROR" and a["answers"] == [] for a in result["out"])
        assert not lab.queries(name="txt.example.com")

    def test_cname_chains_are_followed_upstream(self, lab):
        result = respond(lab, {"allow": ["alias.example.com"]}, 'return ask("alias.example.com")')
        [(qtype, synthetic, _)] = result["out"]["answers"]
        assert qtype == "A" and ipaddress.ip_address(synthetic) in SYNTHETIC_V4
        assert result["table"]["alias.example.com"]["reals"] == [netlab.WEB_V4]
        assert "www.example.com" not in result["table"]  # the target was not opened by the alias

    def test_dns_over_tcp(self, lab):
        result = respond(lab, {"allow": ["www.example.com"]}, """
            return [ask("www.example.com", "A", tcp=True), ask("nope.example.com", "A", tcp=True)]
        """)
        good, bad = result["out"]
        assert ipaddress.ip_address(synthetic_of(good)[0]) in SYNTHETIC_V4
        assert bad["rcode"] == "NXDOMAIN"

    def test_a_truncated_upstream_answer_is_retried_over_tcp(self, lab):
        result = respond(lab, {"allow": ["truncated.example.com"]}, 'return ask("truncated.example.com")')
        assert ipaddress.ip_address(synthetic_of(result["out"])[0]) in SYNTHETIC_V4
        assert result["table"]["truncated.example.com"]["reals"] == [netlab.WEB_V4]
        assert [q["proto"] for q in lab.queries(name="truncated.example.com")] == ["udp", "tcp"]

    def test_upstream_failures(self, lab):
        lab.set_record("silent.example.com", {"drop": True})
        lab.set_record("broken.example.com", {"rcode": "SERVFAIL"})
        try:
            result = respond(lab, {"allow": ["*.example.com"]}, """
                return [ask("silent.example.com"), ask("broken.example.com"), ask("absent.example.com")]
            """)
        finally:
            lab.set_record("silent.example.com", None)
            lab.set_record("broken.example.com", None)
        silent, broken, absent = result["out"]
        assert silent["rcode"] == "SERVFAIL" and broken["rcode"] == "SERVFAIL" and absent["rcode"] == "NXDOMAIN"
        reasons = {e["name"]: e["reason"] for e in result["log"]}
        assert reasons["silent.example.com"].startswith("upstream failed")
        assert "NXDOMAIN" in reasons["absent.example.com"]

    def test_malformed_packets_get_formerr_or_nothing_and_the_responder_lives(self, lab):
        result = respond(lab, {"allow": ["www.example.com"]}, """
            import struct
            from dnslib import DNSRecord
            query = DNSRecord.question("www.example.com").pack()
            response = bytearray(query); response[2] |= 0x80       # QR set: a response, not a query
            two_questions = bytearray(query); two_questions[5] = 2   # claims 2 questions, carries 1
            out = {
                "short": raw_udp(b"\\x12\\x34\\x01"),
                "garbage": raw_udp(b"\\xab\\xcd\\x01\\x00" + b"\\xff" * 40),  # a query header, then garbage
                "truncated_question": raw_udp(query[:-3]),
                "response": raw_udp(bytes(response)),
                "two_questions": raw_udp(bytes(two_questions)),
                "empty": raw_udp(b""),
                "tcp_garbage": raw_tcp(struct.pack(">H", 20) + b"\\xab\\xcd\\x01\\x00" + b"\\xff" * 16),
                "tcp_short_length": raw_tcp(struct.pack(">H", 500) + query, wait=1.0),
            }
            out["after"] = ask("www.example.com")
            out["after_tcp"] = ask("www.example.com", tcp=True)
            out["query_id"] = query[:2].hex()
            return out
        """)
        out = result["out"]
        assert result["alive"], "a serve loop died"
        for key in ("short", "response", "empty"):  # nothing to answer to: silence
            assert out[key] is None, key
        for key, query_id in (("garbage", "abcd"), ("truncated_question", out["query_id"]),
                              ("two_questions", out["query_id"])):
            reply = bytes.fromhex(out[key])
            assert reply[:2].hex() == query_id and reply[2] & 0x80, key  # a response to that query
            assert reply[3] & 0x0F == 1, f"{key}: not FORMERR: {out[key]}"
        tcp_reply = bytes.fromhex(out["tcp_garbage"])
        assert tcp_reply[2:4].hex() == "abcd" and tcp_reply[5] & 0x0F == 1  # length-prefixed FORMERR
        assert out["tcp_short_length"] in ("", "timeout")  # an incomplete message gets no answer
        assert out["after"]["rcode"] == "NOERROR" and out["after"]["answers"]
        assert out["after_tcp"]["rcode"] == "NOERROR" and out["after_tcp"]["answers"]
        assert not [q for q in lab.queries() if q.get("malformed")]  # garbage is never passed upstream

    def test_no_policy_means_nothing_resolves_and_updates_apply_to_the_next_query(self, lab):
        result = respond(lab, None, """
            before = ask("www.example.com")
            set_policy({"allow": ["www.example.com"]})
            during = ask("www.example.com")
            set_policy({"allow": ["*.example.com"], "deny": ["www.example.com"]})
            after = ask("www.example.com")
            return [before["rcode"], during["rcode"], after["rcode"]]
        """)
        assert result["out"] == ["NXDOMAIN", "NOERROR", "NXDOMAIN"]
        assert result["log"][0]["reason"].startswith("no network policy")

    def test_upstream_from_env_reaches_the_second_resolver_too(self, lab):
        done = lab.python("""
import asyncio
from sandlot._net.dns import upstream_from_env
up = upstream_from_env()
print(up.servers, asyncio.run(up.resolve("api.example.com", "A")).addresses)
""", env={"SANDLOT_UPSTREAM_DNS": f"{netlab.DNS2}:53"})
        assert done.stdout.strip() == f"[('{netlab.DNS2}', 53)] ['{netlab.API_V4}']"
        assert lab.queries(server=netlab.DNS2, name="api.example.com")


# -- no lab needed ---------------------------------------------------------------------------------------
def test_upstream_from_env_forms(tmp_path):
    assert upstream_from_env({"SANDLOT_UPSTREAM_DNS": "192.0.2.53"}).servers == [("192.0.2.53", 53)]
    assert upstream_from_env({"SANDLOT_UPSTREAM_DNS": "192.0.2.53:5353"}).servers == [("192.0.2.53", 5353)]
    assert upstream_from_env({"SANDLOT_UPSTREAM_DNS": "[2001:db8::53]:54"}).servers == [("2001:db8::53", 54)]
    assert upstream_from_env({"SANDLOT_UPSTREAM_DNS": "2001:db8::53"}).servers == [("2001:db8::53", 53)]
    assert upstream_from_env({"SANDLOT_UPSTREAM_DNS": "192.0.2.53, 198.51.100.53:53"}).servers == [
        ("192.0.2.53", 53), ("198.51.100.53", 53)]
    for bad in ("dns.example.com", "192.0.2.53:0", "192.0.2.53:x", "[2001:db8::53]x"):
        with pytest.raises(InvalidRequest, match="SANDLOT_UPSTREAM_DNS"):
            upstream_from_env({"SANDLOT_UPSTREAM_DNS": bad})
    conf = tmp_path / "resolv.conf"
    conf.write_text("# comment\nsearch example.com\nnameserver 192.0.2.53\nnameserver fe80::1%eth0\n"
                    "nameserver not-an-ip\noptions ndots:1\n")
    assert upstream_from_env({}, str(conf)).servers == [("192.0.2.53", 53), ("fe80::1", 53)]
    assert upstream_from_env({}, str(tmp_path / "missing")).servers == []


async def test_an_upstream_with_no_servers_fails_cleanly():
    from sandlot._net.dns import UpstreamError

    with pytest.raises(UpstreamError, match="no upstream"):
        await Upstream([]).resolve("www.example.com", "A")


def test_synthetic_addresses_are_per_name_and_map_back():
    table = SyntheticAddresses()
    a = table.assign("www.example.com", ["203.0.113.10"])
    b = table.assign("api.example.com", ["198.51.100.20"])
    a6 = table.assign("www.example.com", ["2001:db8::10"])
    assert a != b and ipaddress.ip_address(a) in SYNTHETIC_V4 and ipaddress.ip_address(a6) in SYNTHETIC_V6
    assert table.assign("WWW.example.com.", ["203.0.113.11"]) == a  # stable; reals updated
    assert table.lookup(a) == ("www.example.com", ("203.0.113.11", "2001:db8::10"))
    assert table.lookup(a6) == ("www.example.com", ("2001:db8::10", "203.0.113.11"))  # dialled family first
    assert table.lookup("::ffff:" + a) == table.lookup(a)
    assert table.lookup("198.18.200.1") is None and table.is_synthetic("198.18.200.1")
    assert table.lookup("203.0.113.10") is None and not table.is_synthetic("203.0.113.10")
    assert table.is_synthetic("100::ffff") and not table.is_synthetic("junk")


def test_a_full_synthetic_range_forgets_the_least_recent_name():
    table = SyntheticAddresses(v4=ipaddress.ip_network("198.18.0.0/30"))  # .1 and .2 usable
    first = table.assign("one.example.com", ["203.0.113.1"])
    table.assign("two.example.com", ["203.0.113.2"])
    table.assign("one.example.com", ["203.0.113.1"])  # one is now the most recent
    third = table.assign("three.example.com", ["203.0.113.3"])
    assert table.lookup(third) == ("three.example.com", ("203.0.113.3",))
    assert table.lookup(first) == ("one.example.com", ("203.0.113.1",))
    assert "two.example.com" not in table.names()
