"""The network policy (sandlot/_net/policy.py): what a rule means, what is refused whatever the rules say,
and what a user gets told when a rule is wrong. Pure: no namespaces needed.
Pure classification: no test here sends a packet, so special and public addresses appear only as data.
"""

from __future__ import annotations

import ipaddress

import pytest

from sandlot import InvalidRequest
from sandlot._net.log import DecisionLog
from sandlot._net.policy import NetworkPolicy, Rule, host_addresses, special_reason


def build(allow=(), deny=()):
    return NetworkPolicy.build({"allow": list(allow), "deny": list(deny)})


# -- building --------------------------------------------------------------------------------------------
def test_none_and_public():
    assert NetworkPolicy.build(None) is None
    assert NetworkPolicy.build("none") is None
    assert NetworkPolicy.build("public") == build(["*"])
    assert NetworkPolicy.build("public").to_json() == "public"


@pytest.mark.parametrize("text, kind, value, ports", [
    ("pypi.org", "name", "pypi.org", None),
    ("PyPI.org.", "name", "pypi.org", None),
    ("pypi.org:443", "name", "pypi.org", (443, 443)),
    ("*.pythonhosted.org", "suffix", "pythonhosted.org", None),
    ("*.pythonhosted.org:8000-8100", "suffix", "pythonhosted.org", (8000, 8100)),
    ("*", "any", None, None),
    ("*:443", "any", None, (443, 443)),
    ("203.0.113.7", "net", ipaddress.ip_network("203.0.113.7/32"), None),
    ("203.0.113.7:443", "net", ipaddress.ip_network("203.0.113.7/32"), (443, 443)),
    ("203.0.113.0/24", "net", ipaddress.ip_network("203.0.113.0/24"), None),
    ("203.0.113.0/24:8000-8100", "net", ipaddress.ip_network("203.0.113.0/24"), (8000, 8100)),
    ("2001:db8::1", "net", ipaddress.ip_network("2001:db8::1/128"), None),
    ("[2001:db8::1]", "net", ipaddress.ip_network("2001:db8::1/128"), None),
    ("[2001:DB8::1]:443", "net", ipaddress.ip_network("2001:db8::1/128"), (443, 443)),
    ("2001:db8::/32", "net", ipaddress.ip_network("2001:db8::/32"), None),
    ("[2001:db8::/32]:443", "net", ipaddress.ip_network("2001:db8::/32"), (443, 443)),
    ("2001:db8::/32:1-1024", "net", ipaddress.ip_network("2001:db8::/32"), (1, 1024)),
    ("::ffff:10.0.0.5", "net", ipaddress.ip_network("10.0.0.5/32"), None),  # the IPv4 it is
])
def test_rule_forms(text, kind, value, ports):
    rule = Rule.parse(text)
    assert (rule.kind, rule.value, rule.ports) == (kind, value, ports)
    assert Rule.parse(rule.text) == rule  # the canonical text parses back to the same rule


@pytest.mark.parametrize("text, says", [
    ("", "empty"),
    ("   ", "empty"),
    ("pypi.org:", "not a port"),
    ("pypi.org:http", "not a port"),
    ("pypi.org:0", "1-65535"),
    ("pypi.org:70000", "1-65535"),
    ("pypi.org:9000-8000", "empty"),
    ("foo.*.example.com", "'*'"),
    ("*example.com", "'*'"),
    ("*.*.example.com", "'*'"),
    ("exa mple.com", "label"),
    ("-bad.example.com", "label"),
    ("a..b", "label"),
    ("203.0.113.7/24", "host bits set; did you mean 203.0.113.0/24"),
    ("203.0.113.0/33", "not a valid network"),
    ("300.1.2.3", "not a valid"),
    ("1.2.3", "not a valid"),
    ("2001:db8::zz", "not a valid IP"),
    ("fe80::1%eth0", "zone ids"),
    ("[2001:db8::1", "']'"),
    ("[2001:db8::1]x", "':port'"),
    ("[pypi.org]:443", "brackets are for IPv6"),
    ("x" * 64 + ".example.com", "label"),
])
def test_bad_rules_say_which_and_what_is_accepted(text, says):
    with pytest.raises(InvalidRequest) as caught:
        build([text])
    message = str(caught.value)
    assert repr(text) in message and says in message
    assert "Accepted forms" in message and "*.pythonhosted.org" in message


