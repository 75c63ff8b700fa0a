"""The fake internet for network tests: a "lab" network namespace (where a test's driver runs; it stands for
the host) linked by a TAP CABLE to an "internet" namespace holding TEST-NET hosts: DNS resolvers, HTTP and
HTTPS servers (a test CA), a private host, a metadata address, UDP/TCP echo, a PyPI simple index serving a
wheel and a git repository over HTTP. Everything the internet sees is recorded, so a test can assert what
did NOT arrive.

    with Lab(records={"evil.example.com": ["203.0.113.66"]}) as lab:
        out = lab.python("import urllib.request; print(urllib.request.urlopen('http://203.0.113.10/').read())")
        assert lab.requests(host="203.0.113.10")

Why it is built this way (this kernel has no veth/dummy interfaces):
- each namespace is held by a holder process (`unshare --net python -c <wait for stdin EOF>`), referenced
  as /proc/<pid>/ns/net; when the test process dies its pipes close and every holder exits, so nothing
  persists (no /run/netns bind mounts);
- the two namespaces are linked by a tap device in each (IFF_TAP|IFF_NO_PI) and a forwarder process that
  copies frames between them (MTU 65000: fewer frames for the Python copy loop);
- the lab routes ONLY the internet's hosts (one /32 or /128 each) through the cable: no default route, so
  an address that is not a lab host is unreachable at once, and nothing can leave the machine;
- the internet's servers run as threads of the test process, on sockets created inside the internet
  namespace by a thread that setns()es there first (sockets keep the namespace they were created in);
  so records and logs are plain Python objects, shared without IPC.
Every command that changes network configuration first checks that it targets a namespace this lab made.
"""

from __future__ import annotations

import base64
import ctypes
import datetime
import hashlib
import http.server
import io
import ipaddress
import os
import shutil
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable

REPO_ROOT = Path(__file__).resolve().parents[1]

# -- the lab's world, named in one place -----------------------------------------------------------------
# The lab's own addresses (the "host" of the drivers that run there): TEST-NET, so that "an address of
# the host itself" is a public-looking address a policy must still refuse.
LAB_V4 = "203.0.113.1"
LAB_V6 = "2001:db8:1::1"
GATEWAY_V4 = "203.0.113.254"  # the internet's end of the cable
GATEWAY_V6 = "2001:db8:1::fe"

DNS = "192.0.2.53"          # the resolver upstream of the lab (SANDLOT_UPSTREAM_DNS in drivers)
DNS2 = "198.51.100.53"      # another resolver: a sandbox's direct queries to it must never arrive
WEB_V4 = "203.0.113.10"     # www.example.com
WEB_V6 = "2001:db8::10"     # www.example.com (AAAA)
API_V4 = "198.51.100.20"    # api.example.com
API_V6 = "2001:db8::20"
OTHER_V4 = "203.0.113.20"   # other.example.com (for SNI/Host mismatch: a second allowed-looking host)
V6ONLY = "2001:db8::30"     # v6only.example.com, AAAA only
ECHO_V4 = "203.0.113.7"     # echo.example.com: UDP and TCP echo on ECHO_PORT
ECHO_V6 = "2001:db8::7"
PYPI_V4 = "203.0.113.40"    # pypi.org: the simple index
FILES_V4 = "203.0.113.41"   # files.pythonhosted.org: the wheel
GIT_V4 = "203.0.113.50"     # git.example.com: a repository over dumb HTTP(S)
PRIVATE_V4 = "10.0.0.5"     # a private host the lab CAN reach (so a test proves a policy refuses it)
PRIVATE_V6 = "fd00:5::5"
METADATA_V4 = "169.254.169.254"  # a cloud metadata endpoint the lab can reach (same reason)

ECHO_PORT = 7
BANNER_PORT = 22  # a server-speaks-first service: sends BANNER on accept, then echoes
BANNER = b"SSH-2.0-netlab\r\n"
HTTP_PORT = 80
HTTPS_PORT = 443
DNS_PORT = 53

# Every address the internet answers on; the lab routes exactly these through the cable.
INTERNET_HOSTS = (DNS, DNS2, WEB_V4, WEB_V6, API_V4, API_V6, OTHER_V4, V6ONLY, ECHO_V4, ECHO_V6,
                  PYPI_V4, FILES_V4, GIT_V4, PRIVATE_V4, PRIVATE_V6, METADATA_V4)
