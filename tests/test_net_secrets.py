"""Secrets through the interceptor, with real TLS end to end on loopback (host netns: loopback only).

The cast: an UPSTREAM HTTPS server (certificate from a test CA of our own) that records every request it
receives; the INTERCEPTOR (sandlot._net.intercept.intercept on an asyncio server, as the broker will run
it) presenting certificates minted by the sandbox's CA; CLIENTS (Python ssl/http.client, curl, and in
subprocesses urllib, requests, httpx, node) that trust the sandbox's bundle, as code in a sandbox does
through the variables of ca_env. Names resolve to 127.0.0.1 through curl --resolve / a getaddrinfo shim
in the client subprocesses: everything else is the real thing.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sandlot._exceptions import InvalidRequest
from sandlot._net.intercept import BODY_BUFFER, intercept
from sandlot._net.secrets import PLACEHOLDER_PREFIX, SecretSet
from sandlot._net.tls import CA_ENV_VARS, SandboxCA, ca_env, make_upstream_context

API = "api.example.test"
OTHER = "other.example.test"
API_KEY = "sk-test-REAL-VALUE-4f1c2b9e7a"
OTHER_KEY = "other-REAL-VALUE-77aa"
BIG = 5 * 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent


# -- a test CA and an upstream HTTPS server that records what reaches it ----------------------------------

def _test_ca(tmp: Path) -> tuple[Path, Path, Path]:
    """(CA cert, server cert chain, server key) for API and OTHER, from a CA the sandbox never sees."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "upstream test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, API)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(API), x509.DNSName(OTHER)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (tmp / "upstream-ca.pem").write_bytes(ca.public_bytes(pem))
    (tmp / "upstream.pem").write_bytes(cert.public_bytes(pem))
    (tmp / "upstream.key").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    return tmp / "upstream-ca.pem", tmp / "upstream.pem", tmp / "upstream.key"


class Upstream(ThreadingHTTPServer):
    """HTTPS/1.1 with keep-alive. Records (connection id, method, path, headers, body, complete)."""

    daemon_threads = True

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__(("127.0.0.1", 0), _UpstreamHandler)
        self.context = context
        self.requests: list[dict] = []
        self.handshakes = 0
        self.failed_handshakes = 0
        self.gate = threading.Event()
        self.lock = threading.Lock()
        self.broken_writes = 0

    @property
    def port(self) -> int:
        return self.server_address[1]

    def finish_request(self, request, client_address):
        try:
            request = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            with self.lock:
                self.failed_handshakes += 1
            return
        with self.lock:
            self.handshakes += 1
        super().finish_request(request, client_address)

    def handle_error(self, request, client_address):  # a reset mid-request is a tested case, not noise
        pass

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.handshakes = self.failed_handshakes = self.broken_writes = 0
        self.gate.clear()