@pytest.mark.parametrize("value", [
    "everything", 42, ["pypi.org"], {"allow": "pypi.org"}, {"allow": ["pypi.org"], "allowed": []},
    {"allow": [42]}, {"deny": [None]},
])
def test_bad_values_are_invalid_requests(value):
    with pytest.raises(InvalidRequest):
        NetworkPolicy.build(value)


def test_to_json_round_trips():
    for value in ("public", {"allow": [], "deny": []},
                  {"allow": ["PyPI.org.", "*.pythonhosted.org:443", "203.0.113.0/24:8000-8100", "[2001:db8::1]:443",
                             "2001:db8::/32", "*:22"], "deny": ["evil.example.com", "198.51.100.0/24"]}):
        policy = NetworkPolicy.build(value)
        assert NetworkPolicy.build(policy.to_json()) == policy
    assert build(["PyPI.org."]).to_json() == {"allow": ["pypi.org"], "deny": []}
    assert build(["*"], ["evil.example.com"]).to_json() == {"allow": ["*"], "deny": ["evil.example.com"]}


def test_updated_replaces_the_lists_given():
    policy = build(["pypi.org"], ["evil.example.com"])
    wider = policy.updated(allow=["pypi.org", "*.pythonhosted.org"])
    assert wider.to_json() == {"allow": ["pypi.org", "*.pythonhosted.org"], "deny": ["evil.example.com"]}
    assert wider.updated(deny=[]).to_json()["deny"] == []
    assert policy.to_json()["allow"] == ["pypi.org"]  # frozen: the original is unchanged
    with pytest.raises(InvalidRequest):
        policy.updated(allow=["bad rule"])


# -- names -----------------------------------------------------------------------------------------------
def test_exact_name_matches_only_itself():
    policy = build(["pypi.org"])
    assert policy.check_name("pypi.org", 443).allowed
    assert policy.check_name("PYPI.ORG.", 443).allowed
    assert not policy.check_name("www.pypi.org", 443).allowed
    assert not policy.check_name("notpypi.org", 443).allowed
    assert policy.check_name("pypi.org", 443).rule == "pypi.org"
    refused = policy.check_name("example.com", 443)
    assert (refused.allowed, refused.rule, refused.reason) == (False, None, "no rule allows it")


def test_suffix_matches_subdomains_not_the_apex():
    policy = build(["*.pythonhosted.org"])
    assert policy.check_name("files.pythonhosted.org", 443).allowed
    assert policy.check_name("a.b.pythonhosted.org", 443).allowed
    assert not policy.check_name("pythonhosted.org", 443).allowed
    assert not policy.check_name("evilpythonhosted.org", 443).allowed


def test_ports_and_resolution():
    policy = build(["github.com:22", "*.example.com:8000-8100"])
    assert policy.check_name("github.com", None).allowed  # it may be resolved (to connect on 22)
    assert policy.check_name("github.com", 22).allowed
    assert not policy.check_name("github.com", 443).allowed
    assert policy.check_name("a.example.com", 8000).allowed and policy.check_name("a.example.com", 8100).allowed
    assert not policy.check_name("a.example.com", 8101).allowed


def test_deny_wins_over_allow():
    policy = build(["*", "*.example.com"], ["evil.example.com", "*.bad.example.com", "ok.example.com:25"])
    assert not policy.check_name("evil.example.com", 443).allowed
    assert policy.check_name("evil.example.com", 443).rule == "evil.example.com"
    assert not policy.check_name("x.bad.example.com", None).allowed
    assert policy.check_name("ok.example.com", None).allowed  # a port-limited deny leaves other ports
    assert policy.check_name("ok.example.com", 443).allowed
    assert not policy.check_name("ok.example.com", 25).allowed
    assert not build(["pypi.org"], ["*"]).check_name("pypi.org", 443).allowed


def test_net_rules_do_not_allow_names_and_invalid_names_are_refused():
    policy = build(["203.0.113.0/24"])
    assert not policy.check_name("www.example.com", 443).allowed
    assert not build(["*"]).check_name("bad name!", 80).allowed


