"""A sandbox's DNS (host side): allowed names get a SYNTHETIC address, everything else NXDOMAIN.

Why synthetic: the broker maps each connection back to the NAME the code resolved (a per-sandbox address
stands for one name), so a name rule never opens a shared IP to everything behind it, and the broker dials
real addresses it checked itself. Why never forward a name that is not allowed: a query is a message out
(DNS tunnelling). Why check what upstream answered: an allowed name may resolve to 127.0.0.1 or the metadata
address (DNS rebinding); such an answer is refused unless a "net" rule names the address.

    responder = DnsResponder(lambda: policy, upstream_from_env(), SyntheticAddresses(), DecisionLog())
    await responder.serve_udp(sock)   # and serve_tcp(listening_sock)
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import socket
import threading
from collections import OrderedDict
from typing import Any, Callable, Iterable, Optional

from dnslib import AAAA, QTYPE, RCODE, RR, A, DNSHeader, DNSRecord

from .._exceptions import InvalidRequest
from . import policy as policy_module

SYNTHETIC_V4 = ipaddress.ip_network("198.18.0.0/15")  # benchmarking range: never a real destination
SYNTHETIC_V6 = ipaddress.ip_network("100::/64")       # the discard-only prefix
SYNTHETIC_TTL = 30
UPSTREAM_TIMEOUT = 2.0     # per server and attempt
TCP_IDLE = 10.0            # a DNS-over-TCP client idle this long is closed
MAX_IN_FLIGHT = 256        # UDP queries answered concurrently; more are dropped (a flood costs us nothing)
# DNS-over-TCP clients served at once per sandbox; more are reset at once. Each costs the HOST process a
# file descriptor (and a pending upstream query): unbounded, one sandbox could exhaust the server's fds.
MAX_TCP_CLIENTS = 32
ADDRESS_TYPES = ("A", "AAAA")
# Names remembered per family and sandbox: the v6 range (2^64) never runs out, and every name costs the
# host memory; past this the least recently resolved name is forgotten, as when a range runs out.
MAX_NAMES = 65536
# Real addresses remembered per name and family (an upstream answer may carry thousands; the broker dials
# the first that answers): bounds what one name costs the host. All of them are checked before any is kept.
MAX_REALS = 16


class UpstreamError(Exception):
    """The upstream resolver did not give an answer (timeout, unreachable, malformed)."""


# -- synthetic addresses ---------------------------------------------------------------------------------
class SyntheticAddresses:
    """One sandbox's table: name ↔ its synthetic address (one per family, stable while the name is
    remembered) → the real addresses upstream last gave. The least recently resolved name is forgotten
    when a range runs out."""

    def __init__(self, v4: ipaddress.IPv4Network = SYNTHETIC_V4, v6: ipaddress.IPv6Network = SYNTHETIC_V6,
                 max_names: int = MAX_NAMES) -> None:
        self._nets = {4: v4, 6: v6}
        self.max_names = max_names
        self._next = {4: 1, 6: 1}
        self._by_name: dict[int, OrderedDict[str, str]] = {4: OrderedDict(), 6: OrderedDict()}
        self._by_address: dict[str, str] = {}
        self._reals: dict[str, dict[int, tuple[str, ...]]] = {}
        self._lock = threading.Lock()

    def assign(self, name: str, reals: Iterable[Any]) -> str:
        """The synthetic address for name in the family of reals (all one family), remembering reals."""
        real = tuple(str(ipaddress.ip_address(str(r))) for r in reals)[:MAX_REALS]  # as upstream spelled them
        if not real:
            raise ValueError("assign() needs at least one real address")
        version = 6 if ":" in real[0] else 4  # AAAA answers (::ffff:a.b.c.d too) get an IPv6 synthetic
        name = name.lower().rstrip(".")
        with self._lock:
            table = self._by_name[version]
            synthetic = table.get(name)
            if synthetic is None:
                synthetic = self._allocate(version)
                table[name] = synthetic
                self._by_address[synthetic] = name
            table.move_to_end(name)
            self._reals.setdefault(name, {})[version] = real
            return synthetic

    def _allocate(self, version: int) -> str:
        net, table = self._nets[version], self._by_name[version]
        if self._next[version] >= net.num_addresses - 1 or len(table) >= self.max_names:
            # full: forget the least recently resolved name (all of it, when no family holds it any more)
            old_name, old_address = table.popitem(last=False)
            del self._by_address[old_address]
            reals = self._reals.get(old_name, {})
            reals.pop(version, None)
            if not reals:
                self._reals.pop(old_name, None)
            return old_address
        address = str(net.network_address + self._next[version])
        self._next[version] += 1
        return address

    def lookup(self, address: Any) -> Optional[tuple[str, tuple[str, ...]]]:
        """(name, real addresses) for a synthetic address handed out, None otherwise. The reals of the
        family dialled come first, then the other family's."""
        text = str(policy_module.parse_address(address)) if address is not None else ""
        with self._lock:
            name = self._by_address.get(text)
            if name is None:
                return None
            reals = self._reals.get(name, {})
            first = 6 if ":" in text else 4
            return name, reals.get(first, ()) + reals.get(10 - first, ())

    def is_synthetic(self, address: Any) -> bool:
        """In a synthetic range (handed out or not): never dialled as a real address."""
        try:
            ip = policy_module.parse_address(address)
        except ValueError:
            return False
        return ip in self._nets[ip.version]

    def names(self) -> dict[str, dict[str, Any]]:
        """A snapshot: name → {"v4": synthetic, "v6": synthetic, "reals": [...]} (for logs and tests)."""
        with self._lock:
            out: dict[str, dict[str, Any]] = {}
            for version, table in self._by_name.items():
                for name, synthetic in table.items():
                    entry = out.setdefault(name, {"v4": None, "v6": None, "reals": []})
                    entry[f"v{version}"] = synthetic
                    entry["reals"] = [a for v in (4, 6) for a in self._reals.get(name, {}).get(v, ())]
            return out


