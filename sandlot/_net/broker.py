"""The per-sandbox broker (host side, asyncio): every TCP connection and DNS query a sandbox makes.

The sandbox's namespace (netns.configure) redirects all TCP to the broker's listener and all DNS to the
DNS responder, both on sockets the host opened in that namespace (netns.open_listeners). For each TCP
connection the broker:

1. asks the kernel where the client was going (SO_ORIGINAL_DST);
2. a synthetic address (handed out by our DNS for an allowed name) maps back to its NAME: the policy
   decides on (name, port), and the client's first bytes must ask for that same name (TLS SNI, or the
   HTTP/1 Host / absolute URL) - otherwise an allowed name's servers (a shared CDN address) would carry
   requests for any other site. The connection then goes to one of the name's REAL addresses, each
   checked again against the special ranges right before it is dialled (what is dialled is what was
   checked);
   any other address is an IP literal: only IP/CIDR rules (or "*" for public addresses) apply;
3. refused -> reset at once (RST: SO_LINGER 0), never "connected, then silence"; allowed -> bytes are
   spliced both ways and counted;
4. every decision goes to the DecisionLog; ``update(policy)`` re-checks open connections and cuts those
   no longer allowed ("revoked").

Data path: raw non-blocking sockets on the loop; once nothing more needs reading (TLS after its hello,
IP literals, other protocols), bytes move with splice(2) through a pipe, never copied into Python;
plaintext HTTP/1 is copied through the per-request Host check.

Secrets (``interceptor``) take over connections to their hosts after the checks above; see secrets.py.
Broker methods are not thread-safe: call them on the broker's loop.
"""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import itertools
import os
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

from . import peek
from .netns import Listeners, original_destination

PEEK_WAIT = 0.5          # how long the broker waits for a client's first bytes (server-speaks-first gets none)
HEAD_WAIT = 10.0         # how long a started but incomplete ClientHello / request head may take
CONNECT_TIMEOUT = 10.0   # per real address dialled
CHUNK = 256 * 1024
SPLICE_CHUNK = 1024 * 1024  # a pipe this large (pipe-max-size, 1 MiB by default) moves more per wakeup
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
MAX_CONNECTIONS = 1024   # open connections per sandbox: more are refused (each costs the host two fds)


class Interceptor(Protocol):
    """Takes over connections to some names (secret substitution terminates TLS for its hosts)."""

    def wants(self, name: str, port: int) -> bool: ...

    async def handle(self, client: tuple[asyncio.StreamReader, asyncio.StreamWriter], first: bytes,
                     name: str, port: int, addresses: list[str], broker: "Broker") -> None:
        """Serve the client (streams on its socket; ``first``: the bytes already read from it)."""


@dataclass
class _Connection:
    """An open, allowed connection (for update() and stats())."""

    id: int
    name: Optional[str]
    address: str            # the real address dialled
    dialled: str            # what the client dialled (synthetic or the literal)
    port: int
    rule: Optional[str]
    socks: list[socket.socket] = field(default_factory=list)  # client, upstream
    tasks: list[asyncio.Task] = field(default_factory=list)
    bytes_out: int = 0      # client -> upstream
    bytes_in: int = 0       # upstream -> client
    revoked: bool = False