# -- addresses -------------------------------------------------------------------------------------------
def test_ip_literals_need_net_rules_or_star():
    policy = build(["pypi.org", "203.0.113.0/24:443", "[2001:db8::1]:443"])
    assert policy.check_address("203.0.113.7", 443).allowed
    assert not policy.check_address("203.0.113.7", 80).allowed
    assert not policy.check_address("198.51.100.1", 443).allowed
    assert policy.check_address("2001:db8::1", 443).allowed
    assert not policy.check_address("2001:db8::2", 443).allowed
    assert build(["*"]).check_address("198.51.100.1", 12345).allowed
    assert build(["*:443"]).check_address("198.51.100.1", 443).allowed
    assert not build(["*:443"]).check_address("198.51.100.1", 80).allowed
    assert not policy.check_address("not-an-ip", 443).allowed


def test_a_name_allows_its_addresses_and_net_denies_still_win():
    policy = build(["www.example.com"], ["198.51.100.0/24"])
    assert policy.check_address("203.0.113.10", 443, name="www.example.com").allowed
    assert not policy.check_address("203.0.113.10", 443).allowed  # the same address as a literal
    assert not policy.check_address("198.51.100.20", 443, name="www.example.com").allowed
    assert not build(["*"], ["www.example.com"]).check_address("203.0.113.10", 443, name="www.example.com").allowed


SPECIAL = {
    "127.0.0.1": "loopback", "127.9.9.9": "loopback", "::1": "loopback", "0.0.0.0": "unspecified",
    "::": "unspecified", "10.0.0.5": "private", "172.16.0.1": "private", "172.31.255.255": "private",
    "192.168.1.1": "private", "100.64.0.1": "carrier-grade NAT", "fd00::5": "unique local",
    "fc00::1": "unique local", "169.254.1.1": "link-local", "fe80::1": "link-local", "224.0.0.1": "multicast",
    "ff02::1": "multicast", "255.255.255.255": "broadcast", "240.0.0.1": "reserved",
    "169.254.169.254": "metadata", "100.100.100.200": "metadata", "fd00:ec2::254": "metadata",
    "::ffff:169.254.169.254": "metadata", "64:ff9b::a9fe:a9fe": "metadata (NAT64",
    "64:ff9b::169.254.169.254": "metadata (NAT64", "2002:a9fe:a9fe::": "metadata (6to4",
    "2002:a9fe:a9fe:1::5": "metadata (6to4", "::ffff:127.0.0.1": "loopback", "::ffff:10.0.0.5": "private",
    "64:ff9b::a00:5": "private", "2002:7f00:1::": "loopback", "::127.0.0.1": "IPv4-compatible",
    "198.18.0.5": "synthetic", "100::5": "synthetic", "64:ff9b:1::5": "NAT64",
}


@pytest.mark.parametrize("address, reason", SPECIAL.items())
def test_special_addresses_are_refused_under_star(address, reason):
    assert reason in special_reason(address)
    for policy in (build(["*"]), NetworkPolicy.build("public")):
        verdict = policy.check_address(address, 80)
        assert not verdict.allowed and reason in verdict.reason
        # a name rule never opens one either (DNS rebinding)
        assert not build(["*", "rebind.example.com"]).check_address(address, 80, name="rebind.example.com").allowed


@pytest.mark.parametrize("address", ["203.0.113.10", "198.51.100.1", "192.0.2.53", "2001:db8::10",
                                     "64:ff9b::cb00:710a", "2002:cb00:710a::"])
def test_public_addresses_are_not_special(address):
    assert special_reason(address) is None
    assert build(["*"]).check_address(address, 443).allowed


def test_an_explicit_net_rule_opens_a_special_range():
    assert build(["10.0.0.0/8"]).check_address("10.0.0.5", 80).allowed
    assert build(["10.0.0.5:80"]).check_address("10.0.0.5", 80).allowed
    assert not build(["10.0.0.5:80"]).check_address("10.0.0.5", 81).allowed
    assert build(["::ffff:10.0.0.5"]).check_address("10.0.0.5", 80).allowed
    assert build(["10.0.0.5"]).check_address("::ffff:10.0.0.5", 80).allowed
    assert build(["127.0.0.1"]).check_address("127.0.0.1", 8000).allowed
    assert build(["fd00::/8"]).check_address("fd00::5", 80).allowed
    assert build(["169.254.169.254"]).check_address("169.254.169.254", 80).allowed
    assert build(["fd00:ec2::254"]).check_address("fd00:ec2::254", 80).allowed
    # a name resolving there is opened by the net rule too (the user named the address)
    assert build(["private.example.com", "10.0.0.5"]).check_address("10.0.0.5", 80,
                                                                    name="private.example.com").allowed


