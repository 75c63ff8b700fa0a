"""Test helpers for images: small OCI images made from the host's own files, and a throwaway registry.

The images are real OCI images (an OCI layout: blobs, manifest, config, index.json) built in a
second or two from files already on this Debian host: a "base" layer with dash and a few coreutils
(plus their libraries, found with ldd), and a "python" layer with Debian's /usr/bin/python3.11 and a
trimmed stdlib. The python image is base + python, so the two images share their first layer.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import time
from pathlib import Path

BASE_TOOLS = ["/bin/sh", "/bin/dash", "/usr/bin/ls", "/usr/bin/cat", "/usr/bin/echo", "/usr/bin/id", "/usr/bin/env",
              "/usr/bin/mkdir", "/usr/bin/rm", "/usr/bin/head", "/usr/bin/sleep", "/usr/bin/uname", "/usr/bin/wc",
              "/usr/bin/touch", "/usr/bin/pwd", "/usr/bin/true", "/usr/bin/false", "/usr/bin/readlink"]
HOST_PYTHON = "/usr/bin/python3.11"
STDLIB = "/usr/lib/python3.11"
STDLIB_SKIP = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data", "__pycache__",
               "config-3.11-x86_64-linux-gnu"}


def available() -> str | None:
    """None when this host can build the test images, else why not."""
    for path in [HOST_PYTHON, STDLIB, *BASE_TOOLS]:
        if not os.path.exists(path):
            return f"{path} is missing on this host"
    if shutil.which("ldd") is None:
        return "ldd is missing"
    return None


def _libs(paths: list[str]) -> set[str]:
    found: set[str] = set()
    for path in paths:
        out = subprocess.run(["ldd", path], capture_output=True, text=True).stdout
        for line in out.splitlines():
            parts = line.split()
            if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/"):
                found.add(parts[2])
            elif parts and parts[0].startswith("/"):
                found.add(parts[0])  # the dynamic loader
    return found


class _Layer:
    """A layer tar built from host paths: symlink chains are kept, parents get directory entries."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.PAX_FORMAT)
        self.seen: set[str] = set()

    def _entry(self, path: str, **kw) -> None:
        if path in self.seen or path == "/":
            return
        self._parents(path)
        self.seen.add(path)
        info = tarfile.TarInfo(path.lstrip("/"))
        info.mtime = 1700000000
        for key, value in kw.items():
            setattr(info, key, value)
        if info.type == tarfile.REGTYPE:
            data = Path(path).read_bytes()
            info.size = len(data)
            self.tar.addfile(info, io.BytesIO(data))
        else:
            self.tar.addfile(info)

    def _parents(self, path: str) -> None:
        parent = os.path.dirname(path)
        if parent != "/" and parent not in self.seen:
            self._entry(parent, type=tarfile.DIRTYPE, mode=0o755)

    def add(self, path: str) -> None:
        """Add a host path, following (and recording) every symlink on the way."""
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            prefix = "/" + "/".join(parts[:i])
            if os.path.islink(prefix):
                target = os.readlink(prefix)
                self._entry(prefix, type=tarfile.SYMTYPE, linkname=target, mode=0o777)
                resolved = os.path.normpath(os.path.join(os.path.dirname(prefix), target, *parts[i:]))
                self.add(resolved)
                return
        if os.path.isdir(path):
            self._entry(path, type=tarfile.DIRTYPE, mode=os.stat(path).st_mode & 0o7777)
        else:
            self._entry(path, type=tarfile.REGTYPE, mode=os.stat(path).st_mode & 0o7777)

    def add_tree(self, root: str, skip: set[str]) -> None:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in skip)
            self._entry(dirpath, type=tarfile.DIRTYPE, mode=0o755)
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                if os.path.islink(full):
                    self._entry(full, type=tarfile.SYMTYPE, linkname=os.readlink(full), mode=0o777)
                elif os.path.isfile(full):
                    self._entry(full, type=tarfile.REGTYPE, mode=os.stat(full).st_mode & 0o7777)

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._parents(path)
        self.seen.add(path)
        info = tarfile.TarInfo(path.lstrip("/"))
        info.size, info.mode, info.mtime = len(data), mode, 1700000000
        self.tar.addfile(info, io.BytesIO(data))

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        self._entry(path, type=tarfile.DIRTYPE, mode=mode)

    def finish(self) -> tuple[bytes, str]:
        """(gzipped blob, diff_id)"""
        self.tar.close()
        raw = self.buf.getvalue()
        return gzip.compress(raw, compresslevel=1, mtime=0), "sha256:" + hashlib.sha256(raw).hexdigest()