def _pattern(n: int) -> bytes:
    block = bytes(range(256)) * 4096  # 1 MiB
    return (block * (n // len(block) + 1))[:n]


class _UpstreamHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms delayed-ACK stall

    def log_message(self, *args):
        pass

    def _record(self, body: bytes, complete: bool) -> None:
        with self.server.lock:
            self.server.requests.append({
                "conn": self.client_address, "method": self.command, "path": self.path,
                "headers": [(k.lower(), v) for k, v in self.headers.items()], "body": body,
                "complete": complete})

    def _read_body(self) -> tuple[bytes, bool]:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                line = self.rfile.readline()
                if not line:
                    return out, False
                size = int(line.split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b""):
                        pass
                    return out, True
                data = self.rfile.read(size + 2)
                out += data[:size]
                if len(data) < size + 2:
                    return out, False
        length = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(length) if length else b""
        return data, len(data) == length

    def _send(self, status: int, body: bytes, extra: dict | None = None) -> None:
        self.send_response(status)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self):
        body, complete = self._read_body()
        self._record(body, complete)
        if not complete:
            self.close_connection = True
            return
        path = self.path.split("?")[0]
        if path == "/echo":
            # A malicious (or merely chatty) upstream echoing the credential in a response header.
            self._send(200, b"echoed in a header\n",
                       {"X-Echo-Authorization": self.headers.get("Authorization", ""),
                        "Content-Type": "text/plain"})
        elif path == "/big-cl":
            self._send(200, _pattern(BIG), {"Content-Type": "application/octet-stream"})
        elif path in ("/big-chunked", "/gated"):
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            data = _pattern(BIG)
            step = 256 * 1024
            try:
                for i in range(0, len(data), step):
                    if path == "/gated" and i == 1024 * 1024:
                        # The rest only comes once the CLIENT has seen the first MiB: proves streaming.
                        if not self.server.gate.wait(20):
                            return
                    chunk = data[i:i + step]
                    self.wfile.write(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
            except (OSError, ssl.SSLError):
                with self.server.lock:
                    self.server.broken_writes += 1
                self.close_connection = True
        elif path == "/close-after":
            # Keep-alive as far as the headers say, then the server closes the idle connection anyway.
            self._send(200, b"closing\n")
            self.close_connection = True
        else:
            self._send(200, f"ok {self.command} {self.path}\n".encode(), {"Content-Type": "text/plain"})

    do_POST = do_PUT = do_HEAD = do_OPTIONS = do_GET


# -- the interceptor, run the way the broker runs it ------------------------------------------------------

class Interceptor:
    """An asyncio server whose connections go to intercept() for one SNI; dials the upstream on loopback."""

    def __init__(self, loop, *, sni, secrets, ca, upstream_port, upstream_ssl, body_buffer=BODY_BUFFER,
                 port_seen_as=None, start=True, recheck=None):
        self.loop = loop
        self.sni = sni
        self.secrets = secrets
        self.ca = ca
        self.upstream_port = upstream_port
        self.upstream_ssl = upstream_ssl
        self.body_buffer = body_buffer
        self.recheck = recheck
        self.dials = 0
        self.entries: list[dict] = []
        self.stats: list = []
        self.tasks: list[asyncio.Task] = []
        serving = asyncio.start_server(self._handle, "127.0.0.1", 0)
        # start=False: `loop` is not running yet (a process of its own, bench/net_secrets.py).
        self.server = (asyncio.run_coroutine_threadsafe(serving, loop).result(10) if start
                       else loop.run_until_complete(serving))
        self.port = self.server.sockets[0].getsockname()[1]
        # The port the "sandbox" dialled, which a Host header's :port must match (here: the real one).
        self.port_seen_as = port_seen_as or self.port

    async def _dial(self):
        self.dials += 1
        return await asyncio.open_connection("127.0.0.1", self.upstream_port)

    async def _handle(self, reader, writer):
        self.tasks.append(asyncio.current_task())
        stats = await intercept(reader, writer, sni=self.sni, secrets=self.secrets, ca=self.ca, dial=self._dial,
                                log=self.entries.append, port=self.port_seen_as, upstream_ssl=self.upstream_ssl,
                                body_buffer=self.body_buffer, recheck=self.recheck)
        self.stats.append(stats)

    def close(self):
        async def stop():
            self.server.close()
            await self.server.wait_closed()
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)

    def wait_entries(self, n: int, timeout: float = 10) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(self.entries) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        return list(self.entries)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secrets")
    ca_pem, cert, key = _test_ca(tmp)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    upstream = Upstream(server_ctx)
    server_thread = threading.Thread(target=upstream.serve_forever, daemon=True)
    server_thread.start()
    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, daemon=True)
    loop_thread.start()
    secrets = SecretSet.build({
        "API_KEY": {"value": API_KEY, "hosts": [API]},
        "OTHER_KEY": {"value": OTHER_KEY, "hosts": ["*.example.test"]},
    })
    # OTHER_KEY's "*.example.test" covers API too; a third secret for a host API is not:
    secrets_strict = SecretSet.build({
        "API_KEY": {"value": API_KEY, "hosts": [API]},
        "OTHER_KEY": {"value": OTHER_KEY, "hosts": [OTHER]},
    })
    ca = SandboxCA.create(secrets_strict.hosts)
    bundle = ca.bundle(tmp / "bundle.pem")
    try:
        yield {"tmp": tmp, "upstream": upstream, "loop": loop, "secrets": secrets_strict, "wide": secrets,
               "ca": ca, "bundle": bundle, "upstream_ca": ca_pem}
    finally:
        upstream.shutdown()
        upstream.server_close()
        loop.call_soon_threadsafe(loop.stop)
        loop_thread.join(10)
        loop.close()


@pytest.fixture
def icpt(world):
    world["upstream"].reset()
    made = []

    def make(**kw):
        kw.setdefault("sni", API)
        kw.setdefault("secrets", world["secrets"])
        kw.setdefault("ca", world["ca"])
        kw.setdefault("upstream_port", world["upstream"].port)
        kw.setdefault("upstream_ssl", make_upstream_context(world["upstream_ca"]))
        it = Interceptor(world["loop"], **kw)
        made.append(it)
        return it

    try:
        yield make
    finally:
        for it in made:
            it.close()


def _client_ctx(world) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(world["bundle"]))


def _connect(world, it, sni=API) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", it.port), timeout=20)
    return _client_ctx(world).wrap_socket(sock, server_hostname=sni)


def _raw(world, it, request: bytes, sni=API) -> bytes:
    """Send raw request bytes over TLS, return every byte the client receives until the close."""
    with _connect(world, it, sni) as tls:
        tls.sendall(request)
        out = b""
        while True:
            try:
                data = tls.recv(65536)
            except (ssl.SSLError, ConnectionResetError):
                break
            if not data:
                break
            out += data
        return out


def _http(world, it, host=API) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection(host, it.port, timeout=20)
    conn.sock = _connect(world, it)
    return conn


def _placeholder(world, name="API_KEY") -> str:
    return world["secrets"].placeholders()[name]


def _status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def _assert_nothing_upstream(world, it):
    assert it.dials == 0, "the upstream was dialled for a refused request"
    assert world["upstream"].requests == [], world["upstream"].requests


# -- SecretSet --------------------------------------------------------------------------------------------

