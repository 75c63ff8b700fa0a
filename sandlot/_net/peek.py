"""Which host a client's first bytes ask for: the SNI of a TLS ClientHello, or an HTTP/1 request's Host.

The broker knows which name a connection was dialled for (its synthetic address); a client that then
asks the server for ANOTHER name (a TLS SNI, an HTTP Host, an absolute request URL) would reach that
other site through an allowed name's servers (a shared CDN address). So the first bytes are read,
without consuming them, and the host they name must equal the dialled name.

Only what no library does by itself lives here: a small ClientHello reader (the ssl module cannot parse
a ClientHello it did not receive on a socket of its own) and the head of an HTTP/1 request.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

MAX_PEEK = 64 * 1024  # a ClientHello or a request head larger than this is refused


@dataclass(frozen=True)
class FirstBytes:
    """What the client's first bytes say. ``protocol``: "tls", "http", "other", or "none" (silent)."""

    protocol: str
    host: Optional[str] = None      # SNI, or the request's host (absolute URL first, else Host header)
    problem: Optional[str] = None   # why the bytes cannot be checked ("malformed", "too-large", ...)


class NeedMore(Exception):
    """The bytes so far are a valid beginning; more are needed to decide."""


# -- TLS -------------------------------------------------------------------------------------------------------

def _u16(data: bytes, at: int) -> int:
    if at + 2 > len(data):
        raise ValueError("truncated")
    return int.from_bytes(data[at:at + 2], "big")


def _handshake_message(data: bytes) -> bytes:
    """The first handshake message, reassembled from consecutive handshake records."""
    body = b""
    at = 0
    while True:
        if len(data) < at + 5:
            raise NeedMore
        kind, length = data[at], _u16(data, at + 3)
        if kind != 22 or data[at + 1] != 3 or length == 0 or length > 16384 + 2048:
            raise ValueError("not a TLS handshake record")
        if len(data) < at + 5 + length:
            raise NeedMore
        body += data[at + 5:at + 5 + length]
        at += 5 + length
        if len(body) >= 4:
            needed = 4 + int.from_bytes(body[1:4], "big")
            if len(body) >= needed:
                return body[:needed]


def client_hello_sni(data: bytes) -> FirstBytes:
    """The SNI of a TLS ClientHello (``host`` None when the hello has none). Raises NeedMore."""
    try:
        message = _handshake_message(data)
        if message[0] != 1:
            return FirstBytes("tls", problem="not a ClientHello")
        at = 4 + 2 + 32                               # type+length, client_version, random
        at += 1 + message[at]                         # session_id
        at += 2 + _u16(message, at)                   # cipher_suites
        at += 1 + message[at]                         # compression_methods
        if at > len(message):
            raise ValueError("hello overrun")
        if at == len(message):
            return FirstBytes("tls")                  # no extensions at all
        end = at + 2 + _u16(message, at)
        at += 2
        if end > len(message):
            raise ValueError("extensions overrun")
        names = []
        while at < end:
            kind, length = _u16(message, at), _u16(message, at + 2)
            at += 4
            if at + length > end:
                raise ValueError("extension overrun")
            if kind == 0:                             # server_name
                names.append(_server_name(message[at:at + length]))
            at += length
        if at != end:
            raise ValueError("extensions overrun")
        if len(names) > 1:
            raise ValueError("two server_name extensions")
        return FirstBytes("tls", host=names[0] if names else None)
    except NeedMore:
        raise
    except (ValueError, IndexError, UnicodeDecodeError) as e:
        return FirstBytes("tls", problem=f"malformed ClientHello ({e})")


def _server_name(extension: bytes) -> str:
    total = _u16(extension, 0)
    if total + 2 != len(extension):
        raise ValueError("server_name length")
    at, found = 2, []
    while at < len(extension):
        kind, length = extension[at], _u16(extension, at + 1)
        at += 3
        if at + length > len(extension):
            raise ValueError("server_name overrun")
        if kind == 0:
            found.append(extension[at:at + length].decode("ascii"))
        at += length
    if len(found) != 1:
        raise ValueError("server_name must hold exactly one host_name")
    return found[0]


# -- HTTP/1 ------------------------------------------------------------------------------------------------------

