"""A forward HTTP proxy with an allowlist of host names, listening on a Unix socket.

The apt step of a build runs in a sandbox with no network of its own; its agent relays one loopback
port to this socket (bound into the sandbox), and apt talks to that port as its HTTP proxy. Only the
hosts the image's apt sources name are reachable, only on ports 80 and 443 (``GET http://...`` and
``CONNECT``), and never an address of this host (loopback, link-local such as a cloud's metadata
service, or any address of its own interfaces: a base image whose sources say ``http://127.0.0.1:8000/``
must not reach the Sandlot server). Other machines of a private network stay reachable (a company's
mirror). Names are resolved here, on the host; the address actually dialled is the one checked.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
from typing import Iterable, Optional

from .._agent.relay import splice
from .._exceptions import InvalidRequest

PORTS = {"http": 80, "https": 443}
MAX_HEAD = 64 * 1024  # a request line and headers larger than this are refused
CONNECT_TIMEOUT = 15.0


class EgressProxy:
    """``with EgressProxy({"deb.debian.org"}, "/path/proxy.sock"):`` serves until the block ends."""

    def __init__(self, hosts: Iterable[str], socket_path: str, *, ports: Iterable[int] = (80, 443),
                 allow_local: bool = False) -> None:
        self.hosts = {h.lower().rstrip(".") for h in hosts if h}
        self.ports = set(ports)
        self.socket_path = socket_path
        self.allow_local = allow_local  # for tests that serve on loopback; builds never set it
        self.refused: list[str] = []  # what was asked for and refused, for error messages
        self._listener: Optional[socket.socket] = None

    # -- lifecycle --------------------------------------------------------------------------------
    def __enter__(self) -> "EgressProxy":
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.socket_path)
        os.chmod(self.socket_path, 0o666)  # the build's root is a shifted uid: it must be able to connect
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept_loop, name="sandlot-egress", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        try:
            os.unlink(self.socket_path)
        except OSError:
            pass

    def _accept_loop(self) -> None:
        while self._listener is not None:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), name="sandlot-egress-conn", daemon=True).start()

    # -- one client connection ----------------------------------------------------------------------
    def _serve(self, client: socket.socket) -> None:
        upstream = None
        try:
            head, rest = _read_head(client)
            request_line, _, headers = head.partition(b"\r\n")
            method, target, version = _split_request_line(request_line)
            if method == "CONNECT":
                host, port = _host_port(target, PORTS["https"])
                upstream = self._dial(host, port)
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                if rest:
                    upstream.sendall(rest)
            else:
                if not target.startswith("http://"):
                    raise _Refused(400, "only absolute http:// requests and CONNECT are proxied")
                authority, _, path = target[len("http://"):].partition("/")
                host, port = _host_port(authority, PORTS["http"])
                upstream = self._dial(host, port)
                # Origin form upstream; one request per connection (a pipelined next request could
                # name another host), so the client reconnects for the next one.
                kept = [h for h in headers.split(b"\r\n") if h and not h.lower().startswith(
                    (b"proxy-", b"connection:", b"keep-alive:"))]
                upstream.sendall(b"%s /%s %s\r\n%s\r\nConnection: close\r\n\r\n" % (
                    method.encode(), path.encode(), version.encode(), b"\r\n".join(kept)) + rest)
            splice(client, upstream)
        except _Refused as exc:
            self.refused.append(exc.reason)
            body = (exc.reason + "\n").encode()
            try:
                client.sendall(b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                               b"Connection: close\r\n\r\n%s" % (exc.status, exc.title.encode(), len(body), body))
            except OSError:
                pass
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                if s is not None:
                    s.close()

    def _dial(self, host: str, port: int) -> socket.socket:
        if host not in self.hosts:
            raise _Refused(403, f"{host} is not among the hosts this build may reach ({', '.join(sorted(self.hosts))})")
        if port not in self.ports:
            raise _Refused(403, f"port {port} of {host} is not allowed ({', '.join(map(str, sorted(self.ports)))})")
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise _Refused(502, f"cannot resolve {host}: {exc}") from None
        last: Optional[OSError] = None
        for family, kind, proto, _, address in infos:
            ip = ipaddress.ip_address(address[0])
            if not self.allow_local and _is_this_host(family, ip):
                last = _Refused(403, f"{host} resolves to {ip}, an address of this host")
                continue
            sock = socket.socket(family, kind, proto)
            sock.settimeout(CONNECT_TIMEOUT)
            try:
                sock.connect(address)
            except OSError as exc:
                sock.close()
                last = exc
                continue
            sock.settimeout(None)
            return sock
        if isinstance(last, _Refused):
            raise last
        raise _Refused(502, f"cannot connect to {host}:{port}: {last}")


def _is_this_host(family: int, ip: ipaddress._BaseAddress) -> bool:
    if ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast:
        return True
    # Bindable means assigned to one of our interfaces (without IP_FREEBIND, bind refuses others).
    probe = socket.socket(family, socket.SOCK_DGRAM)
    try:
        probe.bind((str(ip), 0))
        return True
    except OSError:
        return False
    finally:
        probe.close()


class _Refused(Exception):
    TITLES = {400: "Bad Request", 403: "Forbidden", 502: "Bad Gateway"}

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason, self.title = status, reason, self.TITLES[status]


def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(8192)
        if not chunk:
            raise _Refused(400, "the request ended before its headers did")
        data += chunk
        if len(data) > MAX_HEAD:
            raise _Refused(400, "request headers too large")
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _split_request_line(line: bytes) -> tuple[str, str, str]:
    try:
        method, target, version = line.decode("ascii").split(" ")
    except (UnicodeDecodeError, ValueError):
        raise _Refused(400, "malformed request line") from None
    if not version.startswith("HTTP/1."):
        raise _Refused(400, "only HTTP/1.x")
    return method, target, version


def _host_port(authority: str, default: int) -> tuple[str, int]:
    if "@" in authority:
        raise _Refused(400, "credentials in the URL are not proxied")
    host, sep, port = authority.rpartition(":")
    if not sep or "]" in port:  # no port, or an IPv6 literal without one
        host, port = authority, str(default)
    host = host.strip("[]").lower().rstrip(".")
    if not host or not port.isdigit():
        raise _Refused(400, f"bad host {authority!r}")
    return host, int(port)


def apt_source_hosts(root: str) -> set[str]:
    """Host names of the http(s) URIs in an image's apt sources (one-line and deb822 formats)."""
    from urllib.parse import urlsplit

    files = [os.path.join(root, "etc/apt/sources.list")]
    parts = os.path.join(root, "etc/apt/sources.list.d")
    if os.path.isdir(parts) and not os.path.islink(parts):
        files += [os.path.join(parts, n) for n in sorted(os.listdir(parts)) if n.endswith((".list", ".sources"))]
    hosts = set()
    for path in files:
        if os.path.islink(path) or not os.path.isfile(path):  # never follow the image's links out of it
            continue
        with open(path, errors="replace") as f:
            for line in f:
                line = line.split("#", 1)[0].strip()
                if line.startswith(("deb ", "deb-src ")):
                    words = [w for w in line.split() if "://" in w]
                elif line.lower().startswith("uris:"):
                    words = line.split()[1:]
                else:
                    continue
                for word in words:
                    url = urlsplit(word)
                    if url.scheme in PORTS and url.hostname:
                        hosts.add(url.hostname.lower())
    if not hosts:
        raise InvalidRequest("the base image's apt sources name no http(s) mirror")
    return hosts


__all__ = ["EgressProxy", "apt_source_hosts"]