def test_secretset_builds_placeholders_and_matches_hosts():
    """The environment gets random placeholders (different per sandbox), never values; hosts match as the
    policy's name rules do ("*.x" = subdomains only)."""
    spec = {"OPENAI_API_KEY": {"value": "sk-abc", "hosts": ["API.openai.com.", "*.example.com"]}}
    a, b = SecretSet.build(spec), SecretSet.build(spec)
    pa = a.placeholders()["OPENAI_API_KEY"]
    assert pa.startswith(PLACEHOLDER_PREFIX) and len(pa) == len(PLACEHOLDER_PREFIX) + 32
    assert int(pa[len(PLACEHOLDER_PREFIX):], 16) >= 0
    assert pa != b.placeholders()["OPENAI_API_KEY"], "placeholders must be random per sandbox"
    assert "sk-abc" not in repr(a) and "sk-abc" not in str(a.secrets[0]) and "sk-abc" not in repr(a.secrets[0])
    assert a.to_json() == {"OPENAI_API_KEY": {"hosts": ["api.openai.com", "*.example.com"]}}
    assert [s.name for s in a.for_host("api.openai.com")] == ["OPENAI_API_KEY"]
    assert a.for_host("x.example.com") and a.for_host("a.b.example.com")
    assert not a.for_host("example.com") and not a.for_host("evil-example.com")
    assert not a.for_host("openai.com") and not a.for_host("api.openai.com.evil.test")
    assert a.covers("API.OPENAI.COM.")
    assert SecretSet.build(None) is None and SecretSet.build({}) is None
    assert SecretSet.build(a) is a


@pytest.mark.parametrize("spec, fragment", [
    ({"1BAD": {"value": "V4LU3-secret", "hosts": ["a.test"]}}, "environment variable name"),
    ({"A-B": {"value": "V4LU3-secret", "hosts": ["a.test"]}}, "environment variable name"),
    ({"K": {"value": "", "hosts": ["a.test"]}}, "non-empty string"),
    ({"K": {"value": 12345, "hosts": ["a.test"]}}, "non-empty string"),
    ({"K": {"value": "V4LU3-secret" * 6000, "hosts": ["a.test"]}}, "longer than 65536"),
    ({"K": {"value": "V4LU3-secret\r\nX-Injected: 1", "hosts": ["a.test"]}}, "control character"),
    ({"K": {"value": "V4LU3-secret\n", "hosts": ["a.test"]}}, "control character"),
    ({"K": {"value": " V4LU3-secret", "hosts": ["a.test"]}}, "whitespace"),
    ({"K": {"value": "V4LU3-secret", "hosts": []}}, "non-empty list"),
    ({"K": {"value": "V4LU3-secret", "hosts": "a.test"}}, "non-empty list"),
    ({"K": {"value": "V4LU3-secret", "hosts": ["*"]}}, "is not accepted"),
    ({"K": {"value": "V4LU3-secret", "hosts": ["203.0.113.7"]}}, "is not accepted"),
    ({"K": {"value": "V4LU3-secret", "hosts": ["[2001:db8::1]"]}}, "is not accepted"),
    ({"K": {"value": "V4LU3-secret", "hosts": ["a.test:443"]}}, "is not accepted"),
    ({"K": {"value": "V4LU3-secret", "hosts": ["*.com.*"]}}, "is not accepted"),
    ({"K": {"value": "V4LU3-secret", "hosts": ["*.test"]}}, "top-level domain"),
    ({"K": {"value": "V4LU3-secret", "hosts": ["*.a.test", "b.test"]}}, None),
    ({"K": {"value": "V4LU3-secret", "hosts": ["a b.test"]}}, "is not accepted"),
    ({"K": {"value": "V4LU3-secret", "hosts": ["10.0.0.300"]}}, "is not accepted"),
    ({"K": {"value": "V4LU3-secret", "hosts": ["-a.test"]}}, "is not accepted"),
    ({"K": {"value": "V4LU3-secret", "hosts": ["a.test"], "extra": 1}}, "unknown field"),
    ({"K": "V4LU3-secret"}, "must be a mapping"),
    (["V4LU3-secret"], "must be a mapping"),
])
def test_secretset_rejects_bad_input_without_quoting_the_value(spec, fragment):
    if fragment is None:  # the accepted control case in the middle of the table
        assert SecretSet.build(spec)
        return
    with pytest.raises(InvalidRequest) as err:
        SecretSet.build(spec)
    assert fragment in str(err.value)
    assert "V4LU3" not in str(err.value), "an error message quoted the secret's value"


# -- the CA and the bundle --------------------------------------------------------------------------------