# Loose on purpose: what a lenient server (Python's http.server, nginx) could still read as a request.
_REQUEST_START = re.compile(rb"^[A-Z]{1,16}(?:\s|$)")
_REQUEST_LINE = re.compile(rb"^([A-Z]{1,16}) (\S+) HTTP/1\.[01]$")
_ABSOLUTE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://([^/?#]*)")
_MAX_LINE = 8192


def looks_like_http(data: bytes) -> bool:
    """True when a server could read ``data`` as an HTTP/1 request; raises NeedMore while it may become one.

    Decided on the complete first line, so that a line-based protocol whose first word is upper case
    (SMTP's "EHLO x", a Redis "PING") is "other" as soon as its line ends, not a request waiting for
    headers that never come. Decided LOOSELY: servers accept more than the canonical request line
    (empty lines before it, several spaces or tabs, HTTP/1.2, a bare LF, a very long line), and whatever
    they accept must be checked (http_request_host refuses what it cannot check), never spliced as
    "other" - that would carry a request for any host through an allowed name's server.
    """
    body = data.lstrip(b" \t\r\n\v\f")  # servers skip empty lines before a request line
    if not body:
        if len(data) < _MAX_LINE:
            raise NeedMore
        return False
    end = body.find(b"\n")
    if end < 0:
        if _REQUEST_START.match(body[:17]):
            if len(data) < _MAX_LINE:
                raise NeedMore
            return True  # a request line this long is no request the broker can check: refused as HTTP
        return False
    words = body[:end].split()
    return len(words) >= 2 and words[-1][:5].upper() == b"HTTP/"


def request_host(method: bytes, target: str, host_header: Optional[str]) -> Optional[str]:
    """The host a request is for, as a server reads it: an absolute URL's, CONNECT's, else the Host header."""
    absolute = _ABSOLUTE.match(target)
    if absolute:
        return _strip_authority(absolute.group(1))
    if method == b"CONNECT":
        return _strip_authority(target)
    return _strip_authority(host_header) if host_header is not None else None


def http_request_host(data: bytes) -> FirstBytes:
    """The host an HTTP/1 request head names (absolute-form URL wins, as servers do). Raises NeedMore."""
    first = data.find(b"\n")
    if first < 1 or data[first - 1:first] != b"\r" or not _REQUEST_LINE.match(data[:first - 1]):
        # anything but the canonical "METHOD target HTTP/1.x" CRLF, first thing sent
        return FirstBytes("http", problem="not an HTTP/1 request line the broker can check")
    end = data.find(b"\r\n\r\n")
    if end < 0:
        raise NeedMore
    lines = data[:end].split(b"\r\n")
    line = _REQUEST_LINE.match(lines[0])
    if not line:
        return FirstBytes("http", problem="not an HTTP/1 request line")
    hosts = []
    for header in lines[1:]:
        key, sep, value = header.partition(b":")
        if not sep or key != key.strip() or not key or b"\n" in header or b"\r" in header:
            return FirstBytes("http", problem="malformed header")
        if key.lower() == b"host":
            hosts.append(value.strip().decode("latin-1"))
    if len(hosts) > 1:
        return FirstBytes("http", problem="two Host headers")
    host = request_host(line.group(1), line.group(2).decode("latin-1"), hosts[0] if hosts else None)
    return FirstBytes("http", host=host)


def _strip_authority(authority: str) -> str:
    authority = authority.rpartition("@")[2]
    if authority.startswith("["):
        return authority[1:].partition("]")[0]
    return authority.partition(":")[0]


# -- either ---------------------------------------------------------------------------------------------------------

def classify(data: bytes) -> FirstBytes:
    """What ``data`` (the first bytes so far) names. Raises NeedMore while a known protocol is incomplete."""
    if not data:
        raise NeedMore
    if data[0] == 22:
        return client_hello_sni(data)
    if data.startswith(b"PRI * HTTP/2.0"):
        return FirstBytes("http", problem="HTTP/2 without TLS (h2c) cannot be checked")
    if looks_like_http(data):
        return http_request_host(data)
    return FirstBytes("other")


def same_host(asked: Optional[str], name: str) -> bool:
    if asked is None:
        return False
    return asked.lower().rstrip(".") == name.lower().rstrip(".")


# -- every request of a plaintext HTTP/1 connection ------------------------------------------------------------