RESOLVERS = (DNS, DNS2)
NOT_IN_LAB_V4 = "192.0.2.99"    # TEST-NET addresses with no route in the lab (for "nothing else is reachable")
NOT_IN_LAB_V6 = "2001:db8::99"

# DNS records the internet's resolvers serve. A value is a list of addresses (A/AAAA by family) or a dict
# {"A": [...], "AAAA": [...], "TXT": [...], "CNAME": "target", "MX": [...]} plus options:
# "truncate_udp": True (UDP answers carry TC and no records; TCP answers in full), "rcode": "SERVFAIL",
# "drop": True (never answered), "ttl": 60.
DEFAULT_RECORDS: dict[str, Any] = {
    "www.example.com": [WEB_V4, WEB_V6],
    "api.example.com": [API_V4, API_V6],
    "other.example.com": [OTHER_V4],
    "v6only.example.com": [V6ONLY],
    "echo.example.com": [ECHO_V4, ECHO_V6],
    "pypi.org": [PYPI_V4],
    "files.pythonhosted.org": [FILES_V4],
    "git.example.com": [GIT_V4],
    "txt.example.com": {"A": [WEB_V4], "TXT": ["v=netlab"]},
    "alias.example.com": {"CNAME": "www.example.com"},
    "truncated.example.com": {"A": [WEB_V4], "AAAA": [WEB_V6], "truncate_udp": True},
    # rebinding: public-looking names whose answers are special addresses
    "private.example.com": [PRIVATE_V4],
    "private6.example.com": [PRIVATE_V6],
    "metadata.example.com": [METADATA_V4],
    "loopback.example.com": ["127.0.0.1"],
    "loopback6.example.com": ["::1"],
    "mapped.example.com": {"AAAA": ["::ffff:127.0.0.1"]},
    "mixed.example.com": [WEB_V4, PRIVATE_V4],  # one public and one private answer
}

WHEEL_PROJECT = "sandlot-lab-pkg"  # pip install --index-url https://pypi.org/simple/ sandlot-lab-pkg
WHEEL_MODULE = "sandlot_lab_pkg"
WHEEL_VERSION = "1.0"
WHEEL_VALUE = "installed from the lab index"  # sandlot_lab_pkg.VALUE
GIT_REPO_PATH = "/git/project.git"            # git clone http://git.example.com/git/project.git
GIT_FILE = "README.txt"
GIT_CONTENT = "cloned from the lab\n"

_CLONE_NEWNET = 0x40000000
_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_MTU = 65000
_LAB_TAP = "wan"        # the lab's end of the cable
_INTERNET_TAP = "lab"   # the internet's end


class LabError(RuntimeError):
    pass