def test_ca_mints_only_within_its_name_constraints(world, tmp_path):
    """pathlen 0 + name constraints: a certificate the CA signs for ANOTHER name (a bug, a leaked key) is
    refused by Python's ssl, curl and openssl; leaves for the secret hosts are accepted by all three."""
    ca = world["ca"]
    cert = ca.cert
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    nc = cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert nc.critical and {n.value for n in nc.value.permitted_subtrees} == {API, OTHER}
    with pytest.raises(InvalidRequest):
        ca.leaf_for("evil.test")
    with pytest.raises(InvalidRequest):
        ca.leaf_for("203.0.113.7")
    assert ca.leaf_for(API) == ca.leaf_for(API.upper() + "."), "leaves are cached per name"

    # Forge a leaf for evil.test with the CA's own key, bypassing leaf_for's check.
    permitted, ca.permitted = ca.permitted, None
    try:
        forged = ca.server_context("evil.test")
    finally:
        ca.permitted = permitted
        ca._leaves.pop("evil.test", None)
        ca._contexts.pop("evil.test", None)
    results = {}
    for name, ctx in ((API, ca.server_context(API)), ("evil.test", forged)):
        server = socket.create_server(("127.0.0.1", 0))
        server.settimeout(20)
        port = server.getsockname()[1]

        def serve(server=server, ctx=ctx):
            for _ in range(3):
                conn, _ = server.accept()
                try:
                    with ctx.wrap_socket(conn, server_side=True) as tls:
                        tls.recv(100)
                        tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                except (ssl.SSLError, OSError):
                    pass
        t = threading.Thread(target=serve, daemon=True)
        t.start()
        try:
            try:
                with _client_ctx(world).wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                                                    server_hostname=name) as tls:
                    tls.sendall(b"GET / HTTP/1.0\r\n\r\n")
                    python_ok = tls.recv(100).startswith(b"HTTP/1.1 200")
            except ssl.SSLCertVerificationError as e:
                python_ok = False
                assert "permitted subtree violation" in str(e)
            curl = subprocess.run(["curl", "-sS", "--max-time", "10", "--resolve", f"{name}:{port}:127.0.0.1",
                                   f"https://{name}:{port}/"], capture_output=True, text=True,
                                  env={"PATH": os.environ["PATH"], "CURL_CA_BUNDLE": str(world["bundle"])})
            ossl = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", name,
                                   "-verify_hostname", name, "-CAfile", str(world["bundle"]),
                                   "-verify_return_error", "-brief"], input="", capture_output=True, text=True,
                                  timeout=20)
            results[name] = (python_ok, curl.returncode == 0 and curl.stdout == "ok", ossl.returncode == 0)
        finally:
            server.close()
            t.join(5)
    assert results[API] == (True, True, True), results
    assert results["evil.test"] == (False, False, False), results


def test_bundle_holds_host_store_and_ca_and_ca_env_points_at_it(world):
    bundle = world["bundle"].read_bytes()
    assert bundle.count(b"-----BEGIN CERTIFICATE-----") > 10, \
        "the host's public roots must be in the bundle (non-secret HTTPS passes through the broker)"
    last = bundle[bundle.rindex(b"-----BEGIN CERTIFICATE-----"):]
    assert x509.load_pem_x509_certificate(last) == world["ca"].cert
    env = ca_env("/run/sandlot/ca.pem")
    for var in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "PIP_CERT", "GIT_SSL_CAINFO",
                "NODE_EXTRA_CA_CERTS"):
        assert env[var] == "/run/sandlot/ca.pem"
    assert set(env) == set(CA_ENV_VARS)
    assert oct(world["bundle"].stat().st_mode & 0o777) == "0o644"


# A client in a subprocess, with ONLY the ca_env variables (plus PATH) and the placeholder in its env, as
# code in a sandbox has them. getaddrinfo is shimmed to loopback for the test names; TLS and HTTP are real.
_PY_CLIENT = textwrap.dedent("""
    import os, socket, sys
    _real = socket.getaddrinfo
    def _shim(host, *a, **k):
        return _real("127.0.0.1" if str(host).endswith("example.test") else host, *a, **k)
    socket.getaddrinfo = _shim
    url = sys.argv[2]
    headers = {"Authorization": "Bearer " + os.environ["API_KEY"]}
    if sys.argv[1] == "urllib":
        import urllib.request
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=20) as r:
            print(r.status, r.headers.get("X-Echo-Authorization"))
    elif sys.argv[1] == "requests":
        import requests
        r = requests.get(url, headers=headers, timeout=20)
        print(r.status_code, r.headers.get("X-Echo-Authorization"))
    elif sys.argv[1] == "httpx":
        import httpx
        r = httpx.get(url, headers=headers, timeout=20)
        print(r.status_code, r.headers.get("X-Echo-Authorization"))
""")

_NODE_CLIENT = textwrap.dedent("""
    const https = require('https');
    const u = new URL(process.argv[1]);
    https.get({host: u.hostname, port: u.port, path: u.pathname,
               lookup: (h, o, cb) => o && o.all ? cb(null, [{address: '127.0.0.1', family: 4}])
                                                : cb(null, '127.0.0.1', 4),
               headers: {Authorization: 'Bearer ' + process.env.API_KEY}},
      r => { console.log(r.statusCode, r.headers['x-echo-authorization']); r.resume(); })
      .on('error', e => { console.log('ERR', e.code || e.message); process.exit(1); });
""")


