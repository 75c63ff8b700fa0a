"""A sandbox's network policy: which names and addresses it may reach, on which ports. Pure (stdlib only).

    NetworkPolicy.build({"allow": ["pypi.org", "*.pythonhosted.org", "203.0.113.0/24:443"],
                         "deny": ["evil.example.com"]})

Rule forms (case-insensitive, a trailing dot ignored), each with an optional ":443" or ":8000-8100":
  "pypi.org"              that name exactly
  "*.pythonhosted.org"    every name under it, not the apex itself
  "*"                     every name and every public address
  "203.0.113.7"  "203.0.113.0/24"  "2001:db8::1"  "2001:db8::/32"   addresses (IPv6 with a port:
                          "[2001:db8::1]:443", "[2001:db8::/32]:443")
Deny wins over allow. Special addresses (loopback, private, link-local, metadata, multicast, reserved, the
host's own, and every IPv6 spelling of them) are refused unless an ALLOW rule of kind "net" names them:
"*" and name rules never open them (that is what makes DNS rebinding harmless), and a net rule opens a
special address only if it lies inside that address's special block (so "0.0.0.0/0" is not a way to
say "and the private network too"; "10.0.0.0/8" or "10.0.0.5" is).
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Optional, Union

from .._exceptions import InvalidRequest

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

ACCEPTED_FORMS = ("'pypi.org', '*.pythonhosted.org', '*', '203.0.113.7', '203.0.113.0/24', '2001:db8::1', "
                  "'2001:db8::/32', '[2001:db8::1]:443', each optionally followed by ':443' or ':8000-8100'")

_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    rule: Optional[str]  # the text of the deciding rule, if a rule decided
    reason: str


@dataclass(frozen=True)
class Rule:
    """One parsed rule. kind: "name" (value: the name), "suffix" (value: what follows "*."), "any"
    (value None) or "net" (value: an ip_network; a single address is a /32 or /128)."""

    text: str
    kind: str
    value: Any
    ports: Optional[tuple[int, int]] = None

    @classmethod
    def parse(cls, text: Any) -> "Rule":
        if not isinstance(text, str):
            raise _bad(text, "a rule is a string")
        raw = text.strip().lower()
        if not raw:
            raise _bad(text, "the rule is empty")
        host, ports = _split_port(raw, text)
        if host == "*":
            return cls(_canonical("*", ports), "any", None, ports)
        if host.startswith("*.") and "*" not in host[2:]:
            name = _name(host[2:], text)
            return cls(_canonical("*." + name, ports), "suffix", name, ports)
        if "*" in host:
            raise _bad(text, "'*' may only be the whole rule or its first label ('*.example.com')")
        network = _network(host, text)
        if network is not None:
            return cls(_canonical(_network_text(network), ports, bracket=network.version == 6), "net", network, ports)
        name = _name(host, text)
        return cls(_canonical(name, ports), "name", name, ports)

    def allows_port(self, port: Optional[int]) -> bool:
        return self.ports is None or (port is not None and self.ports[0] <= port <= self.ports[1])

    def matches_name(self, name: str) -> bool:
        if self.kind == "any":
            return True
        if self.kind == "name":
            return name == self.value
        if self.kind == "suffix":
            return name.endswith("." + self.value)
        return False

    def within(self, bound: "Rule") -> bool:
        """Whether everything this rule grants, ``bound`` grants too (an operator's ceiling on the rules a
        tenant may ask for): its ports inside bound's, and its names or addresses inside bound's."""
        if bound.ports is not None and (self.ports is None or not (bound.ports[0] <= self.ports[0]
                                                                    and self.ports[1] <= bound.ports[1])):
            return False
        if bound.kind == "any":
            return True
        if self.kind == "any":
            return False
        if bound.kind == "net":
            return self.kind == "net" and self.value.version == bound.value.version and self.value.subnet_of(bound.value)
        if self.kind == "net":
            return False
        if bound.kind == "name":
            return self.kind == "name" and self.value == bound.value
        # bound is "*.suffix": names under it, and narrower suffixes
        return self.value.endswith("." + bound.value)

    def covers(self, address: IPAddress) -> bool:
        """A net rule covers an address in its network; "*" covers every (public) address."""
        if self.kind == "any":
            return True
        return self.kind == "net" and address.version == self.value.version and address in self.value


@dataclass(frozen=True)
class NetworkPolicy:
    allow: tuple[Rule, ...] = field(default=())
    deny: tuple[Rule, ...] = field(default=())

    # -- building ------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, value: Any) -> Optional["NetworkPolicy"]:
        """None or "none" → None (no network); "public" ≡ {"allow": ["*"]}; {"allow": [...], "deny": [...]}.
        A bad value or rule → InvalidRequest saying which and what is accepted."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            word = value.strip().lower()
            if word == "none":
                return None
            if word == "public":
                return cls(allow=(Rule.parse("*"),))
            raise InvalidRequest(f"network={value!r}: expected None, 'none', 'public' or "
                                 "{'allow': [rules], 'deny': [rules]}")
        if isinstance(value, dict):
            unknown = set(value) - {"allow", "deny"}
            if unknown:
                raise InvalidRequest(f"network: unknown key(s) {sorted(map(str, unknown))}; "
                                     "expected {'allow': [rules], 'deny': [rules]}")
            return cls(allow=_rules(value.get("allow"), "allow"), deny=_rules(value.get("deny"), "deny"))
        raise InvalidRequest(f"network={value!r}: expected None, 'none', 'public' or "
                             "{'allow': [rules], 'deny': [rules]}")

    def to_json(self) -> Any:
        """"public" for exactly {"allow": ["*"]}; else {"allow": [...], "deny": [...]} (build() round-trips)."""
        if not self.deny and [r.text for r in self.allow] == ["*"]:
            return "public"
        return {"allow": [r.text for r in self.allow], "deny": [r.text for r in self.deny]}

    def updated(self, allow: Optional[Iterable[str]] = None, deny: Optional[Iterable[str]] = None) -> "NetworkPolicy":
        """A new policy: each list given REPLACES the current one; None keeps it."""
        return replace(self, allow=self.allow if allow is None else _rules(allow, "allow"),
                       deny=self.deny if deny is None else _rules(deny, "deny"))

    # -- deciding ------------------------------------------------------------------------------------------
    def check_name(self, name: str, port: Optional[int]) -> Verdict:
        """May the sandbox reach this name (on this port; port None: may the name be resolved at all)?"""
        name = _normal_name(name)
        if name is None:
            return Verdict(False, None, "not a valid host name")
        for rule in self.deny:
            if rule.kind != "net" and rule.matches_name(name) and _deny_port(rule, port):
                return Verdict(False, rule.text, "denied by rule")
        for rule in self.allow:
            if rule.kind != "net" and rule.matches_name(name) and (port is None or rule.allows_port(port)):
                return Verdict(True, rule.text, "allowed by rule")
        return Verdict(False, None, "no rule allows it")

    def refuses_special(self, ip: Any, host_addresses: Iterable[Any] = frozenset()) -> Optional[str]:
        """Why an address a name resolved to must not be handed out (DNS rebinding): its special reason,
        unless some "net" allow rule inside its special block covers it (on any port). None: acceptable."""
        try:
            address = parse_address(ip)
        except ValueError:
            return "not an IP address"
        special = _special(address, host_addresses)
        if special is None:
            return None
        reason, block = special
        for rule in self.allow:
            if (rule.kind == "net" and rule.covers(address) and rule.value.version == block.version
                    and rule.value.subnet_of(block)):
                return None
        return reason

    def special_rules(self, host_addresses: Iterable[Any] = frozenset()) -> list[str]:
        """The allow rules that open some special address (private, link-local, metadata, loopback, the
        host's own, or an IPv6 spelling of one): what a server's operator must grant beyond the public
        internet (a tenant writes these rules). Conservative: a rule inside an embedding prefix (6to4,
        NAT64, Teredo, IPv4-compatible) counts whatever it embeds. A rule wider than a special block
        ("0.0.0.0/0") never opens it (see check_address), so it is not listed."""
        blocks = [net for net, _ in _SPECIAL_V4 + _SPECIAL_V6] + [_COMPAT, _NAT64, _6TO4, _TEREDO]
        blocks += [ipaddress.ip_network(parse_address(h)) for h in host_addresses]
        return [rule.text for rule in self.allow if rule.kind == "net" and any(
            rule.value.version == block.version and rule.value.subnet_of(block) for block in blocks)]

    def check_address(self, ip: Any, port: Optional[int], *, name: Optional[str] = None,
                      host_addresses: Iterable[Any] = frozenset()) -> Verdict:
        """May the sandbox connect to ip:port? With name: the address is what that (resolved) name dials,
        so name rules count too; without: an IP literal, which only "net" rules and "*" can allow.
        Special addresses (special_reason, or one of host_addresses) need a "net" allow rule inside
        their special block whatever else allows them."""
        try:
            address = parse_address(ip)
        except ValueError:
            return Verdict(False, None, "not an IP address")
        normal_name = _normal_name(name) if name is not None else None
        for rule in self.deny:
            if rule.allows_port(port) and (rule.covers(address) or
                                           (normal_name is not None and rule.matches_name(normal_name))):
                return Verdict(False, rule.text, "denied by rule")
        special = _special(address, host_addresses)
        if special is not None:
            reason, block = special
            for rule in self.allow:
                if (rule.kind == "net" and rule.allows_port(port) and rule.covers(address)
                        and rule.value.version == block.version and rule.value.subnet_of(block)):
                    return Verdict(True, rule.text, f"allowed by rule ({reason})")
            return Verdict(False, None, f"special address: {reason}")
        for rule in self.allow:
            if not rule.allows_port(port):
                continue
            if rule.covers(address) or (normal_name is not None and rule.matches_name(normal_name)):
                return Verdict(True, rule.text, "allowed by rule")
        return Verdict(False, None, "no rule allows it")