class HttpRequests:
    """Checks EVERY request a client sends on a plaintext HTTP/1 connection (keep-alive, pipelining), not
    just the first: each must be for ``name``. h11 parses the client's side (bodies, chunking); a new h11
    connection per request, fed what followed the previous one, since no response passes through h11.

    ``feed(data)`` -> (bytes to forward now, None) or (b"", why the stream must be cut).
    After an Upgrade or CONNECT request, what the client sends next is HELD until the server answers
    (``response(data)`` sees the server's first bytes): a 101 (a 2xx for CONNECT) makes the rest another
    protocol, passed unchecked; anything else means the server declined, and the held bytes are checked
    as HTTP requests again (a declined upgrade cannot smuggle a request for another host).
    """

    def __init__(self, name: str) -> None:
        import h11

        self._h11 = h11
        self.name = name
        self.requests = 0
        self.opaque = False
        self._conn = h11.Connection(h11.SERVER)
        self._method = b""
        self._switching: Optional[bytes] = None  # the method of the Upgrade/CONNECT request awaiting its answer
        self._held = b""
        self._answer = b""
        self._body: Optional[bytes] = None  # the current body's first bytes, while they may be a request

    def feed(self, data: bytes) -> tuple[bytes, Optional[str]]:
        if self.opaque:
            return data, None
        if self._switching is not None:
            self._held += data
            return b"", None
        h11 = self._h11
        self._conn.receive_data(data)
        while True:
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError as e:
                return b"", f"malformed HTTP request ({e})"
            if event is h11.NEED_DATA:
                return data, None
            if event is h11.PAUSED:
                trailing, closed = self._conn.trailing_data
                if self._conn.their_state is h11.MIGHT_SWITCH_PROTOCOL:
                    # the request ended inside this chunk (pauses are seen as soon as they happen)
                    self._switching = self._method
                    self._held = trailing
                    return data[:len(data) - len(trailing)], None
                self._conn = h11.Connection(h11.SERVER)
                if trailing:
                    self._conn.receive_data(trailing)
                if closed:
                    self._conn.receive_data(b"")
                continue
            if isinstance(event, h11.Request):
                self.requests += 1
                self._method = event.method
                hosts = [v.decode("latin-1") for k, v in event.headers if k == b"host"]
                asked = request_host(event.method, event.target.decode("latin-1"), hosts[0] if hosts else None)
                if not same_host(asked, self.name):
                    return b"", f"host-mismatch: dialled {self.name}, HTTP asks for {asked or 'no host'}"
                upgrades = b",".join(v for k, v in event.headers if k == b"upgrade").lower()
                if b"h2c" in [token.strip() for token in upgrades.split(b",")]:
                    # HTTP/2 after the 101 may name any :authority (as "PRI * HTTP/2.0" could)
                    return b"", "HTTP/2 without TLS (an h2c upgrade) cannot be checked"
                framing = {k for k, _ in event.headers if k in (b"content-length", b"transfer-encoding")}
                if len(framing) == 2:  # servers disagree on which wins: a body one reads as a request
                    return b"", "desync: a request with both Content-Length and Transfer-Encoding"
                self._body = b""
            if isinstance(event, h11.Data) and self._body is not None:
                # A server that does not read this body (many ignore a GET's, or a method they lack)
                # reads it as the NEXT request, which h11 never sees: a body must not be one.
                self._body += event.data
                try:
                    if looks_like_http(self._body[:_MAX_LINE]):
                        return b"", "desync: a request body that is itself an HTTP request"
                    self._body = None  # not a request: the rest of this body is data
                except NeedMore:
                    pass
            if isinstance(event, h11.ConnectionClosed):
                return data, None

    def response(self, data: bytes) -> tuple[bytes, Optional[str]]:
        """The server's bytes: (held client bytes now to forward, None) or (b"", why to cut)."""
        if self._switching is None:
            return b"", None
        self._answer += data
        if len(self._answer) < 12 and b"\n" not in self._answer:
            return b"", None
        status = self._answer[9:12] if self._answer.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")) else b""
        switched = status == b"101" or (self._switching == b"CONNECT" and status[:1] == b"2")
        held, self._held, self._answer, self._switching = self._held, b"", b"", None
        if switched:
            self.opaque = True
            return held, None
        self._conn = self._h11.Connection(self._h11.SERVER)  # declined: HTTP goes on, checked as before
        return self.feed(held) if held else (b"", None)