@pytest.mark.parametrize("client", ["urllib", "requests", "httpx", "curl", "node", "git"])
def test_clients_trust_the_minted_cert_through_ca_env_and_the_value_stays_outside(world, icpt, client):
    """The user's story: code with API_KEY=<placeholder> in its env calls the API with the usual client;
    only the ca_env variables make it trust the interceptor. The upstream gets the real value; the client
    sees the placeholder, even where the upstream echoes the credential back in a response header."""
    if client == "node" and not shutil.which("node"):
        pytest.skip("node is not installed")
    it = icpt()
    env = {"PATH": os.environ["PATH"], "API_KEY": _placeholder(world), **ca_env(str(world["bundle"]))}
    url = f"https://{API}:{it.port}/echo"
    if client == "curl":
        cmd = ["curl", "-sS", "--max-time", "20", "--resolve", f"{API}:{it.port}:127.0.0.1", "-D", "-",
               "-o", "/dev/null", "-H", "Authorization: Bearer " + env["API_KEY"], url]
    elif client == "node":
        cmd = ["node", "-e", _NODE_CLIENT, url]
    elif client == "git":  # libcurl-gnutls: another TLS stack that must accept the name-constrained CA
        env["HOME"] = str(world["tmp"])
        cmd = ["git", "-c", f"http.curloptResolve={API}:{it.port}:127.0.0.1", "-c",
               f"http.extraHeader=Authorization: Bearer {env['API_KEY']}", "ls-remote", url]
    else:
        cmd = [sys.executable, "-c", _PY_CLIENT, client, url]
        env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert API_KEY not in out.stdout + out.stderr, "the secret's value reached the client"
    if client == "git":
        # TLS and HTTP worked; the test upstream is no git server, which git says after the request.
        assert "is this a git repository?" in out.stderr, out.stderr
    else:
        assert out.returncode == 0, out.stderr + out.stdout
    if client == "git":
        pass
    elif client == "curl":
        assert out.stdout.startswith("HTTP/1.1 200")
        assert f"Bearer {_placeholder(world)}".lower() in out.stdout.lower()
    else:
        assert out.stdout.split() == ["200", "Bearer", _placeholder(world)]
    (request,) = world["upstream"].requests
    assert ("authorization", f"Bearer {API_KEY}") in request["headers"]
    assert _placeholder(world) not in json.dumps(request["headers"])


# -- the interceptor --------------------------------------------------------------------------------------

def test_value_reaches_upstream_and_no_byte_of_it_reaches_the_client(world, icpt):
    it = icpt()
    ph = _placeholder(world)
    raw = _raw(world, it, (f"GET /echo HTTP/1.1\r\nHost: {API}\r\nAuthorization: Bearer {ph}\r\n"
                           f"X-Custom: key={ph}\r\nConnection: close\r\n\r\n").encode())
    assert _status(raw) == 200
    assert API_KEY.encode() not in raw
    assert f"X-Echo-Authorization: Bearer {ph}".lower().encode() in raw.lower()
    (request,) = world["upstream"].requests
    headers = dict(request["headers"])
    assert headers["authorization"] == f"Bearer {API_KEY}"
    assert headers["x-custom"] == f"key={API_KEY}", "any header may carry the placeholder"
    entries = it.wait_entries(1)
    assert entries[0]["verdict"] == "allow" and entries[0]["secrets"] == ["API_KEY"]
    assert entries[0]["status"] == 200 and entries[0]["path"] == "/echo"
    assert API_KEY not in json.dumps(entries) and ph not in json.dumps(entries)


def test_basic_auth_placeholder_inside_base64_is_substituted(world, icpt):
    """requests' auth=(user, KEY), pip/git URL credentials: the placeholder travels base64-encoded."""
    it = icpt()
    token = base64.b64encode(f"user:{_placeholder(world)}".encode()).decode()
    raw = _raw(world, it, f"GET /x HTTP/1.1\r\nHost: {API}\r\nAuthorization: Basic {token}\r\n"
                          f"Connection: close\r\n\r\n".encode())
    assert _status(raw) == 200
    sent = dict(world["upstream"].requests[0]["headers"])["authorization"]
    assert base64.b64decode(sent.split()[1]) == f"user:{API_KEY}".encode()


@pytest.mark.parametrize("where", ["body", "body-chunked", "path", "query", "query-percent-encoded",
                                   "header-name", "trailer"])