def base_layer() -> tuple[bytes, str]:
    layer = _Layer()
    for name in ("bin", "sbin", "lib", "lib64"):
        if os.path.islink("/" + name):
            layer.add("/" + name)
    for path in BASE_TOOLS:
        layer.add(path)
    for lib in _libs([os.path.realpath(p) for p in BASE_TOOLS]):
        layer.add(lib)
    layer.add_file("/etc/passwd", b"root:x:0:0:root:/root:/bin/sh\ndaemon:x:1:1:daemon:/:/bin/false\n")
    layer.add_file("/etc/group", b"root:x:0:\n")
    layer.add_dir("/tmp", 0o1777)
    layer.add_dir("/root", 0o700)
    layer.add_file("/root/secret", b"image root's secret\n", 0o600)
    layer.add_file("/etc/motd", b"welcome\n")
    # Planted: symlinks where a sandbox mounts its home and agent dir must never lead a mount (done
    # before the pivot, on the host's tree) anywhere else. Sandlot replaces them with real dirs.
    layer._entry("/home", type=tarfile.SYMTYPE, linkname="/etc", mode=0o777)
    layer._entry("/opt", type=tarfile.SYMTYPE, linkname="/", mode=0o777)
    return layer.finish()


def python_layer() -> tuple[bytes, str]:
    layer = _Layer()
    layer.add(HOST_PYTHON)
    layer.add("/usr/bin/python3")
    layer.add_tree(STDLIB, STDLIB_SKIP)
    dynload = [str(p) for p in Path(STDLIB, "lib-dynload").glob("*.so")]
    for lib in _libs([HOST_PYTHON] + dynload):
        layer.add(lib)
    return layer.finish()


def _blob(layout: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs/sha256").mkdir(parents=True, exist_ok=True)
    (layout / "blobs/sha256" / digest).write_bytes(data)
    return "sha256:" + digest


def write_layout(layout: Path, images: dict[str, tuple[list[tuple[bytes, str]], dict]]) -> dict[str, str]:
    """Write an OCI layout holding ``{tag: ([(layer blob, diff_id)], image config)}``. Returns tag -> manifest digest."""
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    index = {"schemaVersion": 2, "manifests": []}
    digests = {}
    for tag, (layers, config) in images.items():
        cfg = {"architecture": "amd64", "os": "linux", "config": config,
               "rootfs": {"type": "layers", "diff_ids": [d for _, d in layers]},
               "history": [{"created_by": "sandlot tests"} for _ in layers]}
        cfg_bytes = json.dumps(cfg).encode()
        manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                               "digest": _blob(layout, cfg_bytes), "size": len(cfg_bytes)},
                    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                "digest": _blob(layout, blob), "size": len(blob)} for blob, _ in layers]}
        man_bytes = json.dumps(manifest).encode()
        digest = _blob(layout, man_bytes)
        digests[tag] = digest
        index["manifests"].append({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest,
                                   "size": len(man_bytes),
                                   "annotations": {"org.opencontainers.image.ref.name": tag}})
    (layout / "index.json").write_text(json.dumps(index))
    return digests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Registry:
    """Debian's docker-registry on a free loopback port, with its own config and storage."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.storage = workdir / "storage"
        self.storage.mkdir(parents=True, exist_ok=True)
        config = workdir / "config.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: %s\n"
            "  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:%d\n" % (self.storage, self.port))
        self.log = open(workdir / "registry.log", "wb")
        self.proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("docker-registry did not start: " + (workdir / "registry.log").read_text())
                time.sleep(0.05)

    def push(self, layout: Path, tag: str, repo: str) -> None:
        subprocess.run(["skopeo", "copy", "--insecure-policy", "--dest-tls-verify=false", f"oci:{layout}:{tag}",
                        f"docker://{self.host}/{repo}"], check=True, capture_output=True)

    def blob_path(self, digest: str) -> Path:
        hexd = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def make_wheel(dest: Path, name: str, version: str, code: str) -> Path:
    """A minimal pure-Python wheel (one module), enough for pip to install offline."""
    import base64
    import zipfile

    dest.mkdir(parents=True, exist_ok=True)
    wheel = dest / f"{name}-{version}-py3-none-any.whl"
    dist = f"{name}-{version}.dist-info"
    files = {f"{name}.py": code.encode(),
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: sandlot-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return wheel
