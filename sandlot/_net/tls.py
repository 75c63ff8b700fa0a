"""The per-sandbox certificate authority that lets the host read HTTPS requests to a secret's hosts.

To substitute a secret into a request, the host must see the request in clear: for a connection to one
of the secret's hosts the broker terminates TLS itself, with a leaf certificate for the name the sandbox
asked for (its SNI), minted here by a CA that exists for that one sandbox and that only that sandbox
trusts (through the bundle file and the variables of `ca_env`).

Why it is safe to trust: the CA's private key never leaves the host process (it is not even written to
disk); the CA certificate carries `pathLenConstraint 0` (it cannot sign another CA) and name constraints
that permit only the DNS names of the sandbox's secrets, so even a leaked key or a bug minting for another
name yields certificates that Python, curl and OpenSSL reject (Node and git/GnuTLS accept the
constrained CA too; tests/test_net_secrets.py). Leaf certificates are short-lived and cached per name.

Cost (bench/net_secrets.py on the 2-core test machine, loaded): the CA (EC P-256 key + certificate)
~0.3 ms; a leaf ~0.3 ms, with its server SSLContext 2-7 ms (once per name per sandbox, then cached: ~2 us);
writing the bundle (the host trust store, ~220 KB, plus the CA) ~0.9 ms. The upstream verifying context
(~40-90 ms: it loads the host store) is made once per process. A CA is made only for a sandbox that has
secrets.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import re
import ssl
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sandlot._exceptions import InvalidRequest

# Variables that the common TLS clients read for their trust store. The first six are the ones the design
# names (OpenSSL/Python/httpx, requests, curl, pip, git, node); the others are read by widely used SDKs
# (boto3/AWS CLI, httplib2/google-api-python-client, gRPC) and cost nothing to set.
CA_ENV_VARS = (
    "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "PIP_CERT", "GIT_SSL_CAINFO",
    "NODE_EXTRA_CA_CERTS", "AWS_CA_BUNDLE", "HTTPLIB2_CA_CERTS", "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",
)

CA_VALIDITY = datetime.timedelta(days=365)
LEAF_VALIDITY = datetime.timedelta(hours=24)
# A cached leaf is replaced this long before it expires, so no handshake ever presents an expiring one.
LEAF_RENEW_BEFORE = datetime.timedelta(hours=1)
# Certificates start a little in the past: a sandbox's clock is the host's, but a client comparing against
# a coarse clock (or a leaf minted in the same second) must not see "not yet valid".
BACKDATE = datetime.timedelta(minutes=5)


def ca_env(bundle_path_inside_sandbox: str) -> dict[str, str]:
    """The environment that makes the usual clients in the sandbox trust the bundle (host store + CA)."""
    return {name: bundle_path_inside_sandbox for name in CA_ENV_VARS}


def host_trust_store_pem() -> bytes:
    """The PEM certificates this host trusts for upstream TLS: what `ssl.create_default_context()` loads.

    $SSL_CERT_FILE wins (OpenSSL's own rule, reflected by `ssl.get_default_verify_paths`); then the
    OpenSSL default file; then the hashed directory ($SSL_CERT_DIR or the default); then certifi if it is
    importable. An empty result is an error: a bundle without the public roots would break every
    non-secret HTTPS connection of the sandbox.
    """
    paths = ssl.get_default_verify_paths()
    if paths.cafile and os.path.isfile(paths.cafile):
        return Path(paths.cafile).read_bytes()
    if paths.capath and os.path.isdir(paths.capath):
        pem = _pem_from_directory(Path(paths.capath))
        if pem:
            return pem
    try:
        import certifi  # noqa: PLC0415 - optional on the host
    except ImportError:
        certifi = None
    if certifi is not None:
        return Path(certifi.where()).read_bytes()
    raise InvalidRequest("no host trust store found (no SSL_CERT_FILE, no OpenSSL default CA file or "
                         "directory, no certifi): cannot build the sandbox's CA bundle")


def _pem_from_directory(directory: Path) -> bytes:
    """The certificates of an OpenSSL hashed directory, each once (the directory holds symlinks).

    Blocks are copied, not parsed: trust stores carry old roots that strict parsers reject (negative
    serial numbers), and OpenSSL, the reader of the bundle, accepts them.
    """
    seen: set[bytes] = set()
    out: list[bytes] = []
    for entry in sorted(directory.iterdir()):
        if not entry.is_file():
            continue
        try:
            text = entry.read_bytes()
        except OSError:
            continue
        for block in _PEM_BLOCK.findall(text):
            key = b"".join(block.split())
            if key not in seen:
                seen.add(key)
                out.append(block + b"\n")
    return b"".join(out)


_PEM_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----\s+[A-Za-z0-9+/=\s]+?-----END CERTIFICATE-----")


_upstream_lock = threading.Lock()
_upstream_default: ssl.SSLContext | None = None


def upstream_context() -> ssl.SSLContext:
    """The context that verifies a secret host's real certificate: the host's trust store, HTTP/1.1.

    Loading the store costs ~20 ms, so one context serves every sandbox of this process. It honours
    $SSL_CERT_FILE / $SSL_CERT_DIR as they are when first used.
    """
    global _upstream_default
    with _upstream_lock:
        if _upstream_default is None:
            _upstream_default = make_upstream_context()
        return _upstream_default


def make_upstream_context(cafile: str | os.PathLike | None = None) -> ssl.SSLContext:
    """A verifying client context for upstream (`cafile` replaces the host store: tests, air-gapped sites)."""
    context = ssl.create_default_context(cafile=os.fspath(cafile) if cafile is not None else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    return context


def _normalize_host(name: str) -> str:
    return name.strip().rstrip(".").lower()


def permitted_subtree(pattern: str) -> str:
    """The name-constraint subtree for a secret host pattern: "*.example.com" and "example.com" both give
    "example.com" (a dNSName constraint covers the name and all its subdomains, RFC 5280 4.2.1.10)."""
    name = _normalize_host(pattern)
    return name[2:] if name.startswith("*.") else name


class SandboxCA:
    """One sandbox's CA: mints leaf certificates for the names it may speak for, on demand, cached."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate,
                 permitted: tuple[str, ...] | None) -> None:
        self._key = key
        self.cert = cert
        self.cert_pem: bytes = cert.public_bytes(serialization.Encoding.PEM)
        # The subtrees this CA may mint for (None: no constraint, any DNS name).
        self.permitted = permitted
        self.bundle_path: Path | None = None
        self._lock = threading.Lock()
        self._leaves: dict[str, tuple[datetime.datetime, bytes, bytes]] = {}
        self._contexts: dict[str, tuple[datetime.datetime, ssl.SSLContext]] = {}

    def __repr__(self) -> str:  # never the key
        return f"<SandboxCA permitted={self.permitted!r}>"

    @classmethod
    def create(cls, hosts: Iterable[str] | None = None, *, label: str = "sandbox",
               validity: datetime.timedelta = CA_VALIDITY) -> SandboxCA:
        """A fresh CA. `hosts` (secret host patterns: "api.example.com", "*.example.com") become the
        name constraints; None mints for any name (kept for callers that cannot know the names)."""
        permitted = None
        if hosts is not None:
            permitted = tuple(sorted({permitted_subtree(h) for h in hosts}))
            if not permitted:
                raise InvalidRequest("a sandbox CA needs at least one host name to mint for")
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Sandlot"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"Sandlot secrets CA ({label})"[:64]),
        ])
        builder = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        )
        if permitted is not None:
            builder = builder.add_extension(x509.NameConstraints(
                permitted_subtrees=[x509.DNSName(n) for n in permitted], excluded_subtrees=None),
                critical=True)
        return cls(key, builder.sign(key, hashes.SHA256()), permitted)

    def may_mint(self, name: str) -> bool:
        name = _normalize_host(name)
        if not name or _is_ip(name):
            return False
        if self.permitted is None:
            return True
        return any(name == p or name.endswith("." + p) for p in self.permitted)

    def leaf_for(self, name: str) -> tuple[bytes, bytes]:
        """(certificate PEM, private key PEM) of a leaf for `name`; cached until shortly before expiry."""
        name = _normalize_host(name)
        if not self.may_mint(name):
            raise InvalidRequest(f"this sandbox's CA does not mint certificates for {name!r}")
        now = datetime.datetime.now(datetime.timezone.utc)
        with self._lock:
            cached = self._leaves.get(name)
            if cached is not None and cached[0] - LEAF_RENEW_BEFORE > now:
                return cached[1], cached[2]
            leaf_key = ec.generate_private_key(ec.SECP256R1())
            not_after = now + LEAF_VALIDITY
            cert = (
                x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64])]))
                .issuer_name(self.cert.subject)
                .public_key(leaf_key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - BACKDATE).not_valid_after(not_after)
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                    encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                               critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()),
                               critical=False)
                .sign(self._key, hashes.SHA256())
            )
            cert_pem = cert.public_bytes(serialization.Encoding.PEM)
            key_pem = leaf_key.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption())
            self._leaves[name] = (not_after, cert_pem, key_pem)
            return cert_pem, key_pem

    def server_context(self, name: str) -> ssl.SSLContext:
        """A server context presenting the leaf for `name` (+ the CA), HTTP/1.1 only, TLS >= 1.2.

        A ClientHello whose SNI is not `name` fails the handshake: the broker checked the SNI when it
        picked this connection for interception, and the check is repeated where the certificate is used.
        """
        name = _normalize_host(name)
        now = datetime.datetime.now(datetime.timezone.utc)
        with self._lock:
            cached = self._contexts.get(name)
            if cached is not None and cached[0] - LEAF_RENEW_BEFORE > now:
                return cached[1]
        cert_pem, key_pem = self.leaf_for(name)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])
        _load_chain_from_memory(context, cert_pem + self.cert_pem, key_pem)

        def require_sni(sslobj, server_name, ctx):  # noqa: ARG001 - ssl's callback signature
            if server_name is None or _normalize_host(server_name) != name:
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            return None

        context.sni_callback = require_sni
        with self._lock:
            self._contexts[name] = (self._leaves[name][0], context)
        return context

    def bundle_pem(self, *, host_pem: bytes | None = None) -> bytes:
        """The host trust store followed by this CA, as one PEM. The sandbox needs both: the CA for the
        intercepted secret hosts, the public roots for every other HTTPS connection, which the broker
        passes through untouched."""
        store = host_trust_store_pem() if host_pem is None else host_pem
        if store and not store.endswith(b"\n"):
            store += b"\n"
        return store + b"# Sandlot per-sandbox CA (secrets)\n" + self.cert_pem

    def bundle(self, path: str | os.PathLike, *, host_pem: bytes | None = None) -> Path:
        """Write ``bundle_pem()`` as one file (atomically, mode 0644)."""
        path = Path(path)
        content = self.bundle_pem(host_pem=host_pem)
        fd, tmp = tempfile.mkstemp(prefix=".bundle-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(content)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self.bundle_path = path
        return path


def _load_chain_from_memory(context: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    """`load_cert_chain` wants paths; memfds keep the leaf key off every filesystem."""
    cert_fd = os.memfd_create("sandlot-leaf-cert", os.MFD_CLOEXEC)
    key_fd = os.memfd_create("sandlot-leaf-key", os.MFD_CLOEXEC)
    try:
        os.write(cert_fd, chain_pem)
        os.write(key_fd, key_pem)
        context.load_cert_chain(f"/proc/self/fd/{cert_fd}", f"/proc/self/fd/{key_fd}")
    finally:
        os.close(cert_fd)
        os.close(key_fd)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True