def test_placeholder_outside_headers_is_refused_and_nothing_is_sent(world, icpt, where):
    it = icpt()
    ph = _placeholder(world)
    target, body, extra = "/upload", b"", ""
    if where == "body":
        body = json.dumps({"key": ph}).encode()
        extra = f"Content-Length: {len(body)}\r\n"
    elif where == "path":
        target = f"/v1/{ph}/x"
    elif where == "query":
        target = f"/v1?key={ph}"
    elif where == "query-percent-encoded":
        target = "/v1?key=" + "".join(f"%{b:02X}" for b in ph.encode())
    elif where == "header-name":
        extra = f"X-{ph}: 1\r\n"
    if where in ("body-chunked", "trailer"):
        extra = "Transfer-Encoding: chunked\r\n"
        if where == "body-chunked":  # split across chunks: the guard must see it whole
            half = len(ph) // 2
            body = (f"{half:x}\r\n{ph[:half]}\r\n{len(ph) - half:x}\r\n{ph[half:]}\r\n0\r\n\r\n").encode()
        else:
            body = f"3\r\nabc\r\n0\r\nX-Trailer: {ph}\r\n\r\n".encode()
    raw = _raw(world, it, (f"POST {target} HTTP/1.1\r\nHost: {API}\r\n{extra}"
                           f"Authorization: Bearer {ph}\r\n\r\n").encode() + body)
    assert _status(raw) == 403, raw[:300]
    assert b"X-Sandlot-Refused: placeholder-in-" in raw
    _assert_nothing_upstream(world, it)
    (entry,) = it.wait_entries(1)
    assert entry["verdict"] == "deny" and entry["status"] == 403
    assert API_KEY not in json.dumps(entry)


def test_placeholder_late_in_a_streamed_body_never_leaves(world, icpt):
    """A body larger than the check buffer streams; a placeholder after that point is still caught before
    any of its bytes go: the upstream gets a truncated request (discarded), the sandbox a 403."""
    it = icpt(body_buffer=64 * 1024)
    ph = _placeholder(world).encode()
    body = b"a" * (300 * 1024) + ph + b"b" * 1000
    raw = _raw(world, it, (f"POST /upload HTTP/1.1\r\nHost: {API}\r\nContent-Length: {len(body)}\r\n"
                           f"\r\n").encode() + body)
    assert _status(raw) == 403
    deadline = time.monotonic() + 10
    while not world["upstream"].requests and time.monotonic() < deadline:
        time.sleep(0.02)
    for request in world["upstream"].requests:
        assert not request["complete"], "the upstream must never get a complete request"
        assert ph not in request["body"]


def test_host_header_must_equal_sni(world, icpt):
    it = icpt()
    raw = _raw(world, it, (f"GET / HTTP/1.1\r\nHost: {OTHER}\r\nAuthorization: Bearer "
                           f"{_placeholder(world, 'OTHER_KEY')}\r\n\r\n").encode())
    assert _status(raw) == 403 and b"host-mismatch" in raw
    raw = _raw(world, it, f"GET / HTTP/1.1\r\nHost: {API}:1\r\n\r\n".encode())
    assert _status(raw) == 403 and b"host-mismatch" in raw, "a Host with another port is another origin"
    raw = _raw(world, it, f"GET https://{OTHER}/ HTTP/1.1\r\nHost: {API}\r\n\r\n".encode())
    assert _status(raw) == 403 and b"target-form" in raw
    _assert_nothing_upstream(world, it)


def test_sni_other_than_the_intercepted_name_fails_the_handshake(world, icpt):
    it = icpt()
    with pytest.raises(ssl.SSLError):
        _raw(world, it, f"GET / HTTP/1.1\r\nHost: {OTHER}\r\n\r\n".encode(), sni=OTHER)
    _assert_nothing_upstream(world, it)
    (entry,) = it.wait_entries(1)
    assert entry["verdict"] == "deny" and entry["reason"].startswith("https: client-tls")


def test_secret_of_another_host_is_refused(world, icpt):
    it = icpt()
    raw = _raw(world, it, (f"GET / HTTP/1.1\r\nHost: {API}\r\nAuthorization: Bearer {_placeholder(world)}\r\n"
                           f"X-Other: {_placeholder(world, 'OTHER_KEY')}\r\n\r\n").encode())
    assert _status(raw) == 403 and b"secret-not-for-host" in raw and b"OTHER_KEY" in raw
    assert OTHER_KEY.encode() not in raw and API_KEY.encode() not in raw
    _assert_nothing_upstream(world, it)


def test_wildcard_secret_host_allows_subdomains(world, icpt):
    """OTHER_KEY for "*.example.test" (the `wide` set) may go to api.example.test."""
    ca = SandboxCA.create(world["wide"].hosts)
    bundle = ca.bundle(world["tmp"] / "wide.pem")
    it = icpt(secrets=world["wide"], ca=ca)
    ph = world["wide"].placeholders()["OTHER_KEY"]
    with ssl.create_default_context(cafile=str(bundle)).wrap_socket(
            socket.create_connection(("127.0.0.1", it.port), timeout=20), server_hostname=API) as tls:
        tls.sendall(f"GET / HTTP/1.1\r\nHost: {API}\r\nX-Key: {ph}\r\nConnection: close\r\n\r\n".encode())
        assert tls.recv(100).startswith(b"HTTP/1.1 200")
    assert dict(world["upstream"].requests[0]["headers"])["x-key"] == OTHER_KEY


@pytest.mark.parametrize("request_head, code", [
    ("GET /ws HTTP/1.1\r\nHost: {api}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n", b"upgrade"),
    ("CONNECT {api}:443 HTTP/1.1\r\nHost: {api}:443\r\n\r\n", b"connect"),
])
def test_upgrade_and_connect_are_refused_clearly(world, icpt, request_head, code):
    it = icpt(port_seen_as=443)
    raw = _raw(world, it, request_head.format(api=API).encode())
    assert _status(raw) == 403 and b"X-Sandlot-Refused: " + code in raw and b"not supported" in raw
    _assert_nothing_upstream(world, it)