# -- special addresses -----------------------------------------------------------------------------------
def _nets(*pairs: tuple[str, str]) -> tuple[tuple[IPNetwork, str], ...]:
    return tuple((ipaddress.ip_network(net), reason) for net, reason in pairs)


# Checked in order: the first block containing an address gives its reason (specific before general).
_SPECIAL_V4 = _nets(
    ("169.254.169.254/32", "cloud metadata"),
    ("100.100.100.200/32", "cloud metadata"),
    ("0.0.0.0/8", "unspecified / this network"),
    ("10.0.0.0/8", "private (RFC 1918)"),
    ("172.16.0.0/12", "private (RFC 1918)"),
    ("192.168.0.0/16", "private (RFC 1918)"),
    ("100.64.0.0/10", "carrier-grade NAT (RFC 6598)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("198.18.0.0/15", "benchmarking (sandboxes' synthetic addresses)"),
    ("224.0.0.0/4", "multicast"),
    ("255.255.255.255/32", "broadcast"),
    ("240.0.0.0/4", "reserved"),
)
_SPECIAL_V6 = _nets(
    ("fd00:ec2::254/128", "cloud metadata"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("64:ff9b:1::/48", "local-use NAT64"),
    ("::ffff:0:0:0/96", "IPv4-translated (SIIT, deprecated)"),  # ::ffff:0:a.b.c.d: refused whatever it embeds
    ("100::/64", "discard-only (sandboxes' synthetic addresses)"),
    ("fc00::/7", "unique local (ULA)"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local (deprecated)"),
    ("ff00::/8", "multicast"),
)
# IPv6 prefixes that embed an IPv4 address: such an address is as special as the IPv4 it spells.
_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
_COMPAT = ipaddress.ip_network("::/96")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_6TO4 = ipaddress.ip_network("2002::/16")
_TEREDO = ipaddress.ip_network("2001::/32")


def special_blocks() -> "list[IPNetwork]":
    """Every special block (private, loopback, link-local, metadata, multicast, reserved...) and the IPv6
    prefixes that embed an IPv4 address: what "*" and wide net rules never open."""
    return [net for net, _ in _SPECIAL_V4 + _SPECIAL_V6] + [_MAPPED, _COMPAT, _NAT64, _6TO4, _TEREDO]


def special_reason(ip: Any, host_addresses: Iterable[Any] = frozenset()) -> Optional[str]:
    """Why an address is special (refused unless a net rule names it), or None for a public address."""
    found = _special(parse_address(ip), host_addresses)
    return found[0] if found else None


def _special(address: IPAddress, host_addresses: Iterable[Any]) -> Optional[tuple[str, IPNetwork]]:
    """(reason, the special block a net rule must lie inside to open it), or None."""
    hosts = {parse_address(h) for h in host_addresses}
    if address in hosts:
        return "an address of this host", ipaddress.ip_network(address)
    if address.version == 4:
        for net, reason in _SPECIAL_V4:
            if address in net:
                return reason, net
        return None
    for net, reason in _SPECIAL_V6:
        if address in net:
            return reason, net
    embedded: list[tuple[ipaddress.IPv4Address, str, IPNetwork]] = []
    if address in _COMPAT:
        return "IPv4-compatible (deprecated)", _COMPAT
    if address in _NAT64:
        embedded.append((ipaddress.IPv4Address(int(address) & 0xFFFFFFFF), "NAT64", _NAT64))
    elif address.sixtofour is not None:
        embedded.append((address.sixtofour, "6to4", _6TO4))
    elif address.teredo is not None:
        server, client = address.teredo
        embedded += [(server, "Teredo", _TEREDO), (client, "Teredo", _TEREDO)]
    for v4, spelling, prefix in embedded:
        inner = _special(v4, hosts)
        if inner is not None:
            return f"{inner[0]} ({spelling} spelling)", prefix
    return None


def host_addresses() -> frozenset:
    """Every address of this network namespace's interfaces (the namespace of the calling THREAD: a thread
    that setns()ed elsewhere sees that namespace). Read from /proc, stdlib only."""
    base = "/proc/thread-self/net" if os.path.exists("/proc/thread-self/net") else "/proc/self/net"
    found: set[IPAddress] = set()
    try:
        with open(f"{base}/fib_trie") as f:
            lines = f.read().splitlines()
        for previous, line in zip(lines, lines[1:]):
            if line.strip().startswith("/32 host LOCAL") and "|--" in previous:
                found.add(ipaddress.IPv4Address(previous.split("|--", 1)[1].strip()))
    except OSError:
        pass
    try:
        with open(f"{base}/if_inet6") as f:
            for line in f:
                hexed = line.split()[0]
                found.add(ipaddress.IPv6Address(int(hexed, 16)))
    except OSError:
        pass
    return frozenset(found)


# -- parsing ---------------------------------------------------------------------------------------------
def _bad(text: Any, why: str) -> InvalidRequest:
    return InvalidRequest(f"network rule {text!r}: {why}. Accepted forms: {ACCEPTED_FORMS}")


def _rules(values: Any, which: str) -> tuple[Rule, ...]:
    if values is None:
        return ()
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)):
        raise InvalidRequest(f"network {which!r}: expected a list of rules, got {values!r}")
    return tuple(Rule.parse(v) for v in values)


def _split_port(raw: str, text: str) -> tuple[str, Optional[tuple[int, int]]]:
    """Separate an optional ':443' / ':lo-hi'. A bare IPv6 address never carries one: use brackets."""
    if raw.startswith("["):
        close = raw.find("]")
        if close < 0:
            raise _bad(text, "'[' without ']'")
        host, rest = raw[1:close], raw[close + 1:]
        if rest and not rest.startswith(":"):
            raise _bad(text, "only ':port' may follow ']'")
        if _network(host, text) is None or ":" not in host:
            raise _bad(text, "brackets are for IPv6 addresses")
        return host, _ports(rest[1:], text) if rest else None
    if "/" in raw:  # a CIDR: a port can only follow the prefix length ("2001:db8::/32:443")
        net, _, length = raw.partition("/")
        if ":" in length:
            length, _, port = length.partition(":")
            return f"{net}/{length}", _ports(port, text)
        return raw, None
    if raw.count(":") == 1:  # a name or IPv4 with a port
        host, _, port = raw.partition(":")
        return host, _ports(port, text)
    return raw, None  # no port, or a bare IPv6 address


def _ports(spec: str, text: str) -> tuple[int, int]:
    low, dash, high = spec.partition("-")
    try:
        lo, hi = int(low), int(high) if dash else int(low)
    except ValueError:
        raise _bad(text, f"{spec!r} is not a port or a port range") from None
    if not (1 <= lo <= 65535 and 1 <= hi <= 65535):
        raise _bad(text, "ports are 1-65535")
    if lo > hi:
        raise _bad(text, f"the port range {lo}-{hi} is empty")
    return lo, hi


def _network(host: str, text: str) -> Optional[IPNetwork]:
    """The network an address rule names, None if host is not an address (so: a name)."""
    if "%" in host:
        raise _bad(text, "zone ids ('%eth0') are not allowed")
    if "/" in host:
        try:
            network = ipaddress.ip_network(host)
        except ValueError as exc:  # (InvalidRequest is a ValueError too: none raised inside this try)
            problem = str(exc)
        else:
            problem = ""
        if problem:
            if "host bits" in problem:
                raise _bad(text, f"has host bits set; did you mean {ipaddress.ip_network(host, strict=False)}?")
            raise _bad(text, f"not a valid network ({problem})")
    else:
        try:
            network = ipaddress.ip_network(ipaddress.ip_address(host))
        except ValueError:
            network = None
        if network is None:
            if ":" in host or re.fullmatch(r"[0-9.]+", host):
                raise _bad(text, "not a valid IP address or network")
            return None
    if network.version == 6 and network.subnet_of(_MAPPED):  # ::ffff:a.b.c.d is that IPv4
        mapped_bits = network.prefixlen - 96
        network = ipaddress.ip_network(f"{ipaddress.IPv4Address(int(network.network_address) & 0xFFFFFFFF)}"
                                       f"/{mapped_bits}")
    return network


def _network_text(network: IPNetwork) -> str:
    single = network.prefixlen == network.max_prefixlen
    return str(network.network_address) if single else str(network)


def _canonical(host: str, ports: Optional[tuple[int, int]], bracket: bool = False) -> str:
    if ports is None:
        return host
    port = str(ports[0]) if ports[0] == ports[1] else f"{ports[0]}-{ports[1]}"
    return f"[{host}]:{port}" if bracket else f"{host}:{port}"


def _name(host: str, text: str) -> str:
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > 253:
        raise _bad(text, "not a valid host name")
    labels = name.split(".")
    for label in labels:
        if not _LABEL.match(label):
            raise _bad(text, f"{label!r} is not a valid label of a host name")
    if labels[-1].isdigit():
        raise _bad(text, "not a valid host name or IP address")
    return name


def _normal_name(name: str) -> Optional[str]:
    name = name.strip().lower()
    name = name[:-1] if name.endswith(".") else name
    if not name or len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
        return None
    return name


def parse_address(ip: Any) -> IPAddress:
    """An address as checked: IPv4-mapped IPv6 is the IPv4 it is; zone ids and brackets dropped."""
    if isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        address = ip
    else:
        text = str(ip).strip().strip("[]").split("%", 1)[0]
        address = ipaddress.ip_address(text)
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _deny_port(rule: Rule, port: Optional[int]) -> bool:
    """A deny rule applies to a name check with no port only if it denies every port."""
    return rule.ports is None if port is None else rule.allows_port(port)
