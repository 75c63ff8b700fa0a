"""The build's egress proxy: a real HTTP server on loopback, real clients over the proxy's Unix socket."""

from __future__ import annotations

import http.server
import os
import socket
import threading

import pytest

from sandlot import InvalidRequest
from sandlot._host.egress import EgressProxy, apt_source_hosts


@pytest.fixture
def origin():
    """A real HTTP server on loopback that records the requests it saw."""
    seen: list = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
            body = b"hello from the mirror"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], seen
    server.shutdown()
    server.server_close()


def _ask(sock_path: str, raw: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(sock_path)
        s.sendall(raw)
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                return b"".join(chunks)
            chunks.append(data)


def test_allowed_host_is_proxied_in_origin_form(tmp_path, origin):
    port, seen = origin
    path = str(tmp_path / "p.sock")
    with EgressProxy({"127.0.0.1"}, path, ports={port}, allow_local=True):
        assert oct(os.stat(path).st_mode & 0o777) == "0o666"  # a build's shifted root can connect
        answer = _ask(path, f"GET http://127.0.0.1:{port}/debian/dists/bookworm/InRelease HTTP/1.1\r\n"
                            f"Host: 127.0.0.1:{port}\r\nProxy-Authorization: secret\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.0 200") and answer.endswith(b"hello from the mirror")
    (request_path, headers), = seen
    assert request_path == "/debian/dists/bookworm/InRelease"  # origin form upstream
    assert "proxy-authorization" not in headers and headers["connection"] == "close"


def test_connect_tunnels_to_an_allowed_host(tmp_path, origin):
    port, seen = origin
    path = str(tmp_path / "p.sock")
    with EgressProxy({"localhost"}, path, ports={port}, allow_local=True):
        answer = _ask(path, f"CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n"
                            f"GET /through-the-tunnel HTTP/1.0\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 200 Connection established\r\n\r\nHTTP/1.0 200")
    assert [p for p, _ in seen] == ["/through-the-tunnel"]


def test_other_hosts_ports_and_forms_are_refused(tmp_path, origin):
    port, seen = origin
    path = str(tmp_path / "p.sock")
    with EgressProxy({"127.0.0.1"}, path, ports={port}, allow_local=True) as proxy:
        for raw, why in [
            (f"GET http://127.0.0.2:{port}/ HTTP/1.1\r\n\r\n", b"not among the hosts"),
            (f"CONNECT 127.0.0.1:{port + 1} HTTP/1.1\r\n\r\n", b"is not allowed"),
            ("GET /relative HTTP/1.1\r\n\r\n", b"only absolute http://"),
            (f"GET http://user:pw@127.0.0.1:{port}/ HTTP/1.1\r\n\r\n", b"credentials"),
            ("nonsense\r\n\r\n", b"malformed request line"),
        ]:
            answer = _ask(path, raw.encode())
            assert answer.split(b"\r\n")[0] in (b"HTTP/1.1 403 Forbidden", b"HTTP/1.1 400 Bad Request"), answer
            assert why in answer, answer
    assert seen == []  # nothing reached the server
    assert len(proxy.refused) == 5


def test_addresses_of_this_host_are_refused_by_default(tmp_path, origin):
    """A base image whose sources name localhost must not reach the host's own services."""
    port, seen = origin
    path = str(tmp_path / "p.sock")
    with EgressProxy({"localhost", "127.0.0.1"}, path, ports={port}):
        for host in ("localhost", "127.0.0.1"):
            answer = _ask(path, f"GET http://{host}:{port}/ HTTP/1.1\r\n\r\n".encode())
            assert answer.startswith(b"HTTP/1.1 403") and b"an address of this host" in answer, answer
    assert seen == []
    assert not os.path.exists(path)  # the socket is gone with the proxy


def test_apt_source_hosts_reads_both_formats_inside_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "etc/apt/sources.list.d").mkdir(parents=True)
    (root / "etc/apt/sources.list").write_text(
        "# deb http://commented.example/debian bookworm main\n"
        "deb [signed-by=/usr/share/keyrings/x.gpg] http://deb.debian.org/debian bookworm main\n"
        "deb-src https://src.example.org/debian bookworm main\n")
    (root / "etc/apt/sources.list.d/debian.sources").write_text(
        "Types: deb\nURIs: http://deb.debian.org/debian-security http://Mirror.Example.net/x\nSuites: bookworm\n")
    outside = tmp_path / "outside.list"
    outside.write_text("deb http://outside.example/ bookworm main\n")
    (root / "etc/apt/sources.list.d/planted.list").symlink_to(outside)
    assert apt_source_hosts(str(root)) == {"deb.debian.org", "src.example.org", "mirror.example.net"}
    with pytest.raises(InvalidRequest):
        apt_source_hosts(str(tmp_path / "empty"))