def test_untrusted_upstream_certificate_gives_502_and_nothing_is_sent(world, icpt):
    """The upstream's certificate is from a CA the host does not trust: the sandbox gets a 502 made by
    the interceptor; the upstream got a failed handshake and no request (so never the value)."""
    it = icpt(upstream_ssl=make_upstream_context())  # the host's real store: no test CA in it
    raw = _raw(world, it, f"GET / HTTP/1.1\r\nHost: {API}\r\nAuthorization: Bearer {_placeholder(world)}\r\n"
                          f"\r\n".encode())
    assert _status(raw) == 502 and b"upstream-tls" in raw
    assert world["upstream"].requests == []
    deadline = time.monotonic() + 5
    while world["upstream"].failed_handshakes == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert world["upstream"].handshakes == 0
    assert it.wait_entries(1)[0]["reason"].startswith("https: upstream-tls")


def test_keep_alive_carries_three_requests_on_one_connection_each_side(world, icpt):
    it = icpt()
    conn = _http(world, it)
    try:
        for i in range(3):
            conn.request("GET", f"/n{i}", headers={"Authorization": f"Bearer {_placeholder(world)}"})
            response = conn.getresponse()
            assert response.status == 200 and response.read() == f"ok GET /n{i}\n".encode()
        conn.request("POST", "/post", body=b"x" * 100_000)
        assert conn.getresponse().read() == b"ok POST /post\n"
    finally:
        conn.close()
    requests = world["upstream"].requests
    assert [r["path"] for r in requests] == ["/n0", "/n1", "/n2", "/post"]
    assert len({r["conn"] for r in requests}) == 1, "the upstream connection must be reused"
    assert it.dials == 1
    assert all(dict(r["headers"]).get("authorization") == f"Bearer {API_KEY}" for r in requests[:3])
    assert requests[3]["body"] == b"x" * 100_000