def skip_reason() -> str | None:
    """Why this machine cannot build a lab (None when it can). Tests skip with this reason."""
    if os.geteuid() != 0:
        return "the network lab needs root (it creates network namespaces and tap devices)"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun (tap devices are how the lab's namespaces are linked)"
    for tool in ("unshare", "nsenter", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


# -- namespaces ------------------------------------------------------------------------------------------
def _ns_inode(pid: int | str) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def _setns(path: str) -> None:
    """Move the CALLING THREAD into the network namespace at path (Python 3.11 has no os.setns)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def run_inside(ns_path: str, fn: Callable[[], Any]) -> Any:
    """Call fn in a short-lived thread that has entered the namespace: sockets fn creates live there."""
    result: dict[str, Any] = {}

    def body() -> None:
        try:
            _setns(ns_path)
            result["value"] = fn()
        except BaseException as exc:  # re-raised in the caller
            result["error"] = exc

    thread = threading.Thread(target=body, name="netlab-setns")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result.get("value")


_HOLDER = "import sys; print('ready', flush=True); sys.stdin.read()"


class _Namespace:
    """A network namespace held by `unshare --net python` waiting for EOF on stdin (so it dies with us)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.proc = subprocess.Popen(["unshare", "--net", "--", sys.executable, "-c", _HOLDER],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.close()
            raise LabError(f"the {label} namespace holder did not start")
        self.pid = self.proc.pid
        self.path = f"/proc/{self.pid}/ns/net"
        self.inode = _ns_inode(self.pid)
        if self.inode == _ns_inode("self"):
            self.close()
            raise LabError("unshare --net left the holder in our own network namespace")

    def assert_ours(self) -> None:
        """The guard before any configuration change: the target is this lab's namespace, not the host's."""
        if self.proc.poll() is not None or _ns_inode(self.pid) != self.inode or self.inode == _ns_inode("self"):
            raise LabError(f"refusing to configure: {self.path} is not the lab's {self.label} namespace")

    def ip_batch(self, commands: Iterable[str]) -> None:
        self.assert_ours()
        script = "\n".join(commands) + "\n"
        done = subprocess.run(["nsenter", f"--net={self.path}", "--", "ip", "-batch", "-"], input=script,
                              text=True, capture_output=True, timeout=30)
        if done.returncode != 0:
            raise LabError(f"ip -batch in the {self.label} namespace failed: {done.stderr.strip()}\n{script}")

    def sysctl(self, key: str, value: str) -> None:
        self.assert_ours()

        def write() -> None:  # /proc/sys/net shows the namespace of the thread that opens it
            with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
                f.write(value)

        run_inside(self.path, write)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=5)
            except (subprocess.TimeoutExpired, OSError):
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None and not stream.closed:
                stream.close()


def _kill_strays(inodes: set[int], keep: set[int]) -> None:
    """Kill processes still inside the lab's namespaces (started there by drivers), so none outlive it."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in keep or int(entry) == os.getpid():
            continue
        try:
            if _ns_inode(entry) in inodes:
                os.kill(int(entry), signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass


# -- the tap cable ---------------------------------------------------------------------------------------
def _forward_main(lab_ns: str, internet_ns: str) -> None:
    """The cable: a tap in each namespace, frames copied both ways until stdin reaches EOF."""
    import fcntl
    import struct

    taps = []
    for ns, name in ((lab_ns, _LAB_TAP), (internet_ns, _INTERNET_TAP)):
        _setns(ns)  # single-threaded here: moves the process; a tap is created in the opener's namespace
        fd = os.open("/dev/net/tun", os.O_RDWR)
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TAP | _IFF_NO_PI))
        taps.append(fd)

    def copy(src: int, dst: int) -> None:
        while True:
            try:
                frame = os.read(src, _MTU + 64)
            except OSError:
                os._exit(1)
            try:
                os.write(dst, frame)
            except OSError:  # the other end is not up yet, or its queue is full: drop, as a wire would
                pass

    for src, dst in ((taps[0], taps[1]), (taps[1], taps[0])):
        threading.Thread(target=copy, args=(src, dst), daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()
    os._exit(0)


# -- the test CA -----------------------------------------------------------------------------------------
def _make_ca(directory: Path, names: Iterable[str], addresses: Iterable[str]) -> tuple[Path, Path, Path]:
    """A CA and one leaf for every internet name and address. Returns (ca.pem, leaf.pem, leaf.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(days=1), now + datetime.timedelta(days=30)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Sandlot netlab test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, encipher_only=False,
                                       decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in sorted(set(names))]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in sorted(set(addresses))]
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "netlab internet")]))
            .issuer_name(ca_name).public_key(leaf_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_path, leaf_path, key_path = directory / "ca.pem", directory / "leaf.pem", directory / "leaf.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    leaf_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(leaf_key.private_bytes(serialization.Encoding.PEM,
                                                serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    return ca_path, leaf_path, key_path


# -- the wheel and the git repository --------------------------------------------------------------------
def build_wheel(directory: Path) -> Path:
    """A minimal pure-Python wheel (stdlib zipfile) that pip installs: sandlot_lab_pkg.VALUE."""
    dist_info = f"{WHEEL_MODULE}-{WHEEL_VERSION}.dist-info"
    files = {
        f"{WHEEL_MODULE}/__init__.py": f"VALUE = {WHEEL_VALUE!r}\n".encode(),
        f"{dist_info}/METADATA": (f"Metadata-Version: 2.1\nName: {WHEEL_PROJECT}\n"
                                  f"Version: {WHEEL_VERSION}\nSummary: the netlab's test package\n").encode(),
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: netlab\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = io.StringIO()
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.write(f"{name},sha256={digest},{len(data)}\n")
    record.write(f"{dist_info}/RECORD,,\n")
    files[f"{dist_info}/RECORD"] = record.getvalue().encode()
    path = directory / f"{WHEEL_MODULE}-{WHEEL_VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
    return path


def build_git_repo(directory: Path) -> Path:
    """A bare repository with one commit, prepared for git's dumb HTTP protocol (static files)."""
    env = {**os.environ, "GIT_AUTHOR_NAME": "netlab", "GIT_AUTHOR_EMAIL": "netlab@example.com",
           "GIT_COMMITTER_NAME": "netlab", "GIT_COMMITTER_EMAIL": "netlab@example.com",
           "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1"}
    work, bare = directory / "git-work", directory / "project.git"

    def git(*args: str, cwd: Path) -> None:
        subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, timeout=30)

    work.mkdir()
    git("init", "-q", "-b", "main", ".", cwd=work)
    (work / GIT_FILE).write_text(GIT_CONTENT)
    git("add", GIT_FILE, cwd=work)
    git("commit", "-q", "-m", "the lab's commit", cwd=work)
    git("clone", "-q", "--bare", str(work), str(bare), cwd=directory)
    git("update-server-info", cwd=bare)
    return bare


# -- DNS -------------------------------------------------------------------------------------------------
def _normalize(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return {k if k.islower() else k.upper(): v for k, v in value.items()}
    out: dict[str, Any] = {"A": [], "AAAA": []}
    for address in value:
        out["AAAA" if ":" in address else "A"].append(address)
    return out


class _Dns:
    """The internet's resolvers: answer from the lab's records and record every query (even malformed)."""

    def __init__(self, lab: "Lab") -> None:
        self.lab = lab

    def answer(self, data: bytes, server: str, proto: str, client: str) -> bytes | None:
        from dnslib import AAAA, CNAME, MX, QTYPE, RCODE, RR, TXT, A, DNSRecord

        try:
            request = DNSRecord.parse(data)
            qname = str(request.q.qname).rstrip(".").lower()
            qtype = QTYPE.get(request.q.qtype)
        except Exception:  # noqa: BLE001 - garbage in: recorded, not answered
            self.lab._record("queries", server=server, proto=proto, client=client, name=None, qtype=None,
                             malformed=True)
            return None
        self.lab._record("queries", server=server, proto=proto, client=client, name=qname, qtype=qtype)
        reply = request.reply()
        with self.lab._lock:
            entry = self.lab.records.get(qname)
        if entry is None:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply.pack()
        entry = _normalize(entry)
        if entry.get("drop"):
            return None
        if "rcode" in entry:
            reply.header.rcode = getattr(RCODE, entry["rcode"])
            return reply.pack()
        if entry.get("truncate_udp") and proto == "udp":
            reply.header.tc = 1
            return reply.pack()
        ttl = int(entry.get("ttl", 60))
        name = request.q.qname
        if "CNAME" in entry and qtype != "CNAME":
            target = entry["CNAME"]
            reply.add_answer(RR(name, QTYPE.CNAME, rdata=CNAME(target), ttl=ttl))
            with self.lab._lock:
                entry, name = _normalize(self.lab.records.get(target.rstrip(".").lower(), [])), target
        makers = {"A": A, "AAAA": lambda v: AAAA(list(ipaddress.IPv6Address(v).packed)),  # any spelling
                  "TXT": TXT, "CNAME": CNAME, "MX": MX}
        if qtype in makers:
            values = entry.get(qtype, [])
            for value in ([values] if isinstance(values, str) else values):
                reply.add_answer(RR(name, getattr(QTYPE, qtype), rdata=makers[qtype](value), ttl=ttl))
        return reply.pack()

    def servers(self) -> list[socketserver.BaseServer]:
        dns = self

        class Udp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                out = dns.answer(data, self.server.server_address[0], "udp", self.client_address[0])
                if out is not None:
                    sock.sendto(out, self.client_address)

        class Tcp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sock = self.request
                sock.settimeout(10)
                try:
                    while True:
                        head = _recv_exact(sock, 2)
                        if head is None:
                            return
                        data = _recv_exact(sock, int.from_bytes(head, "big"))
                        if data is None:
                            return
                        out = dns.answer(data, self.server.server_address[0], "tcp", self.client_address[0])
                        if out is None:
                            return
                        sock.sendall(len(out).to_bytes(2, "big") + out)
                except OSError:
                    return

        made: list[socketserver.BaseServer] = []
        for address in RESOLVERS:
            made.append(_server(socketserver.ThreadingUDPServer, address, DNS_PORT, Udp))
            made.append(_server(socketserver.ThreadingTCPServer, address, DNS_PORT, Tcp))
        return made


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = sock.recv(left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _server(base: type, address: str, port: int, handler: type, **attrs: Any) -> socketserver.BaseServer:
    """A threading server bound to (address, port); '::' takes IPv6 only (IPv4 gets its own socket)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    plain_bind = socketserver.UDPServer.server_bind if issubclass(base, socketserver.UDPServer) \
        else socketserver.TCPServer.server_bind

    def server_bind(self: Any) -> None:
        if family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        plain_bind(self)  # not HTTPServer's, which looks up the host's FQDN (no resolver in here)
        self.server_name, self.server_port = address, port

    cls = type("LabServer", (base,), {"address_family": family, "allow_reuse_address": True,
                                      "daemon_threads": True, "server_bind": server_bind, **attrs})
    return cls((address, port), handler)


# -- HTTP(S) ---------------------------------------------------------------------------------------------
class _HttpHandler(http.server.BaseHTTPRequestHandler):
    """Every web host's server: routes by path (the same on every address); records every request."""

    protocol_version = "HTTP/1.1"
    server_version = "netlab"
    lab: "Lab"
    scheme: str

    def log_message(self, *args: Any) -> None:
        pass

    def _record(self, body: bytes = b"") -> None:
        local = self.connection.getsockname()
        self.lab._record("requests", scheme=self.scheme, server=_plain(local[0]), port=local[1],
                         client=_plain(self.client_address[0]), method=self.command, path=self.path,
                         host=self.headers.get("Host"), sni=getattr(self.connection, "netlab_sni", None),
                         headers={k.lower(): v for k, v in self.headers.items()}, body=body)

    def _send(self, status: int, body: bytes, content_type: str = "text/plain", extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self._record(body)
        self._send(200, body, "application/octet-stream")

    def do_PUT(self) -> None:  # noqa: N802
        self.do_POST()

    def do_GET(self) -> None:  # noqa: N802
        self._record()
        path = self.path.split("?", 1)[0]
        local = _plain(self.connection.getsockname()[0])
        if path.startswith("/simple"):
            return self._simple(path)
        if path.startswith("/packages/"):
            wheel = self.lab.wheel_path
            if path == f"/packages/{wheel.name}":
                return self._send(200, wheel.read_bytes(), "application/octet-stream")
            return self._send(404, b"no such file\n")
        if path.startswith(GIT_REPO_PATH + "/"):
            return self._git(path[len(GIT_REPO_PATH) + 1:])
        if path.startswith("/bytes/"):
            n = int(path.rsplit("/", 1)[1])
            return self._bytes(n)
        if path == "/stream":
            return self._stream()
        headers = {"X-Lab-Server": local}
        return self._send(200, f"hello from {local} ({self.headers.get('Host')})\n".encode(), extra=headers)

    def _simple(self, path: str) -> None:
        wheel = self.lab.wheel_path
        if path.rstrip("/") == "/simple":
            body = f'<html><body><a href="/simple/{WHEEL_PROJECT}/">{WHEEL_PROJECT}</a></body></html>\n'
        elif path.rstrip("/") == f"/simple/{WHEEL_PROJECT}":
            digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
            url = f"{self.scheme}://files.pythonhosted.org/packages/{wheel.name}#sha256={digest}"
            body = f'<html><body><a href="{url}">{wheel.name}</a></body></html>\n'
        else:
            return self._send(404, b"no such project\n")
        self._send(200, body.encode(), "text/html")

    def _git(self, relative: str) -> None:
        root = self.lab.git_repo.resolve()
        target = (root / relative).resolve()
        if root not in target.parents or not target.is_file():
            return self._send(404, b"not found\n")
        self._send(200, target.read_bytes(), "application/octet-stream")

    def _bytes(self, n: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(n))
        self.end_headers()
        block = b"x" * 65536
        while n > 0:
            self.wfile.write(block[:n])
            n -= len(block)

    def _stream(self) -> None:
        """One line every 0.1 s for up to 60 s (chunked): an open stream for revocation tests."""
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for i in range(600):
                line = f"tick {i}\n".encode()
                self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
                self.wfile.flush()
                time.sleep(0.1)
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            self.close_connection = True


def _plain(address: str) -> str:
    """An IPv4-mapped IPv6 socket address as the plain IPv4 it is."""
    return address[7:] if address.startswith("::ffff:") and "." in address else address


class _TlsMixin:
    """Wrap each accepted connection in TLS in its own thread (a silent client blocks only itself)."""

    tls: ssl.SSLContext

    def finish_request(self, request: socket.socket, client_address: Any) -> None:
        request.settimeout(10)
        try:
            tls = self.tls.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError):
            return
        tls.settimeout(None)
        super().finish_request(tls, client_address)  # type: ignore[misc]


class _EchoTcp(socketserver.BaseRequestHandler):
    banner = b""

    def handle(self) -> None:
        sock = self.request
        try:
            if self.banner:
                sock.sendall(self.banner)
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                sock.sendall(data)
        except OSError:
            return


class _UdpEcho:
    """UDP echo on every internet address, on ECHO_PORT and 443 (so QUIC attempts are seen), recorded.
    Bound per address (a wildcard socket would not tell which host was dialled); one thread serves all."""

    PORTS = (ECHO_PORT, HTTPS_PORT)

    def __init__(self, lab: "Lab") -> None:
        import selectors

        self.lab = lab
        self.selector = selectors.DefaultSelector()
        self.sockets = []
        for address in INTERNET_HOSTS:
            for port in self.PORTS:
                sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_DGRAM)
                sock.bind((address, port))
                sock.setblocking(False)
                self.selector.register(sock, 1)
                self.sockets.append(sock)
        self.stopping = False

    def serve(self) -> None:
        while not self.stopping:
            for key, _ in self.selector.select(timeout=0.2):
                sock = key.fileobj
                try:
                    data, client = sock.recvfrom(65536)
                except OSError:
                    continue
                local = sock.getsockname()
                self.lab._record("udp", server=local[0], port=local[1], client=_plain(client[0]), data=data)
                try:
                    sock.sendto(data, client)
                except OSError:
                    pass

    def close(self) -> None:
        self.stopping = True
        self.selector.close()
        for sock in self.sockets:
            sock.close()


# -- the lab ---------------------------------------------------------------------------------------------
class Lab:
    """The lab and its internet. Use as a context manager; everything is torn down on exit."""

    def __init__(self, records: dict[str, Any] | None = None) -> None:
        self.records: dict[str, Any] = {**DEFAULT_RECORDS, **(records or {})}
        self._lock = threading.Lock()
        self._logs: dict[str, list[dict[str, Any]]] = {"queries": [], "requests": [], "udp": []}
        self._servers: list[socketserver.BaseServer] = []
        self._namespaces: list[_Namespace] = []
        self._cable: subprocess.Popen | None = None
        self._udp: _UdpEcho | None = None
        self.dir = Path(tempfile.mkdtemp(prefix="netlab-"))
        self.lab: _Namespace | None = None
        self.internet: _Namespace | None = None

    # lifecycle
    def __enter__(self) -> "Lab":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self) -> None:
        problem = skip_reason()
        if problem:
            raise LabError(problem)
        names = [n for n in self.records] + ["*.example.com"]
        self.ca_path, self._leaf, self._key = _make_ca(self.dir, names, INTERNET_HOSTS + (GATEWAY_V4, GATEWAY_V6))
        self.wheel_path = build_wheel(self.dir)
        self.git_repo = build_git_repo(self.dir)
        self.resolv_conf = self.dir / "resolv.conf"
        self.resolv_conf.write_text(f"nameserver {DNS}\noptions timeout:2 attempts:2\n")
        self.lab = _Namespace("lab")
        self._namespaces.append(self.lab)
        self.internet = _Namespace("internet")
        self._namespaces.append(self.internet)
        self._cable = subprocess.Popen([sys.executable, __file__, "forward", self.lab.path, self.internet.path],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self._cable.stdout.readline().strip() != "ready":
            raise LabError("the tap cable did not start")
        self._configure()
        self._start_servers()

    def _configure(self) -> None:
        assert self.lab and self.internet
        lab = ["link set lo up", f"link set {_LAB_TAP} mtu {_MTU} up",
               f"addr add {LAB_V4}/32 dev {_LAB_TAP}", f"addr add {LAB_V6}/128 dev {_LAB_TAP} nodad",
               f"route add {GATEWAY_V4}/32 dev {_LAB_TAP}", f"route add {GATEWAY_V6}/128 dev {_LAB_TAP}"]
        internet = ["link set lo up", f"link set {_INTERNET_TAP} mtu {_MTU} up",
                    f"addr add {GATEWAY_V4}/32 dev {_INTERNET_TAP}",
                    f"addr add {GATEWAY_V6}/128 dev {_INTERNET_TAP} nodad",
                    f"route add {LAB_V4}/32 dev {_INTERNET_TAP}", f"route add {LAB_V6}/128 dev {_INTERNET_TAP}"]
        for host in INTERNET_HOSTS:
            v6 = ":" in host
            gateway, bits = (GATEWAY_V6, 128) if v6 else (GATEWAY_V4, 32)
            lab.append(f"route add {host}/{bits} via {gateway} dev {_LAB_TAP}")
            internet.append(f"addr add {host}/{bits} dev lo")
        self.lab.ip_batch(lab)
        self.internet.ip_batch(internet)

    def _start_servers(self) -> None:
        assert self.internet
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(self._leaf, self._key)
        tls.set_alpn_protocols(["http/1.1"])

        def remember_sni(sock: Any, name: str | None, _ctx: Any) -> None:
            sock.netlab_sni = name

        tls.sni_callback = remember_sni
        lab = self

        def make() -> list[socketserver.BaseServer]:
            made = _Dns(lab).servers()
            for wildcard in ("0.0.0.0", "::"):
                http_h = type("Http", (_HttpHandler,), {"lab": lab, "scheme": "http"})
                https_h = type("Https", (_HttpHandler,), {"lab": lab, "scheme": "https"})
                base_http = http.server.ThreadingHTTPServer
                made.append(_server(base_http, wildcard, HTTP_PORT, http_h))
                made.append(_server(type("Tls", (_TlsMixin, base_http), {}), wildcard, HTTPS_PORT, https_h, tls=tls))
                made.append(_server(socketserver.ThreadingTCPServer, wildcard, ECHO_PORT, _EchoTcp))
                made.append(_server(socketserver.ThreadingTCPServer, wildcard, BANNER_PORT,
                                    type("Banner", (_EchoTcp,), {"banner": BANNER})))
            return made

        for server in run_inside(self.internet.path, make):
            self._servers.append(server)
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                             name="netlab-server", daemon=True).start()
        self._udp = run_inside(self.internet.path, lambda: _UdpEcho(lab))
        self._udp_thread = threading.Thread(target=self._udp.serve, name="netlab-udp", daemon=True)
        self._udp_thread.start()

    def close(self) -> None:
        for server in self._servers:  # ask every loop to stop first: one poll interval in all, not each
            server._BaseServer__shutdown_request = True  # type: ignore[attr-defined]
        for server in self._servers:
            try:
                server.shutdown()
                server.server_close()
            except OSError:
                pass
        self._servers.clear()
        if self._udp is not None:
            self._udp.stopping = True
            self._udp_thread.join(timeout=5)
            self._udp.close()
            self._udp = None
        if self._cable is not None:
            if self._cable.poll() is None:
                try:
                    self._cable.stdin.close()
                    self._cable.wait(timeout=5)
                except (subprocess.TimeoutExpired, OSError):
                    self._cable.kill()
                    self._cable.wait()
            for stream in (self._cable.stdin, self._cable.stdout):
                if stream is not None and not stream.closed:
                    stream.close()
            self._cable = None
        if self._namespaces:
            _kill_strays({ns.inode for ns in self._namespaces}, {ns.pid for ns in self._namespaces})
        for ns in self._namespaces:
            ns.close()
        self._namespaces.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    # records and logs
    def set_record(self, name: str, value: Any | None) -> None:
        """Add, change or (value None) remove a DNS record, live."""
        with self._lock:
            if value is None:
                self.records.pop(name.lower(), None)
            else:
                self.records[name.lower()] = value

    def _record(self, log: str, **entry: Any) -> None:
        entry["time"] = time.time()
        with self._lock:
            self._logs[log].append(entry)

    def _select(self, log: str, filters: dict[str, Any]) -> list[dict[str, Any]]:
        with self._lock:
            entries = list(self._logs[log])
        return [e for e in entries if all(v is None or e.get(k) == v for k, v in filters.items())]

    def queries(self, *, name: str | None = None, server: str | None = None,
                qtype: str | None = None) -> list[dict[str, Any]]:
        """DNS queries the internet's resolvers received: {time, server, proto, client, name, qtype[, malformed]}."""
        return self._select("queries", {"name": name and name.rstrip(".").lower(), "server": server, "qtype": qtype})

    def requests(self, *, server: str | None = None, host: str | None = None, path: str | None = None,
                 scheme: str | None = None) -> list[dict[str, Any]]:
        """HTTP(S) requests the internet received: {time, scheme, server, port, client, method, path, host,
        sni, headers (lower-case keys), body}."""
        return self._select("requests", {"server": server, "host": host, "path": path, "scheme": scheme})

    def udp_packets(self, *, server: str | None = None, port: int | None = None) -> list[dict[str, Any]]:
        """UDP datagrams the internet received (echo on ECHO_PORT and 443 of every host):
        {time, server, port, client, data}."""
        return self._select("udp", {"server": server, "port": port})

    def clear_logs(self) -> None:
        with self._lock:
            for entries in self._logs.values():
                entries.clear()

    # running things in the lab
    @property
    def ns_path(self) -> str:
        """/proc/<pid>/ns/net of the lab namespace (for nsenter --net=..., or setns)."""
        assert self.lab
        return self.lab.path

    @property
    def internet_ns_path(self) -> str:
        assert self.internet
        return self.internet.path

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment drivers get: this process's, plus the lab's upstream resolver, the test CA as
        the trust store (SSL_CERT_FILE and the bundle variables of curl, requests, pip, git) and the
        worktree on PYTHONPATH. `extra` wins."""
        env = dict(os.environ)
        ca = str(self.ca_path)
        env.update({"SANDLOT_UPSTREAM_DNS": DNS, "SSL_CERT_FILE": ca, "CURL_CA_BUNDLE": ca,
                    "REQUESTS_CA_BUNDLE": ca, "PIP_CERT": ca, "GIT_SSL_CAINFO": ca,
                    "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)})
        env.update(extra or {})
        return env

    def command(self, argv: list[str], *, resolv: bool = False) -> list[str]:
        """argv wrapped to run in the lab namespace. resolv=True also gives it a private mount namespace
        whose /etc/resolv.conf names the lab's resolver (so getaddrinfo in curl, pip, git resolves there)."""
        assert self.lab
        self.lab.assert_ours()
        prefix = ["nsenter", f"--net={self.lab.path}", "--"]
        if resolv:
            prefix += ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                       'mount --bind "$0" /etc/resolv.conf && exec "$@"', str(self.resolv_conf)]
        return prefix + list(argv)

    def run(self, argv: list[str], *, env: dict[str, str] | None = None, timeout: float = 60,
            check: bool = True, resolv: bool = False, input: str | None = None,
            cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
        """Run a command in the lab; returns the CompletedProcess (text stdout/stderr)."""
        done = subprocess.run(self.command(argv, resolv=resolv), env=self.env(env), timeout=timeout,
                              capture_output=True, text=True, input=input, cwd=cwd or REPO_ROOT)
        if check and done.returncode != 0:
            raise LabError(f"{argv[:3]}... exited {done.returncode} in the lab\n--- stdout\n{done.stdout}"
                           f"\n--- stderr\n{done.stderr}")
        return done

    def python(self, code: str, *, env: dict[str, str] | None = None, timeout: float = 60,
               check: bool = True, resolv: bool = False) -> subprocess.CompletedProcess:
        """Run a Python driver script in the lab (this interpreter; the worktree's sandlot importable)."""
        return self.run([sys.executable, "-c", code], env=env, timeout=timeout, check=check, resolv=resolv)

    def popen(self, argv: list[str], *, env: dict[str, str] | None = None, resolv: bool = False,
              **kwargs: Any) -> subprocess.Popen:
        """Start a long-running process in the lab (killed at close if still running there)."""
        kwargs.setdefault("cwd", REPO_ROOT)
        return subprocess.Popen(self.command(argv, resolv=resolv), env=self.env(env), **kwargs)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "forward":
    _forward_main(sys.argv[2], sys.argv[3])