# -- upstream --------------------------------------------------------------------------------------------
class UpstreamAnswer:
    def __init__(self, rcode: int, addresses: list[str]) -> None:
        self.rcode = rcode
        self.addresses = addresses

    def __repr__(self) -> str:
        return f"UpstreamAnswer({RCODE.get(self.rcode)}, {self.addresses})"


class Upstream:
    """The resolver(s) the host uses: async A/AAAA resolution over UDP (dnslib wire format), retried over
    TCP when the answer is truncated. Servers are tried in order; each attempt has its own timeout."""

    def __init__(self, servers: Iterable[tuple[str, int]], timeout: float = UPSTREAM_TIMEOUT) -> None:
        self.servers = [(str(host), int(port)) for host, port in servers]
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"Upstream({self.servers})"

    async def resolve(self, name: str, qtype: str) -> UpstreamAnswer:
        """The addresses (of qtype, following CNAMEs) upstream gives for name; UpstreamError if none answers."""
        if not self.servers:
            raise UpstreamError("no upstream resolver configured")
        problems = []
        for server in self.servers:
            try:
                return await self._ask(server, name, qtype)
            except (OSError, asyncio.TimeoutError, UpstreamError, ValueError) as exc:
                problems.append(f"{server[0]}:{server[1]}: {type(exc).__name__} {exc}".strip())
        raise UpstreamError("; ".join(problems))

    async def _ask(self, server: tuple[str, int], name: str, qtype: str) -> UpstreamAnswer:
        question = DNSRecord.question(name, qtype)
        question.header.id = random.randint(0, 0xFFFF)
        wire = question.pack()
        reply = await asyncio.wait_for(self._udp(server, wire, question), self.timeout)
        if reply.header.tc:
            reply = await asyncio.wait_for(self._tcp(server, wire, question), self.timeout)
        return UpstreamAnswer(reply.header.rcode, _addresses(reply, name, qtype))

    async def _udp(self, server: tuple[str, int], wire: bytes, question: DNSRecord) -> DNSRecord:
        loop = asyncio.get_running_loop()
        got: asyncio.Future = loop.create_future()

        class Client(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                reply = _matching_reply(data, question)
                if reply is not None and not got.done():
                    got.set_result(reply)

            def error_received(self, exc: Exception) -> None:  # e.g. ICMP port unreachable
                if not got.done():
                    got.set_exception(exc)

        family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
        transport, _ = await loop.create_datagram_endpoint(Client, remote_addr=server, family=family)
        try:
            transport.sendto(wire)
            return await got
        finally:
            transport.close()

    async def _tcp(self, server: tuple[str, int], wire: bytes, question: DNSRecord) -> DNSRecord:
        reader, writer = await asyncio.open_connection(server[0], server[1])
        try:
            writer.write(len(wire).to_bytes(2, "big") + wire)
            await writer.drain()
            while True:
                size = int.from_bytes(await reader.readexactly(2), "big")
                reply = _matching_reply(await reader.readexactly(size), question)
                if reply is not None:
                    return reply
        except asyncio.IncompleteReadError as exc:
            raise UpstreamError("the TCP answer was cut short") from exc
        finally:
            writer.close()


def _matching_reply(data: bytes, question: DNSRecord) -> Optional[DNSRecord]:
    """The reply if it answers our question (same id, same question), else None (spoofed or stray)."""
    try:
        reply = DNSRecord.parse(data)
    except Exception:  # noqa: BLE001 - dnslib raises several types for garbage
        return None
    if reply.header.id != question.header.id or not reply.header.qr or len(reply.questions) != 1:
        return None
    q, ours = reply.q, question.q
    if q.qtype != ours.qtype or str(q.qname).lower() != str(ours.qname).lower():
        return None
    return reply


def _addresses(reply: DNSRecord, name: str, qtype: str) -> list[str]:
    """The qtype records of name in the answer, following its CNAME chain (nothing else: no strays)."""
    chain = {name.lower().rstrip(".")}
    for _ in range(16):  # CNAMEs may come in any order; a few passes settle the chain
        grew = False
        for rr in reply.rr:
            if rr.rtype == QTYPE.CNAME and str(rr.rname).lower().rstrip(".") in chain:
                target = str(rr.rdata).lower().rstrip(".")
                if target not in chain:
                    chain.add(target)
                    grew = True
        if not grew:
            break
    wanted = getattr(QTYPE, qtype)
    found = []
    for rr in reply.rr:
        if rr.rtype == wanted and str(rr.rname).lower().rstrip(".") in chain:
            found.append(str(ipaddress.ip_address(str(rr.rdata))))
    return found


def upstream_from_env(environ: Optional[dict[str, str]] = None, resolv_conf: str = "/etc/resolv.conf") -> Upstream:
    """SANDLOT_UPSTREAM_DNS=IP[:port] (comma-separated for several; IPv6 as [addr]:port or bare), else
    the nameservers of /etc/resolv.conf."""
    from .. import _config

    value = ((_config.upstream_dns() if environ is None else environ.get("SANDLOT_UPSTREAM_DNS")) or "").strip()
    if value:
        return Upstream([_server(item.strip()) for item in value.split(",") if item.strip()])
    servers = []
    try:
        with open(resolv_conf) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    try:
                        servers.append((str(ipaddress.ip_address(parts[1].split("%", 1)[0])), 53))
                    except ValueError:
                        continue
    except OSError:
        pass
    return Upstream(servers)


def _server(text: str) -> tuple[str, int]:
    """'IP', 'IP:port', '[IPv6]:port' or a bare IPv6 address → (ip, port)."""
    host, port = text, "53"
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise InvalidRequest(f"SANDLOT_UPSTREAM_DNS={text!r}: expected IP[:port]")
            port = rest[1:]
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    try:
        address = ipaddress.ip_address(host)
        number = int(port)
        if not 1 <= number <= 65535:
            raise ValueError(port)
    except ValueError:
        raise InvalidRequest(f"SANDLOT_UPSTREAM_DNS={text!r}: expected IP[:port] (e.g. 192.0.2.53 or "
                             "[2001:db8::53]:53)") from None
    return str(address), number


# -- the responder ---------------------------------------------------------------------------------------
class DnsResponder:
    """Answers one sandbox's DNS. policy_getter() gives the current NetworkPolicy (None: nothing allowed),
    so an update applies to the next query. Every A/AAAA decision is logged (kind "dns")."""

    def __init__(self, policy_getter: Callable[[], Any], upstream: Upstream, synthetic: SyntheticAddresses,
                 log: Any, *, host_addresses: Optional[Iterable[Any]] = None) -> None:
        self.policy_getter = policy_getter
        self.upstream = upstream
        self.synthetic = synthetic
        self.log = log
        self.host_addresses = frozenset(policy_module.host_addresses() if host_addresses is None else host_addresses)
        self._in_flight = 0
        self._tcp_clients = 0

    async def handle(self, data: bytes) -> Optional[bytes]:
        """The answer to one query (wire format), or None when the packet deserves none (not a query)."""
        try:
            request = DNSRecord.parse(data)
        except Exception:  # noqa: BLE001 - garbage: FORMERR if it has a header to answer to, else silence
            return _formerr(data)
        if request.header.qr:  # a response, not a query: answering could start a loop
            return None
        reply = request.reply()
        reply.header.aa = 0
        if request.header.opcode != 0:
            reply.header.rcode = RCODE.NOTIMP
            return reply.pack()
        if len(request.questions) != 1:
            reply.header.rcode = RCODE.FORMERR
            return reply.pack()
        qname = str(request.q.qname)
        name = qname.rstrip(".").lower()
        qtype = QTYPE.get(request.q.qtype)
        if request.q.qclass != 1:  # IN only
            reply.header.rcode = RCODE.NOTIMP
            return reply.pack()
        policy = self.policy_getter()
        verdict = policy.check_name(name, None) if policy is not None else None
        if verdict is None or not verdict.allowed:
            reason = verdict.reason if verdict is not None else "no network policy"
            self._log(name, None, "deny", verdict.rule if verdict else None, f"{reason} (never forwarded)")
            reply.header.rcode = RCODE.NXDOMAIN
            return reply.pack()
        if qtype not in ADDRESS_TYPES:  # allowed name, other type (TXT, MX, HTTPS...): empty, not forwarded
            return reply.pack()
        try:
            answer = await self.upstream.resolve(name, qtype)
        except UpstreamError as exc:
            self._log(name, None, "deny", verdict.rule, f"upstream failed: {exc}")
            reply.header.rcode = RCODE.SERVFAIL
            return reply.pack()
        if answer.rcode != RCODE.NOERROR:
            self._log(name, None, "deny", verdict.rule, f"upstream answered {RCODE.get(answer.rcode)}")
            reply.header.rcode = RCODE.NXDOMAIN if answer.rcode == RCODE.NXDOMAIN else RCODE.SERVFAIL
            return reply.pack()
        for real in answer.addresses:
            special = policy.refuses_special(real, self.host_addresses)
            if special is not None:
                self._log(name, real, "deny", verdict.rule, f"rebinding: upstream answered {real} ({special})")
                reply.header.rcode = RCODE.NXDOMAIN
                return reply.pack()
        if not answer.addresses:  # mirror upstream: no records of this type, none of ours either
            return reply.pack()
        synthetic = self.synthetic.assign(name, answer.addresses)
        rdata = A(synthetic) if qtype == "A" else AAAA(synthetic)
        reply.add_answer(RR(request.q.qname, getattr(QTYPE, qtype), rdata=rdata, ttl=SYNTHETIC_TTL))
        self._log(name, answer.addresses[0], "allow", verdict.rule,
                  f"{qtype} {', '.join(answer.addresses)} as {synthetic}")
        return reply.pack()

    def _log(self, name: str, address: Optional[str], verdict: str, rule: Optional[str], reason: str) -> None:
        if self.log is not None:
            self.log.add({"kind": "dns", "name": name, "address": address, "port": None, "verdict": verdict,
                          "rule": rule, "reason": reason})

    async def serve_udp(self, sock: socket.socket) -> None:
        """Answer queries on a bound UDP socket until cancelled (the socket stays the caller's)."""
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        tasks: set[asyncio.Task] = set()
        try:
            while True:
                data, client = await loop.sock_recvfrom(sock, 65535)
                if len(tasks) >= MAX_IN_FLIGHT:
                    continue
                task = asyncio.ensure_future(self._answer_udp(sock, data, client))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            for task in tasks:
                task.cancel()

    async def _answer_udp(self, sock: socket.socket, data: bytes, client: Any) -> None:
        try:
            out = await self.handle(data)
            if out is not None:
                if len(out) > 512:  # classic UDP size: truncate, the client retries over TCP
                    out = _truncated(out)
                await asyncio.get_running_loop().sock_sendto(sock, out, client)
        except Exception:  # noqa: BLE001 - one bad packet must never cost the sandbox its DNS
            pass

    async def serve_tcp(self, sock: socket.socket) -> None:
        """Answer DNS over TCP on a listening socket until cancelled."""
        sock.setblocking(False)
        server = await asyncio.start_server(self._tcp_client, sock=sock)
        try:
            await asyncio.Future()  # until cancelled
        finally:
            server.close()

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._tcp_clients >= MAX_TCP_CLIENTS:
            writer.transport.abort()  # RST: the client learns at once (and may retry, or use UDP)
            return
        self._tcp_clients += 1
        try:
            while True:
                head = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE)
                data = await asyncio.wait_for(reader.readexactly(int.from_bytes(head, "big")), TCP_IDLE)
                out = await self.handle(data)
                if out is None:
                    break
                writer.write(len(out).to_bytes(2, "big") + out)
                await writer.drain()
        except Exception:  # noqa: BLE001 - short reads, timeouts, resets, a bug on one packet: close this one
            pass
        finally:
            self._tcp_clients -= 1
            writer.close()


def _formerr(data: bytes) -> Optional[bytes]:
    """FORMERR for a packet with a readable query header; None (no answer) for anything less."""
    if len(data) < 12 or data[2] & 0x80:  # too short, or the QR bit says it is a response
        return None
    header = DNSHeader(id=int.from_bytes(data[:2], "big"), qr=1, opcode=(data[2] >> 3) & 0xF, rcode=RCODE.FORMERR)
    return DNSRecord(header=header).pack()


def _truncated(wire: bytes) -> bytes:
    reply = DNSRecord.parse(wire)
    reply.rr, reply.auth, reply.ar = [], [], []
    reply.header.tc = 1
    return reply.pack()