def test_a_net_rule_wider_than_the_special_block_does_not_open_it():
    """"0.0.0.0/0" is a way to say "every IPv4 address", not "and the private network too"."""
    assert not build(["0.0.0.0/0"]).check_address("10.0.0.5", 80).allowed
    assert build(["0.0.0.0/0"]).check_address("203.0.113.10", 80).allowed
    assert not build(["::/0"]).check_address("fd00::5", 80).allowed
    assert not build(["169.254.0.0/16"]).check_address("169.254.169.254", 80).allowed  # metadata is named exactly
    assert build(["169.254.0.0/16"]).check_address("169.254.1.1", 80).allowed
    assert not build(["fd00::/8"]).check_address("fd00:ec2::254", 80).allowed


def test_deny_wins_over_an_explicit_special_allow():
    assert not build(["10.0.0.0/8"], ["10.0.0.5"]).check_address("10.0.0.5", 80).allowed


def test_the_hosts_own_addresses_are_refused_unless_named():
    mine = frozenset({ipaddress.ip_address("203.0.113.1"), ipaddress.ip_address("2001:db8:1::1")})
    policy = build(["*", "203.0.113.0/24"])
    verdict = policy.check_address("203.0.113.1", 80, host_addresses=mine)
    assert not verdict.allowed and "this host" in verdict.reason
    assert not policy.check_address("2001:db8:1::1", 80, host_addresses=mine).allowed
    assert not policy.check_address("::ffff:203.0.113.1", 80, host_addresses=mine).allowed
    assert not policy.check_address("64:ff9b::cb00:7101", 80, host_addresses=mine).allowed  # NAT64 of it
    assert policy.check_address("203.0.113.2", 80, host_addresses=mine).allowed
    assert build(["203.0.113.1"]).check_address("203.0.113.1", 80, host_addresses=mine).allowed
    assert "this host" in special_reason("203.0.113.1", mine)


def test_host_addresses_lists_this_namespaces_interfaces():
    found = host_addresses()
    assert ipaddress.ip_address("127.0.0.1") in found
    assert all(isinstance(a, (ipaddress.IPv4Address, ipaddress.IPv6Address)) for a in found)


# -- the decision log ------------------------------------------------------------------------------------
def test_decision_log_is_a_bounded_ring_with_counters():
    log = DecisionLog(capacity=3)
    for i in range(5):
        log.record("tcp", "deny" if i % 2 else "allow", name=f"n{i}.example.com", address="203.0.113.10",
                   port=443, rule=None, reason="no rule allows it")
    kept = log.entries()
    assert [e["name"] for e in kept] == ["n2.example.com", "n3.example.com", "n4.example.com"]
    assert set(kept[0]) == {"time", "kind", "name", "address", "port", "verdict", "rule", "reason"}
    assert log.dropped == 2 and len(log) == 3
    assert log.counters == {"tcp_allow": 3, "tcp_deny": 2}
    assert log.entries(since=kept[1]["time"]) == [e for e in kept if e["time"] > kept[1]["time"]]
    log.add({"kind": "dns", "verdict": "revoked", "name": "x"})
    log.count("bytes_out", 100)
    assert log.counters["dns_revoked"] == 1 and log.counters["bytes_out"] == 100
    with pytest.raises(ValueError):
        log.add({"kind": "udp", "verdict": "allow"})


def test_refuses_special_is_the_rebinding_check():
    policy = build(["*", "rebind.example.com", "10.0.0.0/24:80"])
    assert policy.refuses_special("203.0.113.10") is None
    assert "loopback" in policy.refuses_special("127.0.0.1")
    assert "metadata" in policy.refuses_special("::ffff:169.254.169.254")
    assert policy.refuses_special("10.0.0.5") is None  # a net rule names it (on some port)
    assert "private" in policy.refuses_special("10.0.1.5")
    assert "this host" in policy.refuses_special("203.0.113.1", {ipaddress.ip_address("203.0.113.1")})
