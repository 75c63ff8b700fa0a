"""The secrets interceptor: HTTPS to a secret's host, read in clear on the host, secrets put in headers.

The broker hands over a TCP connection whose name (from the synthetic address, checked against the SNI)
is a host of some secret: `Broker(..., interceptor=SecretsInterceptor(secrets, ca))` (the broker's
Interceptor protocol: `wants(name, port)`, `handle(...)`), which calls `intercept(...)` with the broker's
own checked dial. From there, per connection:

1. TLS from the sandbox is terminated with a leaf for the SNI from the sandbox's CA (ALPN: http/1.1 only,
   so clients do not try HTTP/2 on it).
2. Each HTTP/1.1 request is parsed (h11) and checked BEFORE anything is sent upstream:
   Host must equal the SNI; the target must be origin-form ("/path?query") and hold no placeholder;
   placeholders in header values are replaced by the values of the secrets allowed for this host
   (also inside "Authorization: Basic base64(user:placeholder)"); a placeholder of a secret that is not
   for this host, in a header name, in the URL, in the body or in trailers → HTTP 403 made here; Upgrade
   (WebSocket) and CONNECT → 403. A refused request is never forwarded, neither with the placeholder nor
   with the value, and the connection is closed after the 403.
3. Upstream is dialled (the broker's `dial`, which picks and checks the real address) only when the first
   acceptable request is ready, with TLS verified against the host trust store; a failure → HTTP 502 made
   here, nothing sent.
4. The response streams back (content-length, chunked or close-delimited; 1xx passed on); secret values
   that an upstream echoes in response HEADERS are replaced by their placeholders. Response BODIES are
   not scanned (they stream, and may be compressed): a host in a secret's list is trusted not to echo
   the credential in a body. Keep-alive: requests follow one another on the same connections.
5. Every request decision is logged (method, path without query, secrets used, status), never a value.
6. Before each request the policy is asked again (`recheck`): once the name is revoked, the next request
   on a kept-alive connection gets a 403 ("revoked"); cancelling the task cuts both sides at once.

Bodies up to `body_buffer` bytes are held until complete, so a placeholder anywhere in them stops the
request before a byte leaves. A longer body streams after that much was checked, always holding back the
last len(placeholder)-1 bytes: a placeholder found later never leaves either, the upstream connection is
reset (the upstream sees a truncated request, which HTTP makes it discard), the sandbox gets the 403.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import socket
import ssl
import struct
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import h11

from sandlot._net.secrets import PLACEHOLDER_LENGTH, Secret, SecretSet
from sandlot._net.tls import SandboxCA, upstream_context
from sandlot._net.tlsstream import TlsStream

Dial = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]
Log = Callable[[dict], None]

# A request body up to this size is held (and checked) before anything goes upstream; beyond it, it
# streams, still guarded. Per connection, so it bounds what a sandbox can make the host hold.
BODY_BUFFER = 256 * 1024
MAX_HEAD = 64 * 1024          # request line + headers from the sandbox
MAX_UPSTREAM_HEAD = 256 * 1024  # response head from the upstream (large cookies and policies exist)
HANDSHAKE_TIMEOUT = 10.0
IDLE_TIMEOUT = 120.0          # between two requests of a keep-alive connection
DIAL_TIMEOUT = 30.0           # TCP connect + upstream TLS handshake
LINGER_SECONDS = 2.0          # after a refusal: drain the sandbox's unsent body this long...
LINGER_BYTES = 8 * 1024 * 1024  # ...or this much, so that it reads the 403 instead of a reset


@dataclass
class InterceptStats:
    """What one intercepted connection did (returned by `intercept`, for the broker's counters)."""

    requests: int = 0
    refused: int = 0
    bytes_from_sandbox: int = 0   # TLS bytes on the sandbox side
    bytes_to_sandbox: int = 0
    bytes_to_upstream: int = 0    # TLS bytes on the upstream side
    bytes_from_upstream: int = 0
    secrets_used: set[str] = field(default_factory=set)


class _Refused(Exception):
    """A request that must not go upstream: answered here with `status` and closed."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class _ClientGone(Exception):
    """The sandbox side closed or broke the connection."""


async def intercept(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter, *,
                    sni: str, secrets: SecretSet, ca: SandboxCA, dial: Dial, log: Log, port: int = 443,
                    initial: bytes = b"", upstream_ssl: ssl.SSLContext | None = None,
                    body_buffer: int = BODY_BUFFER, idle_timeout: float = IDLE_TIMEOUT,
                    handshake_timeout: float = HANDSHAKE_TIMEOUT,
                    recheck: Callable[[], str | None] | None = None) -> InterceptStats:
    """Serve one connection from the sandbox to `sni` (see the module docstring); close it when done.

    client_reader/client_writer: the accepted connection (the broker may have peeked at it; bytes it
      already consumed from the reader go in `initial`, MSG_PEEK'd bytes need nothing).
    sni: the name the sandbox dialled, already checked by the broker against its SNI (checked again in
      the handshake). port: the port it dialled (a Host header "name:port" must carry this one).
    dial(): opens the plain TCP connection to the real upstream address (the broker chooses and checks
      it); called lazily, again after an upstream closes a keep-alive connection.
    log(entry): one dict per decision, in DecisionLog's form ({"time", "kind": "tcp", "name",
      "address": None, "port", "verdict": "allow"|"deny"|"revoked", "rule": None, "reason"}; the reason
      reads "https: <decision>; GET /path -> 200") plus "method", "path", "secrets" (names), "status".
    recheck(): called before each request is forwarded; a string (the reason) means the policy no longer
      allows this connection: that request gets a 403 and the connection ends (logged "revoked").
    upstream_ssl: verifies upstream (default: the host trust store, $SSL_CERT_FILE honoured).
    Cancelling the task (the broker revoking the connection) closes both sides.
    """
    try:
        session = _Session(client_reader, client_writer, sni=sni, secrets=secrets, ca=ca, dial=dial,
                           log=log, port=port, initial=initial,
                           upstream_ssl=upstream_ssl or upstream_context(), body_buffer=body_buffer,
                           idle_timeout=idle_timeout, handshake_timeout=handshake_timeout,
                           recheck=recheck)
    except Exception as e:  # the CA may not mint for this name: a broker bug, refused all the same
        _reset(client_writer)
        log({"time": time.time(), "kind": "tcp", "name": sni, "address": None, "port": port,
             "verdict": "deny", "rule": None, "reason": f"https: client-tls: {_short(e)}", "method": None,
             "path": None, "secrets": [], "status": None})
        return InterceptStats()
    try:
        await session.run()
    finally:
        session.close_all()
    return session.stats


class SecretsInterceptor:
    """The broker's `interceptor` (broker.py's Interceptor protocol) for one sandbox's secrets.

    `Broker(..., interceptor=SecretsInterceptor(secrets, ca))`. The broker has already decided the
    connection is allowed and that its TLS SNI is the dialled name; this takes it over from there.
    Only TLS connections on `ports` (default 443) to a secret's host are intercepted: other ports (git over
    SSH to the same host, say) stay plain spliced connections of the broker. A non-TLS stream on such a
    port is refused (logged): a placeholder can only be substituted inside HTTPS.
    """

    def __init__(self, secrets: SecretSet, ca: SandboxCA, *, ports: tuple[int, ...] = (443,),
                 upstream_ssl: ssl.SSLContext | None = None, **options) -> None:
        self.secrets = secrets
        self.ca = ca
        self.ports = tuple(ports)
        self.upstream_ssl = upstream_ssl
        self.options = options  # body_buffer, idle_timeout, handshake_timeout (intercept's keywords)
        self.totals = InterceptStats()

    def wants(self, name: str, port: int) -> bool:
        return port in self.ports and self.secrets.covers(name)

    async def handle(self, client: tuple[asyncio.StreamReader, asyncio.StreamWriter], first: bytes,
                     name: str, port: int, addresses: list[str], broker) -> None:
        reader, writer = client
        log = broker.log.add if getattr(broker, "log", None) is not None else (lambda entry: None)
        if not first.startswith(b"\x16"):  # a TLS record of type handshake (the ClientHello)
            log({"time": time.time(), "kind": "tcp", "name": name, "address": None, "port": port,
                 "verdict": "deny", "rule": None,
                 "reason": "https: not-tls: a secret's host is only reachable over TLS on this port"})
            _reset(writer)
            return

        async def dial():
            # The broker's own dial: each candidate address is checked against the policy right before.
            got = await broker.open_upstream(addresses, port, name)  # each address checked before its dial
            if got is None:
                raise ConnectionError("no allowed address of the name answered")
            reader, writer, _address = got
            return reader, writer

        def recheck() -> str | None:
            policy = broker.policy
            if policy is None:
                return "no network policy"
            verdict = policy.check_name(name, port)
            return None if verdict.allowed else verdict.reason

        stats = await intercept(reader, writer, sni=name, secrets=self.secrets, ca=self.ca, dial=dial,
                                log=log, port=port, initial=first, upstream_ssl=self.upstream_ssl,
                                recheck=recheck, **self.options)
        total = self.totals
        total.requests += stats.requests
        total.refused += stats.refused
        total.bytes_from_sandbox += stats.bytes_from_sandbox
        total.bytes_to_sandbox += stats.bytes_to_sandbox
        total.bytes_to_upstream += stats.bytes_to_upstream
        total.bytes_from_upstream += stats.bytes_from_upstream
        total.secrets_used |= stats.secrets_used


class _Session:
    def __init__(self, client_reader, client_writer, *, sni, secrets, ca, dial, log, port, initial,
                 upstream_ssl, body_buffer, idle_timeout, handshake_timeout, recheck) -> None:
        self.sni = sni.rstrip(".").lower()
        self.secrets: SecretSet = secrets
        self.allowed: tuple[Secret, ...] = secrets.for_host(self.sni)
        self.ca = ca
        self.dial = dial
        self.log_sink = log
        self.port = port
        self.upstream_ssl = upstream_ssl
        self.body_buffer = max(body_buffer, 0)
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout
        self.recheck = recheck
        self.client_writer = client_writer
        self.client = TlsStream(client_reader, client_writer, ca.server_context(self.sni), server_side=True,
                                initial=initial)
        self.srv = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.upstream: TlsStream | None = None
        self.upstream_writer: asyncio.StreamWriter | None = None
        self.up: h11.Connection | None = None
        self.stats = InterceptStats()

    # -- logging ------------------------------------------------------------------------------------------

    def log(self, verdict: str, reason: str, *, method: bytes | None = None, target: bytes | None = None,
            used: list[str] | None = None, status: int | None = None) -> None:
        path = None
        if target is not None:
            # The path only: a query string may hold data that is none of the log's business.
            path = target.split(b"?", 1)[0].decode("latin-1")[:512]
        method_text = method.decode("latin-1")[:32] if method is not None else None
        text = f"https: {reason}"
        if method_text is not None:
            text += f"; {method_text} {path}" + (f" -> {status}" if status is not None else "")
        self.log_sink({
            "time": time.time(), "kind": "tcp", "name": self.sni, "address": None, "port": self.port,
            "verdict": verdict, "rule": None, "reason": text,
            "method": method_text, "path": path, "secrets": used or [], "status": status,
        })

    # -- the connection's life --------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await asyncio.wait_for(self.client.handshake(), self.handshake_timeout)
        except (ssl.SSLError, OSError, ConnectionError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
            # Typically a client that does not trust the sandbox CA (no bundle variables) or another SNI.
            self.log("deny", f"client-tls: handshake with the sandbox failed ({_short(e)})")
            return
        while True:
            try:
                request = await self._next_request()
            except _ClientGone:
                return
            except _Refused as r:
                await self._refuse(r, None)
                return
            if request is None:
                await self._close_gracefully()
                return
            try:
                keep_going = await self._handle(request)
            except _Refused as r:
                await self._refuse(r, request)
                return
            except _ClientGone:
                return
            if not keep_going:
                await self._close_gracefully()
                return

    async def _close_gracefully(self) -> None:
        self._drop_upstream(graceful=True)
        with contextlib.suppress(ssl.SSLError, OSError, ConnectionError):
            await self.client.close()

    def close_all(self) -> None:
        self._drop_upstream(graceful=False)
        self.stats.bytes_from_sandbox = self.client.raw_in
        self.stats.bytes_to_sandbox = self.client.raw_out
        with contextlib.suppress(Exception):
            self.client_writer.close()

    # -- sandbox side -------------------------------------------------------------------------------------

    async def _client_event(self, timeout: float | None = None):
        while True:
            try:
                event = self.srv.next_event()
            except h11.RemoteProtocolError as e:
                raise _Refused(400, "bad-request", f"malformed HTTP/1.1 request: {e}") from None
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await asyncio.wait_for(self.client.recv(), timeout or self.idle_timeout)
            except asyncio.TimeoutError:
                raise _ClientGone() from None
            except (ssl.SSLError, OSError, ConnectionError) as e:
                raise _ClientGone() from e
            self.srv.receive_data(data)

    async def _to_client(self, event) -> None:
        try:
            data = self.srv.send(event)
        except h11.LocalProtocolError as e:  # an upstream response h11 will not re-send: cut, do not guess
            raise _ClientGone() from e
        if data:
            try:
                await self.client.send(data)
            except (ssl.SSLError, OSError, ConnectionError) as e:
                raise _ClientGone() from e

    async def _next_request(self) -> h11.Request | None:
        event = await self._client_event(self.idle_timeout)
        if isinstance(event, h11.ConnectionClosed):
            return None
        if not isinstance(event, h11.Request):  # h11 yields a Request first; anything else is a bug
            raise _Refused(400, "bad-request", "expected an HTTP request")
        return event

    async def _refuse(self, refusal: _Refused, request: h11.Request | None) -> None:
        """Answer with a response made here, then close. Raw bytes: h11 may be in an error state."""
        self.stats.refused += 1
        method = request.method if request is not None else None
        target = request.target if request is not None else None
        verdict = "revoked" if refusal.code == "revoked" else "deny"
        self.log(verdict, f"{refusal.code}: {refusal.message}", method=method, target=target,
                 status=refusal.status)
        body = (f"Sandlot refused this request ({refusal.code}): {refusal.message}\n").encode()
        reason = {400: "Bad Request", 403: "Forbidden", 502: "Bad Gateway"}.get(refusal.status, "Error")
        head = (f"HTTP/1.1 {refusal.status} {reason}\r\n"
                "Content-Type: text/plain; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\n"
                f"X-Sandlot-Refused: {refusal.code}\r\n"
                "Connection: close\r\n\r\n").encode()
        with contextlib.suppress(ssl.SSLError, OSError, ConnectionError):
            await self.client.send(head + body)
        await self.client.close_notify()
        # Closing with unread bytes (the rest of a refused body) makes the kernel send RST, and a client
        # still writing would lose the 403 it has not read yet: drain for a moment first (a "lingering
        # close", as HTTP servers do).
        await self.client.drain_raw(LINGER_SECONDS, LINGER_BYTES)
        self.client.abort_quietly(graceful=True)

    # -- one request ------------------------------------------------------------------------------------

    async def _handle(self, request: h11.Request) -> bool:
        """Check, forward and answer one request. True: the connection may carry another one."""
        headers, used = self._checked_headers(request)
        if self.recheck is not None:
            reason = self.recheck()
            if reason is not None:
                raise _Refused(403, "revoked", f"the network policy no longer allows {self.sni}: {reason}")
        if self.srv.they_are_waiting_for_100_continue:
            # The body is checked here before it goes anywhere, so "Expect" is answered here, not upstream.
            await self._to_client(h11.InformationalResponse(status_code=100, headers=[]))
        outgoing = h11.Request(method=request.method, target=request.target, headers=headers,
                               http_version="1.1")

        guard = _BodyGuard(self.secrets)
        held: list[bytes] = []
        held_size = 0
        sent_head = False
        while True:
            event = await self._client_event()
            if isinstance(event, h11.Data):
                released = guard.push(bytes(event.data))
                if released is None:
                    if sent_head:
                        self._drop_upstream(graceful=False)
                    raise _Refused(403, "placeholder-in-body",
                                   "a secret placeholder is in the request body; secrets are only "
                                   "substituted in headers")
                if sent_head:
                    if released:
                        await self._to_upstream(h11.Data(data=released))
                    continue
                held.append(released)
                held_size += len(released)
                if held_size > self.body_buffer:
                    # Too large to hold: what was checked goes now, the rest streams (still guarded).
                    await self._open_upstream(request)
                    await self._to_upstream(outgoing, h11.Data(data=b"".join(held)))
                    sent_head = True
                    held = []
            elif isinstance(event, h11.EndOfMessage):
                if event.headers and self.secrets.contains_placeholder(
                        b"".join(n + b":" + v for n, v in event.headers), ignore_case=True):
                    if sent_head:
                        self._drop_upstream(graceful=False)
                    raise _Refused(403, "placeholder-in-body",
                                   "a secret placeholder is in the request trailers")
                events = [] if sent_head else [outgoing]
                body = b"".join(held) + guard.finish()
                if body:
                    events.append(h11.Data(data=body))
                events.append(h11.EndOfMessage(headers=list(event.headers)))
                if not sent_head:
                    await self._open_upstream(request)
                await self._to_upstream(*events)  # a small request leaves in one TLS write
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise _ClientGone()
            else:
                raise _Refused(400, "bad-request", f"unexpected {type(event).__name__} in a request")

        self.stats.requests += 1
        self.stats.secrets_used.update(used)
        await self._relay_response(request, used)
        return self._next_cycle()

    def _checked_headers(self, request: h11.Request) -> tuple[list[tuple[bytes, bytes]], list[str]]:
        """The headers to send upstream, secrets substituted, or _Refused. Nothing here touches upstream."""
        if request.method == b"CONNECT":
            raise _Refused(403, "connect", "CONNECT is not supported on a connection that carries secrets")
        names = [name for name, _ in request.headers]
        if b"upgrade" in names:
            raise _Refused(403, "upgrade", "protocol upgrades (WebSocket, h2c) are not supported on a "
                                           "connection that carries secrets")
        hosts = [value for name, value in request.headers if name == b"host"]
        if len(hosts) != 1:
            raise _Refused(403, "host-mismatch", "the request must carry exactly one Host header")
        if not self._host_ok(hosts[0]):
            raise _Refused(403, "host-mismatch",
                           f"Host {hosts[0].decode('latin-1')[:200]!r} is not {self.sni!r}, the name this "
                           "TLS connection was opened for")
        target = request.target
        if not (target.startswith(b"/") or (target == b"*" and request.method == b"OPTIONS")):
            raise _Refused(403, "target-form", "the request target must be a path (origin-form), "
                                               "not an absolute URL")
        if (self.secrets.contains_placeholder(target)
                or self.secrets.contains_placeholder(urllib.parse.unquote_to_bytes(target))):
            raise _Refused(403, "placeholder-in-url", "a secret placeholder is in the URL; secrets are only "
                                                      "substituted in headers")

        used: dict[str, Secret] = {}
        out: list[tuple[bytes, bytes]] = []
        chunked = any(n == b"transfer-encoding" for n in names)
        for name, value in request.headers:
            if self.secrets.contains_placeholder(name, ignore_case=True):
                raise _Refused(403, "placeholder-in-header-name", "a secret placeholder is in a header name")
            if name == b"expect":
                continue  # answered here (see _handle)
            if name == b"content-length" and chunked:
                continue  # chunked wins (RFC 9112 6.3); never forward both framings
            value = self._substitute(name, value, used)
            out.append((name, value))
        return out, list(used)

    def _host_ok(self, host: bytes) -> bool:
        text = host.decode("latin-1").strip().lower()
        name, sep, port = text.rpartition(":")
        if not sep or "]" in port:
            name, port = text, ""
        if name.rstrip(".") != self.sni:
            return False
        return port == "" or (port.isdigit() and int(port) == self.port)

    def _substitute(self, name: bytes, value: bytes, used: dict[str, Secret]) -> bytes:
        found = self.secrets.find(value)
        basic = None
        if name in (b"authorization", b"proxy-authorization") and value[:6].lower() == b"basic ":
            # requests' auth=(user, key), pip/git URL credentials: the placeholder is inside base64.
            try:
                basic = base64.b64decode(value[6:].strip(), validate=True)
            except (binascii.Error, ValueError):
                basic = None
            if basic is not None:
                found += [s for s in self.secrets.find(basic) if s not in found]
        for secret in found:
            if secret not in self.allowed:
                raise _Refused(403, "secret-not-for-host",
                               f"secret {secret.name} may not be sent to {self.sni} "
                               f"(its hosts: {', '.join(secret.hosts)})")
            used[secret.name] = secret
        if not found:
            return value
        value = self.secrets.substitute(value, self.allowed)
        if basic is not None and self.secrets.contains_placeholder(basic):
            value = value[:6] + base64.b64encode(self.secrets.substitute(basic, self.allowed))
        return value

    # -- upstream ---------------------------------------------------------------------------------------

    async def _open_upstream(self, request: h11.Request) -> None:
        if self.upstream is not None:
            if not self.upstream.peer_went_away():
                return
            self._drop_upstream(graceful=False)  # the server closed the idle connection: dial again
        try:
            reader, writer = await asyncio.wait_for(self.dial(), DIAL_TIMEOUT)
        except (OSError, ConnectionError, asyncio.TimeoutError) as e:
            raise _Refused(502, "upstream-unreachable", f"cannot connect to {self.sni}: {_short(e)}") from None
        except Exception as e:  # the broker's dial refusing (policy, special address) is its own exception
            raise _Refused(502, "upstream-refused", f"connection to {self.sni} refused: {_short(e)}") from None
        self.upstream_writer = writer
        stream = TlsStream(reader, writer, self.upstream_ssl, server_side=False, server_hostname=self.sni)
        try:
            await asyncio.wait_for(stream.handshake(), DIAL_TIMEOUT)
        except (ssl.SSLError, OSError, ConnectionError, asyncio.TimeoutError) as e:
            stream.abort_quietly()
            self.upstream_writer = None
            raise _Refused(502, "upstream-tls", f"TLS with {self.sni} failed: {_short(e)}") from None
        self.upstream = stream
        self.up = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_UPSTREAM_HEAD)

    def _drop_upstream(self, *, graceful: bool) -> None:
        if self.upstream is not None:
            self.stats.bytes_to_upstream += self.upstream.raw_out
            self.stats.bytes_from_upstream += self.upstream.raw_in
            self.upstream.abort_quietly(graceful=graceful)
        self.upstream = None
        self.upstream_writer = None
        self.up = None

    async def _to_upstream(self, *events) -> None:
        assert self.up is not None and self.upstream is not None
        try:
            data = b"".join(self.up.send(event) or b"" for event in events)
        except h11.LocalProtocolError:
            # Never quote h11's message: it may contain a header value, i.e. a substituted secret.
            self._drop_upstream(graceful=False)
            raise _Refused(400, "bad-request", "the request cannot be forwarded as HTTP/1.1 (invalid "
                                               "header or framing after substitution)") from None
        if data:
            try:
                await self.upstream.send(data)
            except (ssl.SSLError, OSError, ConnectionError) as e:
                self._drop_upstream(graceful=False)
                raise _Refused(502, "upstream-closed", f"{self.sni} closed the connection: {_short(e)}") \
                    from None

    async def _upstream_event(self):
        assert self.up is not None and self.upstream is not None
        while True:
            try:
                event = self.up.next_event()
            except h11.RemoteProtocolError as e:
                return e
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await self.upstream.recv()
            except (ssl.SSLError, OSError, ConnectionError) as e:
                return e
            self.up.receive_data(data)

    async def _relay_response(self, request: h11.Request, used: list[str]) -> None:
        """Stream the upstream's response to the sandbox; the request is logged when its status is known."""
        status = None
        while True:
            event = await self._upstream_event()
            if isinstance(event, h11.InformationalResponse):
                if event.status_code == 101:
                    break  # we never asked to switch (Upgrade is refused): a broken upstream
                await self._to_client(h11.InformationalResponse(
                    status_code=event.status_code, headers=self._redacted(event.headers),
                    reason=self.secrets.redact(bytes(event.reason))))
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = self._redacted(event.headers)
                if any(name == b"transfer-encoding" for name, _ in headers):
                    headers = [(n, v) for n, v in headers if n != b"content-length"]  # never both framings
                self.log("allow", ("secrets substituted: " + ", ".join(used)) if used
                         else "no secret in the request", method=request.method, target=request.target,
                         used=used, status=status)
                await self._to_client(h11.Response(status_code=event.status_code, headers=headers,
                                                   reason=self.secrets.redact(bytes(event.reason))))
            elif isinstance(event, h11.Data):
                await self._to_client(h11.Data(data=bytes(event.data)))
            elif isinstance(event, h11.EndOfMessage):
                await self._to_client(h11.EndOfMessage(headers=self._redacted(event.headers)))
                return
            else:
                break  # ConnectionClosed or an error before the response ended
        # The upstream broke off. Before a response: a 502 made here. During one: the only honest signal
        # left is cutting the sandbox's connection too (a truncated body must not look complete).
        self._drop_upstream(graceful=False)
        if status is None:
            raise _Refused(502, "upstream-closed", f"{self.sni} closed the connection without a response")
        self.log("deny", "upstream-closed: the response was cut off", status=status)
        raise _ClientGone()

    def _redacted(self, headers) -> list[tuple[bytes, bytes]]:
        return [(name, self.secrets.redact(bytes(value))) for name, value in headers]

    def _next_cycle(self) -> bool:
        if self.up is not None:
            if self.up.our_state is h11.DONE and self.up.their_state is h11.DONE:
                self.up.start_next_cycle()
            else:
                self._drop_upstream(graceful=True)
        if self.srv.our_state is h11.DONE and self.srv.their_state is h11.DONE:
            self.srv.start_next_cycle()
            return True
        return False


class _BodyGuard:
    """Lets body bytes through only once it is sure no placeholder can overlap them.

    The last len(placeholder)-1 bytes are held back until the next chunk (or the end), so a placeholder
    split across chunks is still seen whole before any of its bytes are released.
    """

    def __init__(self, secrets: SecretSet) -> None:
        self._secrets = secrets
        self._keep = PLACEHOLDER_LENGTH - 1
        self._tail = b""

    def push(self, chunk: bytes) -> bytes | None:
        window = self._tail + chunk
        if self._secrets.contains_placeholder(window):
            return None
        cut = max(0, len(window) - self._keep)
        self._tail = window[cut:]
        return window[:cut]

    def finish(self) -> bytes:
        rest, self._tail = self._tail, b""
        return rest


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), as the broker refuses: the client learns at once, never a quiet FIN."""
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError):
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _short(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text[:300]