class Refused(Exception):
    """A connection the broker will not carry; ``reason`` says why, ``rule`` which rule decided."""

    def __init__(self, reason: str, rule: Optional[str] = None, address: Optional[str] = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.rule = rule
        self.address = address  # the real address refused, when one was


def _plain_ip(text: str) -> str:
    """IPv4-mapped IPv6 (a v6 socket dialling a v4 address) is the v4 address it maps."""
    ip = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _linger0(sock: socket.socket) -> None:
    """Make the coming close() send RST: the peer learns at once (ECONNRESET), never a silent socket."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


async def _ready(loop: asyncio.AbstractEventLoop, sock: socket.socket, write: bool) -> None:
    """Wait until ``sock`` is readable (or writable); the registration never outlives the wait."""
    fd = sock.fileno()
    if fd < 0:
        raise ConnectionAbortedError("socket closed")
    waiter = loop.create_future()
    add, remove = (loop.add_writer, loop.remove_writer) if write else (loop.add_reader, loop.remove_reader)
    add(fd, lambda: waiter.done() or waiter.set_result(None))
    try:
        await waiter
    finally:
        remove(fd)


class Broker:
    """One sandbox's broker. ``await start(listeners)``; ``update(policy)``; ``stats()``; ``await close()``.

    ``policy``: a policy.NetworkPolicy (or None: nothing allowed). ``log``: a log.DecisionLog.
    ``upstream``: a dns.Upstream for the DNS responder. ``synthetic``: the dns.SyntheticAddresses shared
    with that responder (made here if not given). ``host_addresses``: this host's own addresses
    (policy.host_addresses() of the namespace the broker dials from, if not given).
    ``interceptor``: see Interceptor; it dials with ``open_upstream``.
    """

    def __init__(self, policy: Any, log: Any, upstream: Any = None, *, synthetic: Any = None,
                 host_addresses: Optional[frozenset] = None, interceptor: Optional[Interceptor] = None,
                 peek_wait: float = PEEK_WAIT, head_wait: float = HEAD_WAIT,
                 connect_timeout: float = CONNECT_TIMEOUT, max_connections: int = MAX_CONNECTIONS) -> None:
        from . import dns, policy as policy_module

        self.policy = policy
        self.log = log
        self.upstream = upstream
        self.synthetic = synthetic if synthetic is not None else dns.SyntheticAddresses()
        self.host_addresses = host_addresses if host_addresses is not None else policy_module.host_addresses()
        self.interceptor = interceptor
        self.peek_wait = peek_wait
        self.head_wait = head_wait
        self.connect_timeout = connect_timeout
        self.max_connections = max_connections
        self._tasks: list[asyncio.Task] = []   # accept loops and DNS servers
        self._handlers: set[asyncio.Task] = set()
        self._open: dict[int, _Connection] = {}
        self._ids = itertools.count(1)
        self._counts = {"connections": 0, "allowed": 0, "denied": 0, "revoked": 0, "failed": 0,
                        "bytes_out": 0, "bytes_in": 0}

    # -- lifecycle ---------------------------------------------------------------------------------------------

    async def start(self, listeners: Listeners) -> None:
        """Serve TCP on ``listeners.tcp`` and DNS on ``listeners.dns_udp`` / ``dns_tcp``."""
        for sock in listeners.tcp:
            sock.setblocking(False)
            self._tasks.append(asyncio.ensure_future(self._accept_loop(sock)))
        if listeners.dns_udp or listeners.dns_tcp:
            from .dns import DnsResponder

            responder = DnsResponder(lambda: self.policy, self.upstream, self.synthetic, self.log,
                                     host_addresses=self.host_addresses)
            for sock in listeners.dns_udp:
                self._tasks.append(asyncio.ensure_future(responder.serve_udp(sock)))
            for sock in listeners.dns_tcp:
                self._tasks.append(asyncio.ensure_future(responder.serve_tcp(sock)))

    async def close(self) -> None:
        """Stop serving; cut every open connection (both sides). The listening sockets stay the caller's."""
        for task in self._tasks:
            task.cancel()
        for conn in list(self._open.values()):
            self._cut(conn)
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._tasks, *self._handlers, return_exceptions=True)

    # -- policy ------------------------------------------------------------------------------------------------

    def update(self, policy: Any) -> list[dict]:
        """Apply a new policy now: later connections and DNS see it; open ones no longer allowed are cut.

        Returns the log entries of the connections cut.
        """
        self.policy = policy
        cut = []
        for conn in list(self._open.values()):
            try:
                rule = self._recheck(conn)
            except Refused as refusal:
                self._cut(conn)
                self._counts["revoked"] += 1
                cut.append(self._record("revoked", conn.name, conn.address, conn.port, refusal.rule, refusal.reason))
            else:
                conn.rule = rule
        return cut

    def _recheck(self, conn: _Connection) -> Optional[str]:
        if conn.name is not None:
            self._verdict(self._check_name(conn.name, conn.port))
        return self._verdict(self._check_address(conn.address, conn.port, conn.name))

    def _denies_names(self) -> bool:
        return self.policy is not None and any(rule.kind != "net" for rule in self.policy.deny)

    def _check_name(self, name: str, port: int) -> Any:
        return self.policy.check_name(name, port) if self.policy is not None else None

    def _check_address(self, address: str, port: int, name: Optional[str]) -> Any:
        if self.policy is None:
            return None
        return self.policy.check_address(address, port, name=name, host_addresses=self.host_addresses)

    @staticmethod
    def _verdict(verdict: Any) -> Optional[str]:
        """The deciding rule of an allowing verdict; raises Refused for a refusing one (or no policy)."""
        if verdict is None:
            raise Refused("no network policy")
        if not verdict.allowed:
            raise Refused(verdict.reason, verdict.rule)
        return verdict.rule

    # -- observations ----------------------------------------------------------------------------------------------

    def stats(self) -> dict:
        """Counters: connections (accepted), allowed, denied, revoked, failed (allowed, upstream
        unreachable), open, bytes_out (sandbox -> internet), bytes_in; per open connection too."""
        counts = dict(self._counts)
        counts["bytes_out"] += sum(c.bytes_out for c in self._open.values())
        counts["bytes_in"] += sum(c.bytes_in for c in self._open.values())
        counts["open"] = len(self._open)
        counts["open_connections"] = [
            {"id": c.id, "name": c.name, "address": c.address, "port": c.port, "rule": c.rule,
             "bytes_out": c.bytes_out, "bytes_in": c.bytes_in} for c in self._open.values()]
        return counts

    def _record(self, verdict: str, name: Optional[str], address: Optional[str], port: Optional[int],
                rule: Optional[str], reason: str) -> dict:
        entry = {"time": time.time(), "kind": "tcp", "name": name, "address": address, "port": port,
                 "verdict": verdict, "rule": rule, "reason": reason}
        if self.log is not None:
            self.log.add(entry)
        return entry

    # -- one connection -------------------------------------------------------------------------------------------

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                client, _ = await loop.sock_accept(listener)
            except OSError:  # EMFILE and friends: back off instead of spinning
                await asyncio.sleep(0.1)
                continue
            client.setblocking(False)
            task = asyncio.ensure_future(self._handle(client))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    async def _handle(self, client: socket.socket) -> None:
        self._counts["connections"] += 1
        owned = [client]  # every socket of this connection: closed here, whatever happens
        try:
            await self._serve(client, owned)
        except asyncio.CancelledError:
            for sock in owned:
                _linger0(sock)
            raise
        finally:
            for sock in owned:
                sock.close()

    async def _serve(self, client: socket.socket, owned: list[socket.socket]) -> None:
        """Decide, dial, splice. Sockets it opens go to ``owned`` (the caller closes them)."""
        name: Optional[str] = None
        dialled, port, reals = "?", 0, []
        try:
            try:
                dialled, port = original_destination(client)
                dialled = _plain_ip(dialled)
            except (OSError, ValueError):
                raise Refused("no original destination") from None
            if len(self._handlers) > self.max_connections:
                raise Refused(f"too many connections (at most {self.max_connections} at once)")
            name, reals = self._name_of(dialled)
            first, check = b"", None
            if name is not None:
                self._verdict(self._check_name(name, port))
                first, seen = await self._first_bytes(client)
                check = _ClientCheck(name, first, seen)
                candidates = reals
            else:
                candidates = [dialled]
                if self._denies_names():
                    # An IP literal may still NAME a denied site (Host, SNI: curl --resolve, an address
                    # from DoH): refuse that. Best effort - a client naming nothing is not caught - and
                    # only while a name deny rule exists (a silent client then waits the short peek).
                    self._verdict(self._check_address(dialled, port, None))  # refused anyway: at once
                    first, seen = await self._first_bytes(client)
                    asked = self._check_name(seen.host, port) if seen is not None and seen.host else None
                    if asked is not None and not asked.allowed and asked.rule is not None:
                        raise Refused(f"denied name by its address: {seen.protocol} asks for {seen.host}",
                                      asked.rule)
            rule, address = self._first_allowed(candidates, port, name)
        except Refused as refusal:
            # logged with the real address (the synthetic one means nothing outside this broker)
            address = refusal.address or (reals[0] if reals else dialled)
            self._counts["denied"] += 1
            self._record("deny", name, address, port, refusal.rule, refusal.reason)
            _linger0(client)
            return

        if self.interceptor is not None and name is not None and self.interceptor.wants(name, port):
            self._counts["allowed"] += 1
            self._record("allow", name, address, port, rule, "intercepted")
            # registered like any open connection, so that update() cuts it (cancels this task) if revoked
            conn = _Connection(next(self._ids), name, address, dialled, port, rule, socks=[client],
                               tasks=[asyncio.current_task()])
            self._open[conn.id] = conn
            reader, writer = await asyncio.open_connection(sock=client.dup(), limit=CHUNK)
            try:
                await self.interceptor.handle((reader, writer), first, name, port, candidates, self)
            finally:
                self._open.pop(conn.id, None)
                writer.close()
            return

        dialled_up = await self._dial_socket(candidates, address, port, name)
        if dialled_up is None:
            self._counts["failed"] += 1
            self._record("deny", name, address, port, rule, "upstream unreachable")
            _linger0(client)
            return
        upstream, address = dialled_up
        owned.append(upstream)
        conn = _Connection(next(self._ids), name, address, dialled, port, rule, socks=[client, upstream])
        try:
            conn.rule = self._recheck(conn)  # the policy may have changed while we peeked and dialled
        except Refused as refusal:
            self._counts["denied"] += 1
            self._record("deny", name, address, port, refusal.rule, refusal.reason)
            _linger0(client)
            _linger0(upstream)
            return
        self._counts["allowed"] += 1
        self._record("allow", name, address, port, conn.rule, "allowed")
        self._open[conn.id] = conn
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # forward each write as it comes
        try:
            loop = asyncio.get_running_loop()
            if check is not None:
                first = check.first
            if first:  # checked already (a silent client has none: its first bytes are checked as they come)
                await loop.sock_sendall(upstream, first)
                conn.bytes_out += len(first)
            conn.tasks = [asyncio.ensure_future(self._pump(client, upstream, conn, "bytes_out", check)),
                          asyncio.ensure_future(self._pump(upstream, client, conn, "bytes_in", check, True))]
            await asyncio.gather(*conn.tasks, return_exceptions=True)
        except OSError:
            conn.revoked = True
        finally:
            self._open.pop(conn.id, None)
            self._counts["bytes_out"] += conn.bytes_out
            self._counts["bytes_in"] += conn.bytes_in
            if conn.revoked:
                _linger0(client)
                _linger0(upstream)

    def _name_of(self, address: str) -> tuple[Optional[str], list[str]]:
        """(name, real addresses) for a synthetic address; (None, []) for anything else (a literal)."""
        found = self.synthetic.lookup(address)
        if found is None:
            if self.synthetic.is_synthetic(address):
                raise Refused("unknown synthetic address (not handed out by this sandbox's DNS)")
            return None, []
        name, reals = found
        return name, list(reals)

    def _first_allowed(self, candidates: list[str], port: int, name: Optional[str]) -> tuple[Optional[str], str]:
        """The deciding rule and the first candidate address the policy allows (Refused if none)."""
        refusal = Refused("the name has no address")
        for address in candidates:
            try:
                return self._verdict(self._check_address(address, port, name)), address
            except Refused as r:
                refusal = r
                refusal.address = address
        raise refusal

    async def _first_bytes(self, client: socket.socket) -> tuple[bytes, Optional[peek.FirstBytes]]:
        """Read (and keep) the client's first bytes: (data, what they ask for), or (data, None) for a
        client still silent after the short wait (a server-speaks-first protocol): its first bytes are
        then checked when they come, before any is forwarded (_ClientCheck)."""
        data = b""
        loop = asyncio.get_running_loop()
        started = loop.time()
        while True:
            try:
                return data, peek.classify(data)
            except peek.NeedMore:
                pass
            if len(data) >= peek.MAX_PEEK:
                raise Refused("first bytes too large to check")
            remaining = started + (self.head_wait if data else self.peek_wait) - loop.time()
            if remaining <= 0:
                if not data:
                    return data, None
                raise Refused("incomplete TLS ClientHello or HTTP request head")
            try:
                more = await asyncio.wait_for(loop.sock_recv(client, peek.MAX_PEEK - len(data)), remaining)
            except asyncio.TimeoutError:
                continue
            except OSError:
                raise Refused("client reset before asking for anything") from None
            if not more:
                raise Refused("client closed before asking for anything")
            data += more

    async def open_upstream(self, addresses: list[str], port: int, name: Optional[str]
                            ) -> Optional[tuple[asyncio.StreamReader, asyncio.StreamWriter, str]]:
        """For interceptors: streams to the first of ``addresses`` the policy allows (each checked right
        before it is dialled) that answers, and the address; None if none."""
        got = await self._dial_socket(addresses, addresses[0], port, name) if addresses else None
        if got is None:
            return None
        sock, address = got
        try:
            reader, writer = await asyncio.open_connection(sock=sock, limit=CHUNK)
        except BaseException:
            sock.close()
            raise
        return reader, writer, address

    async def _dial_socket(self, candidates: list[str], first: str, port: int,
                           name: Optional[str]) -> Optional[tuple[socket.socket, str]]:
        """Connect to ``first``, then to the other allowed candidates; each is checked right before."""
        loop = asyncio.get_running_loop()
        ordered = [first] + [a for a in candidates if a != first]
        for address in ordered:
            try:
                self._verdict(self._check_address(address, port, name))
            except Refused:
                continue
            sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await asyncio.wait_for(loop.sock_connect(sock, (address, port)), self.connect_timeout)
                return sock, address
            except (OSError, asyncio.TimeoutError):
                sock.close()
            except BaseException:
                sock.close()
                raise
        return None

    async def _pump(self, src: socket.socket, dst: socket.socket, conn: _Connection, counter: str,
                    check: Optional["_ClientCheck"] = None, upstream_side: bool = False) -> None:
        """Move bytes src -> dst until EOF (then half-close dst); a reset on either side resets both.

        While ``check`` has something to check the bytes are copied through it (the client's, or for
        ``upstream_side`` the server's, which may release held client bytes); then they are spliced.
        """
        loop = asyncio.get_running_loop()
        try:
            while check is not None and not check.done:
                data = await loop.sock_recv(src, CHUNK)
                if not data:
                    break
                async with check.lock:
                    try:
                        if upstream_side:
                            released = check.response(data)
                        else:
                            data = check.feed(data)
                    except Refused as refusal:
                        self._counts["denied"] += 1
                        self._record("deny", conn.name, conn.address, conn.port, refusal.rule, refusal.reason)
                        self._cut(conn)
                        return
                    if upstream_side and released:
                        await loop.sock_sendall(src, released)  # to the server, in order (under the lock)
                        conn.bytes_out += len(released)
                    elif not upstream_side:
                        await loop.sock_sendall(dst, data)
                        setattr(conn, counter, getattr(conn, counter) + len(data))
                if upstream_side:
                    await loop.sock_sendall(dst, data)
                    setattr(conn, counter, getattr(conn, counter) + len(data))
            else:
                await self._splice(src, dst, conn, counter)
            dst.shutdown(socket.SHUT_WR)  # half-close: the other direction may still be talking
        except OSError:
            self._cut(conn)

    async def _splice(self, src: socket.socket, dst: socket.socket, conn: _Connection, counter: str) -> None:
        """src -> pipe -> dst with splice(2): the bytes never enter Python."""
        loop = asyncio.get_running_loop()
        pipe_out, pipe_in = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
        try:
            try:
                fcntl.fcntl(pipe_in, F_SETPIPE_SZ, SPLICE_CHUNK)
            except OSError:
                pass  # the default pipe size (64 KiB) works, in smaller steps
            while True:
                try:
                    n = os.splice(src.fileno(), pipe_in, SPLICE_CHUNK, flags=flags)
                except BlockingIOError:
                    await _ready(loop, src, write=False)
                    continue
                if n == 0:
                    return
                while n:
                    try:
                        moved = os.splice(pipe_out, dst.fileno(), n, flags=flags)
                    except BlockingIOError:
                        await _ready(loop, dst, write=True)
                        continue
                    n -= moved
                    setattr(conn, counter, getattr(conn, counter) + moved)
        finally:
            os.close(pipe_out)
            os.close(pipe_in)

    def _cut(self, conn: _Connection) -> None:
        """Reset both sides: the pumps stop (cancelled), then the handler closes both sockets with RST."""
        conn.revoked = True
        for sock in conn.socks:
            _linger0(sock)
        for task in conn.tasks:
            if task is not asyncio.current_task():
                task.cancel()