@pytest.mark.parametrize("path", ["/big-cl", "/big-chunked"])
def test_five_megabyte_response_streams_intact(world, icpt, path):
    it = icpt()
    conn = _http(world, it)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    assert response.status == 200
    assert len(body) == BIG and hashlib.sha256(body).digest() == hashlib.sha256(_pattern(BIG)).digest()
    # and curl, through the bundle variable
    out = subprocess.run(["curl", "-sS", "--max-time", "30", "--resolve", f"{API}:{it.port}:127.0.0.1",
                          f"https://{API}:{it.port}{path}"], capture_output=True,
                         env={"PATH": os.environ["PATH"], "CURL_CA_BUNDLE": str(world["bundle"])}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert hashlib.sha256(out.stdout).digest() == hashlib.sha256(_pattern(BIG)).digest()


def test_response_is_streamed_not_buffered(world, icpt):
    """The upstream sends 1 MiB and then waits until the client has received it: only a streaming
    interceptor lets that finish."""
    it = icpt()
    conn = _http(world, it)
    try:
        conn.request("GET", "/gated")
        response = conn.getresponse()
        first = response.read(1024 * 1024)
        assert len(first) == 1024 * 1024
        world["upstream"].gate.set()
        rest = response.read()
    finally:
        conn.close()
    assert first + rest == _pattern(BIG)


def test_large_uploads_with_expect_continue_and_chunked_encoding_arrive_whole(world, icpt, tmp_path):
    it = icpt(body_buffer=256 * 1024)
    data = os.urandom(3 * 1024 * 1024)
    (tmp_path / "up.bin").write_bytes(data)
    # curl sends "Expect: 100-continue" for a body this size: answered by the interceptor.
    out = subprocess.run(["curl", "-sS", "--max-time", "30", "--resolve", f"{API}:{it.port}:127.0.0.1",
                          "--data-binary", f"@{tmp_path / 'up.bin'}", "-H",
                          f"Authorization: Bearer {_placeholder(world)}", f"https://{API}:{it.port}/up"],
                         capture_output=True, text=True,
                         env={"PATH": os.environ["PATH"], "CURL_CA_BUNDLE": str(world["bundle"])}, timeout=60)
    assert out.returncode == 0 and out.stdout == "ok POST /up\n", out.stderr
    conn = _http(world, it)
    try:
        conn.request("PUT", "/chunked", body=iter([data[:1000], data[1000:]]), encode_chunked=True)
        assert conn.getresponse().read() == b"ok PUT /chunked\n"
    finally:
        conn.close()
    first, second = world["upstream"].requests
    assert first["body"] == data and first["complete"]
    assert "expect" not in dict(first["headers"])
    assert dict(first["headers"])["authorization"] == f"Bearer {API_KEY}"
    assert second["body"] == data and second["complete"]


def test_client_without_the_bundle_fails_and_is_logged(world, icpt):
    """Code that does not trust the sandbox CA gets a TLS error, never a cleartext fallback."""
    it = icpt()
    out = subprocess.run(["curl", "-sS", "--max-time", "10", "--resolve", f"{API}:{it.port}:127.0.0.1",
                          f"https://{API}:{it.port}/"], capture_output=True, text=True,
                         env={"PATH": os.environ["PATH"], "CURL_CA_BUNDLE": str(world["upstream_ca"])})
    assert out.returncode == 60, out  # curl: peer certificate cannot be authenticated
    _assert_nothing_upstream(world, it)
    assert it.wait_entries(1)[0]["reason"].startswith("https: client-tls")


def test_upstream_closing_an_idle_keep_alive_connection_is_redialled(world, icpt):
    it = icpt()
    conn = _http(world, it)
    try:
        conn.request("GET", "/close-after")
        assert conn.getresponse().read() == b"closing\n"
        time.sleep(0.3)  # the upstream's FIN reaches the interceptor while the sandbox's connection idles
        conn.request("GET", "/again")
        assert conn.getresponse().read() == b"ok GET /again\n"
    finally:
        conn.close()
    assert it.dials == 2
    assert len({r["conn"] for r in world["upstream"].requests}) == 2


def test_cancelling_the_interceptor_cuts_both_sides(world, icpt):
    """The broker revokes a connection by cancelling its task: the sandbox's stream stops short (never a
    truncated body that looks complete) and the upstream connection is closed."""
    it = icpt()
    conn = _http(world, it)
    try:
        conn.request("GET", "/gated")
        response = conn.getresponse()
        assert len(response.read(1024 * 1024)) == 1024 * 1024
        (task,) = it.tasks
        world["loop"].call_soon_threadsafe(task.cancel)
        deadline = time.monotonic() + 10
        while not task.done() and time.monotonic() < deadline:
            time.sleep(0.01)
        world["upstream"].gate.set()
        with pytest.raises((http.client.IncompleteRead, ConnectionError, ssl.SSLError)):
            response.read()
    finally:
        conn.close()
    deadline = time.monotonic() + 10
    while world["upstream"].broken_writes == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert world["upstream"].broken_writes == 1


def test_ssl_cert_file_on_the_host_sets_upstream_trust_and_the_bundle(world, icpt, monkeypatch, tmp_path):
    """An air-gapped site points SSL_CERT_FILE at its own roots: upstream verification uses them (no 502
    for the test upstream) and the sandbox's bundle carries them (plus the sandbox CA), not the system's."""
    monkeypatch.setenv("SSL_CERT_FILE", str(world["upstream_ca"]))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    it = icpt(upstream_ssl=make_upstream_context())  # cafile=None: the host store, as in production
    raw = _raw(world, it, f"GET /x HTTP/1.1\r\nHost: {API}\r\nConnection: close\r\n\r\n".encode())
    assert _status(raw) == 200
    bundle = world["ca"].bundle(tmp_path / "b.pem").read_bytes()
    assert bundle == world["upstream_ca"].read_bytes() + b"# Sandlot per-sandbox CA (secrets)\n" + \
        world["ca"].cert_pem


def test_a_revoked_name_refuses_the_next_request_of_an_open_connection(world, icpt):
    verdict = {"reason": None}
    it = icpt(recheck=lambda: verdict["reason"])
    conn = _http(world, it)
    try:
        conn.request("GET", "/before")
        assert conn.getresponse().read() == b"ok GET /before\n"
        verdict["reason"] = "denied by rule api.example.test"
        conn.request("GET", "/after", headers={"Authorization": f"Bearer {_placeholder(world)}"})
        response = conn.getresponse()
        assert response.status == 403 and response.getheader("X-Sandlot-Refused") == "revoked"
        response.read()
    finally:
        conn.close()
    assert [r["path"] for r in world["upstream"].requests] == ["/before"]
    assert it.wait_entries(2)[-1]["verdict"] == "revoked"


def test_pipelined_requests_head_and_double_framing(world, icpt):
    """Two requests in one write are answered in order; HEAD gets no body; a request with both
    Content-Length and chunked framing goes upstream with chunked framing only (no smuggling)."""
    it = icpt()
    ph = _placeholder(world)
    raw = _raw(world, it, (
        f"HEAD /h HTTP/1.1\r\nHost: {API}\r\nAuthorization: Bearer {ph}\r\n\r\n"
        f"POST /p HTTP/1.1\r\nHost: {API}\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        f"5\r\nhello\r\n0\r\n\r\n"
        f"GET /g HTTP/1.1\r\nHost: {API}\r\nConnection: close\r\n\r\n").encode())
    assert raw.count(b"HTTP/1.1 200") == 3
    assert raw.index(b"ok POST /p") < raw.index(b"ok GET /g") and b"ok HEAD" not in raw
    head, post, get = world["upstream"].requests
    assert head["method"] == "HEAD" and dict(head["headers"])["authorization"] == f"Bearer {API_KEY}"
    assert post["body"] == b"hello" and "content-length" not in dict(post["headers"])
    assert get["path"] == "/g"