def _check_seen(seen: peek.FirstBytes, name: str) -> None:
    """Refused unless the client's first bytes ask for ``name`` (or are of a protocol that names none)."""
    if seen.problem:
        raise Refused(f"{seen.protocol}: {seen.problem}")
    if seen.protocol == "tls" and not peek.same_host(seen.host, name):
        raise Refused(f"sni-mismatch: dialled {name}, TLS asks for {seen.host or 'no name'}")
    if seen.protocol == "http" and not peek.same_host(seen.host, name):
        raise Refused(f"host-mismatch: dialled {name}, HTTP asks for {seen.host or 'no host'}")


class _ClientCheck:
    """What a named connection's client sends must keep asking for that name.

    - first bytes seen in time: checked before dialling (Refused there);
    - a client silent through the short wait (server-speaks-first): its first bytes are held back and
      checked when complete, so waiting cannot smuggle a TLS hello or a request for another host;
    - plaintext HTTP/1: every later request on the connection is checked too (keep-alive, pipelining,
      declined upgrades: see peek.HttpRequests), which needs the server's answers to upgrades.
    TLS after the hello is opaque (nothing more can be checked without terminating it). ``done``: nothing
    more to check (the pumps then splice). ``lock``: held around checking + writing to the server, so
    bytes released by ``response()`` cannot overtake or be overtaken by the client's next ones.
    """

    def __init__(self, name: str, first: bytes, seen: Optional[peek.FirstBytes]) -> None:
        self.name = name
        self.seen = seen
        self.pending = b""
        self.lock = asyncio.Lock()
        self.http: Optional[peek.HttpRequests] = None
        if seen is not None:
            _check_seen(seen, name)
            if seen.protocol == "http":
                self.http = peek.HttpRequests(name)
                first = self._settle(self.http.feed(first))  # an Upgrade's followers are held
        self.first = first  # what of the first bytes goes to the server right away
        self.done = seen is not None and self.http is None

    def feed(self, data: bytes) -> bytes:
        """The client's bytes to forward now (b"" while held); Refused to cut."""
        if self.seen is None:
            self.pending += data
            try:
                self.seen = peek.classify(self.pending)
            except peek.NeedMore:
                if len(self.pending) >= peek.MAX_PEEK:
                    raise Refused("first bytes too large to check") from None
                return b""
            data, self.pending = self.pending, b""
            _check_seen(self.seen, self.name)
            if self.seen.protocol != "http":
                self.done = True
                return data
            self.http = peek.HttpRequests(self.name)
        return self._settle(self.http.feed(data))

    def response(self, data: bytes) -> bytes:
        """The server sent ``data``: client bytes released by it (to forward to the server); Refused to cut."""
        if self.http is None:
            return b""
        return self._settle(self.http.response(data))

    def _settle(self, outcome: tuple[bytes, Optional[str]]) -> bytes:
        forward, problem = outcome
        if problem:
            raise Refused(problem)
        if self.http is not None and self.http.opaque:
            self.done = True
        return forward
