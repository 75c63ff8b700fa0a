"""OCI images as templates: pull (skopeo), unpack (umoci), records, and what sandboxes need to run them.

On disk, under the data dir (``/var/lib/sandlot`` as root; ``SANDLOT_DATA_DIR`` overrides)::

    images/oci/              one OCI image layout for every image: blobs shared by digest, one tag per template
    images/rootfs/<key>/     an unpacked root filesystem per image digest (or per build), never written once there
    images/hostkit/<hash>/   mount points for the host interpreter (only images without Python use it)
    templates/<name>.json    the template records that ``get_template`` reads

Every change is staged and then renamed into place under one lock (``images/.lock``): a pull that
fails (bad reference, unreachable registry, corrupt layer, full disk) leaves no record, no root and no
tag behind, only blobs that ``gc`` sweeps (they are content-addressed: a complete blob is never wrong).

Nothing from an image ever runs on the host. skopeo and umoci only copy and unpack (umoci unpacks
untrusted layers without following their symlinks); the Python in an image is found by reading files
(symlinks resolved inside the root, the version read from the interpreter's name and stdlib dir), and
every file Sandlot itself writes into a root is written through directory descriptors with
O_NOFOLLOW, so a planted symlink cannot lead the host anywhere.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from ._exceptions import HostUnsupported, ImageError, InvalidRequest, SandlotError
from ._templates import NAME_RE, data_root, read_record, records_dir

Progress = Callable[[dict], None]  # {"phase": ..., "message": ..., and per phase: "done"/"total"/"blob"}

AGENT_INSIDE = "/opt/sandlot/_agent"
HOST_KIT = "/opt/sandlot/host"  # where the host interpreter appears in roots without a Python of their own
SCRATCH = "/.sandlot-scratch"  # must match _agent.isolation.SCRATCH
USER_UID = 1000
MIN_PYTHON = (3, 8)
PYTHON_CANDIDATES = ("/usr/local/bin/python3", "/usr/bin/python3", "/usr/local/bin/python", "/usr/bin/python",
                     "/opt/conda/bin/python3", "/opt/conda/bin/python", "/bin/python3")
COMMAND_TIMEOUT = 3600  # seconds for one skopeo/umoci run



# -- places and the lock ---------------------------------------------------------------------------
def images_dir() -> Path:
    path = data_root() / "images"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def layout_dir() -> Path:
    return images_dir() / "oci"


def rootfs_dir() -> Path:
    path = images_dir() / "rootfs"
    path.mkdir(mode=0o755, exist_ok=True)
    return path


@contextlib.contextmanager
def locked(progress: Optional[Progress] = None) -> Iterator[None]:
    """One writer at a time for the layout, the roots and the records (across processes)."""
    fd = os.open(images_dir() / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _emit(progress, "wait", "waiting for another pull, load, build or rm to finish")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _emit(progress: Optional[Progress], phase: str, message: str, **extra: Any) -> None:
    if progress is not None:
        progress(dict(phase=phase, message=message, **extra))


def _write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# -- references and names --------------------------------------------------------------------------
_DOMAIN = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REF_RE = re.compile(rf"(?:(?P<domain>{_DOMAIN})/)?(?P<path>{_COMPONENT}(?:/{_COMPONENT})*)"
                     r"(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?")


def parse_ref(ref: str) -> dict:
    """Check an image reference (``[registry/]repo[:tag][@sha256:...]``, optionally ``docker://``)."""
    if not isinstance(ref, str) or not ref.strip():
        raise InvalidRequest("an image reference is needed, like python:3.12-slim or 127.0.0.1:5000/team/img:1")
    raw = ref.strip()
    if raw.startswith("docker://"):
        raw = raw[len("docker://"):]
    elif re.match(r"^[a-z-]+:(?!\d)", raw) and "/" not in raw.split(":", 1)[0] and raw.split(":", 1)[0] in (
            "oci", "oci-archive", "docker-archive", "dir", "containers-storage", "docker-daemon"):
        raise InvalidRequest(f"{ref!r} is not a registry reference; use `sandlot template load FILE` for archives")
    m = _REF_RE.fullmatch(raw)
    if m is None or len(raw) > 512:
        raise InvalidRequest(f"bad image reference {ref!r}: expected [registry/]repository[:tag][@sha256:digest], "
                             "lowercase repository, e.g. python:3.12-slim")
    domain, path = m.group("domain"), m.group("path")
    # "team/img" has no registry: the first part is a registry only if it looks like a host.
    if domain is not None and not ("." in domain or ":" in domain or domain == "localhost" or domain.startswith("[")):
        path, domain = f"{domain}/{path}", None
    tag, digest = m.group("tag"), m.group("digest")
    if tag and digest:  # skopeo takes one or the other; the digest is the stronger promise
        raw = (f"{domain}/" if domain else "") + f"{path}@{digest}"
    return {"domain": domain, "path": path, "tag": tag, "digest": digest, "ref": raw}


def default_name(ref: str) -> str:
    parts = parse_ref(ref)
    name = parts["path"].rsplit("/", 1)[-1]
    if parts["tag"] and parts["tag"] != "latest":
        name += "-" + parts["tag"]
    elif parts["digest"]:
        name += "-" + parts["digest"].split(":")[1][:12]
    return sanitize_name(name)


def sanitize_name(name: str) -> str:
    name = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._")[:64] or "image"
    if name == "python":
        name = "python-image"  # never shadow the builtin template
    return name


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidRequest(f"bad template name {name!r}: lowercase letters, digits, '.', '_' and '-', "
                             "starting with a letter or digit, at most 64 characters")
    if name == "python":
        raise InvalidRequest("'python' is the builtin template; choose another name")
    return name


# -- tools -----------------------------------------------------------------------------------------
def tool(name: str) -> str:
    path = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/bin:/usr/sbin:/bin")
    if path is None:
        raise HostUnsupported(f"images need {name} (Debian package `{name}`): apt-get install skopeo umoci")
    return path


def _policy_args() -> list[str]:
    """The system's signature policy when there is one; otherwise accept (as skopeo's default file does)."""
    if Path("/etc/containers/policy.json").exists() or Path.home().joinpath(".config/containers/policy.json").exists():
        return []
    policy = images_dir() / "policy.json"
    if not policy.exists():
        _write_json_atomic(policy, {"default": [{"type": "insecureAcceptAnything"}]})
    return ["--policy", str(policy)]


def _classify(stderr: str, what: str, registry: Optional[str] = None) -> SandlotError:
    """Turn skopeo's last words into one clear sentence."""
    msgs = re.findall(r'msg="((?:[^"\\]|\\.)*)"', stderr)
    detail = (msgs[-1] if msgs else stderr.strip().splitlines()[-1] if stderr.strip() else "no output")
    detail = detail.replace('\\"', '"')
    detail = re.sub(r'^Error parsing image name "[^"]*": ', "", detail)
    low = detail.lower()
    where = f"the registry {registry}" if registry else "the registry"
    if "invalid reference format" in low or "invalid image name" in low:
        return InvalidRequest(f"bad image reference for {what}: {detail}")
    if "http response to https client" in low:
        return ImageError(f"{where} speaks plain HTTP, not HTTPS: pass --insecure (--tls-verify=false) "
                          f"if you trust it (a registry on loopback, say)")
    if "x509" in low or "certificate" in low or "tls:" in low:
        return ImageError(f"{where} failed TLS verification ({detail}); pass --insecure only if you trust it")
    if any(s in low for s in ("connection refused", "no such host", "i/o timeout", "network is unreachable",
                              "no route to host", "dial tcp", "connection reset", "tls handshake timeout",
                              "context deadline exceeded", "pinging container registry")):
        return ImageError(f"cannot reach {where} for {what}: {detail}")
    if any(s in low for s in ("unauthorized", "authentication required", "denied", "forbidden")):
        return ImageError(f"{where} refused access to {what} ({detail}); log in with `skopeo login` if it is private")
    if any(s in low for s in ("manifest unknown", "name unknown", "not found", "no such image", "404")):
        return ImageError(f"{what} was not found: {detail}")
    if any(s in low for s in ("digest", "did not match", "unexpected eof", "gzip", "invalid tar", "checksum",
                              "archive/tar", "corrupt", "flate")):
        return ImageError(f"a layer of {what} is corrupt ({detail}); nothing of it was kept")
    if "no space left" in low:
        return ImageError(f"no space left on the device while fetching {what}")
    return ImageError(f"{what} failed: {detail}")


def _run(argv: list[str], what: str, registry: Optional[str] = None,
         on_line: Optional[Callable[[str], None]] = None) -> str:
    """Run skopeo/umoci; stream stdout lines to ``on_line``; a failure raises a classified error."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True,
                                env=dict(os.environ, LC_ALL="C"))
        killer = threading.Timer(COMMAND_TIMEOUT, proc.kill)
        killer.start()
        out = []
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                out.append(line)
                if on_line is not None:
                    on_line(line.rstrip("\n"))
            proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            killer.cancel()
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if proc.returncode != 0:
        if proc.returncode < 0:
            raise ImageError(f"{what}: {Path(argv[0]).name} was stopped after {COMMAND_TIMEOUT} s")
        raise _classify(stderr or "".join(out), what, registry)
    return "".join(out)


# -- the layout --------------------------------------------------------------------------------------
REF_ANNOTATION = "org.opencontainers.image.ref.name"


def _read_index() -> dict:
    try:
        return json.loads((layout_dir() / "index.json").read_text())
    except FileNotFoundError:
        return {"schemaVersion": 2, "manifests": []}


def _tag_descriptor(tag: str) -> Optional[dict]:
    for desc in _read_index().get("manifests", []):
        if (desc.get("annotations") or {}).get(REF_ANNOTATION) == tag:
            return desc
    return None


def _retag(old: Optional[str], new: Optional[str]) -> None:
    """Rename tag ``old`` to ``new`` in the layout's index (``new=None`` drops ``old``; replaces a previous ``new``)."""
    index = _read_index()
    kept = []
    for desc in index.get("manifests", []):
        tag = (desc.get("annotations") or {}).get(REF_ANNOTATION)
        if new is not None and tag == new:
            continue
        if tag == old:
            if new is None:
                continue
            desc = dict(desc, annotations=dict(desc.get("annotations") or {}, **{REF_ANNOTATION: new}))
        kept.append(desc)
    index["manifests"] = kept
    _write_json_atomic(layout_dir() / "index.json", index)


def _blob(digest: str, limit: int = 4 * 1024 * 1024) -> dict:
    algo, _, hexd = digest.partition(":")
    if algo != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexd):
        raise ImageError(f"unsupported digest {digest!r}")
    data = (layout_dir() / "blobs" / algo / hexd).read_bytes()[: limit + 1]
    if len(data) > limit or hashlib.sha256(data).hexdigest() != hexd:
        raise ImageError(f"blob {digest} in the image cache is corrupt")
    return json.loads(data)


def _image_config(manifest_digest: str) -> tuple[dict, dict]:
    manifest = _blob(manifest_digest)
    if "config" not in manifest:
        raise ImageError(f"{manifest_digest} is not an image manifest")
    return manifest, _blob(manifest["config"]["digest"])


# -- pull and load ---------------------------------------------------------------------------------
def pull(ref: str, name: Optional[str] = None, *, tls_verify: bool = True,
         progress: Optional[Progress] = None) -> dict:
    """Pull ``ref`` from its registry and make it the template ``name``. Returns the record."""
    parts = parse_ref(ref)
    name = check_name(name) if name is not None else default_name(ref)
    registry = parts["domain"] or "docker.io"
    tls = [] if tls_verify else ["--tls-verify=false"]
    skopeo = tool("skopeo")
    tool("umoci")
    source = "docker://" + parts["ref"]
    _emit(progress, "resolve", f"resolving {parts['ref']}")
    layers = _remote_layers(skopeo, tls, parts, registry)
    return _import(source, ["--src-tls-verify=false"] if not tls_verify else [], name, progress,
                   {"source": "pull", "ref": parts["ref"]}, parts["ref"], registry, layers)


def _remote_layers(skopeo: str, tls: list[str], parts: dict, registry: str) -> list[dict]:
    """The layers (digest, size) this host will fetch: checks the reference and the registry early."""
    what = f"image {parts['ref']}"

    def raw(source: str) -> dict:
        text = _run([skopeo, "--command-timeout", "120s", "inspect", "--raw", *tls, source], what, registry)
        try:
            return json.loads(text)
        except ValueError:
            raise ImageError(f"{what}: the registry sent a manifest that is not JSON") from None

    manifest = raw("docker://" + parts["ref"])
    if "manifests" in manifest:  # a multi-platform index: skopeo copies the one for this host
        arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
        chosen = [m for m in manifest["manifests"] if (m.get("platform") or {}).get("os") == "linux"
                  and (m.get("platform") or {}).get("architecture") == arch]
        if not chosen:
            raise ImageError(f"{what} has no image for linux/{arch}")
        repo = (parts["domain"] + "/" if parts["domain"] else "") + parts["path"]
        manifest = raw(f"docker://{repo}@{chosen[0]['digest']}")
    return [{"Digest": layer.get("digest"), "Size": int(layer.get("size") or 0)}
            for layer in manifest.get("layers") or [] if isinstance(layer, dict)]


def load(path: str, name: Optional[str] = None, *, progress: Optional[Progress] = None) -> dict:
    """Load a docker-archive (``docker save``) or OCI-layout tarball, or an OCI layout directory."""
    file = Path(path)
    if not file.exists():
        raise InvalidRequest(f"no such file: {path}")
    tool("skopeo")
    tool("umoci")
    if file.is_dir():
        if not (file / "index.json").is_file():
            raise InvalidRequest(f"{path} is a directory but not an OCI layout (no index.json)")
        index = json.loads((file / "index.json").read_text())
        source, found = f"oci:{file.resolve()}", _oci_names(index)
    else:
        kind, found = _sniff_archive(file)
        source = f"{kind}:{file.resolve()}"
    if len(found) > 1:
        raise InvalidRequest(f"{path} holds {len(found)} images ({', '.join(found)}); load one at a time")
    if name is None:
        name = default_name(found[0]) if found and _safe_ref(found[0]) else sanitize_name(file.name.split(".")[0])
    check_name(name)
    return _import(source, [], name, progress, {"source": "load", "ref": str(file.resolve())}, file.name, None, None)


def _safe_ref(ref: str) -> bool:
    try:
        parse_ref(ref)
        return True
    except InvalidRequest:
        return False


def _oci_names(index: dict) -> list[str]:
    return [(d.get("annotations") or {}).get(REF_ANNOTATION, d.get("digest", "?")) for d in index.get("manifests", [])]


def _sniff_archive(file: Path) -> tuple[str, list[str]]:
    try:
        with tarfile.open(file) as tar:
            names = {}
            for member in tar:
                if member.name.lstrip("./") in ("manifest.json", "index.json", "oci-layout") and member.isfile():
                    f = tar.extractfile(member)
                    names[member.name.lstrip("./")] = f.read(4 * 1024 * 1024) if f else b""
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise InvalidRequest(f"{file} is not a readable tarball: {exc}") from None
    try:
        if "oci-layout" in names and "index.json" in names:
            return "oci-archive", _oci_names(json.loads(names["index.json"]))
        if "manifest.json" in names:
            manifest = json.loads(names["manifest.json"])
            return "docker-archive", [(m.get("RepoTags") or ["?"])[0] for m in manifest]
    except ValueError as exc:
        raise InvalidRequest(f"{file}: its image index is not JSON ({exc})") from None
    raise InvalidRequest(f"{file} is neither a docker-archive (docker save) nor an OCI-layout tarball")


def _import(source: str, src_flags: list[str], name: str, progress: Optional[Progress], record_base: dict,
            what: str, registry: Optional[str], layers: Optional[list]) -> dict:
    skopeo, umoci = tool("skopeo"), tool("umoci")
    with locked(progress):
        layout = layout_dir()
        incoming = "incoming-" + secrets.token_hex(6)
        blobs = layout / "blobs" / "sha256"
        total = len(layers) if layers else None
        sizes = {d["Digest"]: int(d.get("Size") or 0) for d in layers or []}
        total_bytes = sum(sizes.values()) or None
        _emit(progress, "copy", f"fetching {what}", done=0, total=total, bytes=0, total_bytes=total_bytes)

        stop = threading.Event()

        def watch() -> None:  # blobs appear under their digest once complete (skopeo renames them in)
            while not stop.wait(0.25):
                done = [d for d in sizes if (blobs / d.split(":", 1)[1]).exists()]
                _emit(progress, "copy", f"fetching {what}", done=len(done), total=total,
                      bytes=sum(sizes[d] for d in done), total_bytes=total_bytes)

        watcher = threading.Thread(target=watch, daemon=True) if layers and progress else None
        if watcher:
            watcher.start()

        def on_line(line: str) -> None:
            m = re.match(r"Copying (blob|config) (sha256:)?([0-9a-f]+)", line)
            if m:
                _emit(progress, "blob", line.strip(), blob=m.group(3)[:12], kind=m.group(1))

        staged: list[Path] = []
        try:
            try:
                _run([skopeo, "--command-timeout", f"{COMMAND_TIMEOUT}s", "copy", *_policy_args(), *src_flags,
                      source, f"oci:{layout}:{incoming}"], what, registry, on_line)
            finally:
                stop.set()
                if watcher:
                    watcher.join()
            desc = _tag_descriptor(incoming)
            if desc is None:
                raise ImageError(f"{what}: skopeo reported success but stored no image")
            digest = desc["digest"]
            manifest, config = _image_config(digest)
            _emit(progress, "copy", f"fetched {what}", done=total, total=total, bytes=total_bytes,
                  total_bytes=total_bytes)
            key = digest.split(":", 1)[1]
            rootfs = rootfs_dir() / key
            if not rootfs.is_dir():
                _emit(progress, "unpack", f"unpacking {digest[:19]}")
                tmp = rootfs_dir() / f".tmp-{key[:16]}-{secrets.token_hex(4)}"
                staged.append(tmp)
                argv = [umoci, "raw", "unpack", *([] if os.geteuid() == 0 else ["--rootless"]),
                        "--image", f"{layout}:{incoming}", str(tmp)]
                _run(argv, f"unpacking {what}")
                finalize_rootfs(tmp)
                tmp.rename(rootfs)
                staged.remove(tmp)
            _emit(progress, "inspect", "looking for Python in the image")
            record = dict(record_base, **_record_fields(name, digest, rootfs, manifest, config))
            _write_record(record)
            _retag(incoming, name)
        except BaseException:
            for path in staged:
                shutil.rmtree(path, ignore_errors=True)
            with contextlib.suppress(Exception):
                _retag(incoming, None)
            raise
        _emit(progress, "gc", "sweeping unused blobs and roots")
        warning = _gc_locked()
        if warning:
            _emit(progress, "warning", warning)
    _emit(progress, "done", f"template {name} is ready", record=record)
    return record


def _record_fields(name: str, digest: str, rootfs: Path, manifest: dict, config: dict) -> dict:
    cfg = config.get("config") or {}
    env: dict[str, str] = {}
    for item in cfg.get("Env") or []:
        key, sep, value = str(item).partition("=")
        if sep and key and key not in ("HOME", "USER", "HOSTNAME", "PWD"):
            env[key] = value
    python, version = detect_python(str(rootfs))
    return {
        "name": name, "digest": digest, "rootfs": str(rootfs),
        "python": python, "python_version": version,
        "env": env, "workdir": cfg.get("WorkingDir") or None,
        "preload": [], "limits": {}, "pool_size": None,
        "layers": [layer["digest"] for layer in manifest.get("layers", [])],
        "size": sum(int(layer.get("size") or 0) for layer in manifest.get("layers", [])),
        "architecture": config.get("architecture"), "created": _now(),
    }


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def _write_record(record: dict) -> None:
    check_name(record["name"])
    records = records_dir()
    records.mkdir(mode=0o755, parents=True, exist_ok=True)
    _write_json_atomic(records / f"{record['name']}.json", record)


# -- listing and removal -----------------------------------------------------------------------------
def list_templates() -> list[dict]:
    from ._templates import python_template

    builtin = python_template()
    rows = [{"name": "python", "source": "builtin", "ref": "the host's interpreter", "digest": None,
             "python": builtin.python, "python_version": "%d.%d" % sys.version_info[:2], "size": None,
             "created": None, "preload": list(builtin.preload)}]
    try:
        files = sorted(records_dir().glob("*.json"))
    except OSError:
        files = []
    for file in files:
        try:
            record = read_record(file.stem)
        except InvalidRequest:  # a record damaged by hand: listed, so that `rm` can clear it
            record = {"name": file.stem, "source": "broken", "ref": "unreadable record"}
        if record is not None:
            rows.append(record)
    return rows


def remove(name: str, *, force: bool = False, progress: Optional[Progress] = None) -> dict:
    """Remove template ``name``: its record and tag, then its root and blobs once nothing uses them."""
    if name == "python":
        raise InvalidRequest("'python' is the builtin template; it cannot be removed")
    check_name(name)
    with locked(progress):
        path = records_dir() / f"{name}.json"
        try:
            record = read_record(name)
        except InvalidRequest:  # damaged by hand: remove it, and let gc sweep what it pointed to
            record = {"name": name, "rootfs": None}
        if record is None:
            raise InvalidRequest(f"unknown template {name!r}")
        if record.get("rootfs"):
            shared = [r["name"] for r in list_templates()[1:]
                      if r.get("rootfs") == record["rootfs"] and r["name"] != name]
            users = 0 if shared or force else _sandboxes_using(Path(record["rootfs"]))
            deadline = time.monotonic() + 3
            while users and time.monotonic() < deadline:  # a sandbox killed a moment ago is still tearing down
                time.sleep(0.1)
                users = _sandboxes_using(Path(record["rootfs"]))
            if users:
                raise InvalidRequest(f"template {name!r} is in use by running sandboxes (its root is mounted in "
                                     f"{users} mount namespace(s)); kill them first, or pass --force")
        path.unlink()
        with contextlib.suppress(Exception):
            _retag(name, None)
        warning = _gc_locked(force=force)
        if warning:
            _emit(progress, "warning", warning)
    return record


def gc() -> Optional[str]:
    with locked():
        return _gc_locked()


def _gc_locked(force: bool = False) -> Optional[str]:
    """Drop roots no record uses (unless a sandbox still runs on one), stale tags, unreachable blobs.
    Never fails the operation that called it: returns a warning instead."""
    try:
        _sweep(force)
    except (OSError, SandlotError) as exc:
        return f"could not sweep the image cache: {exc}"
    return None


def _sweep(force: bool) -> None:
    records = list_templates()[1:]
    used_roots = {str(Path(r["rootfs"])) for r in records if r.get("rootfs")}
    for entry in rootfs_dir().iterdir():
        if entry.name.startswith((".tmp-", ".trash-")):
            shutil.rmtree(entry, ignore_errors=True)  # left by a pull that was killed mid-way
        elif str(entry) not in used_roots and (force or not _sandboxes_using(entry)):
            trash = entry.with_name(".trash-" + entry.name)
            entry.rename(trash)  # gone at once for everyone; deleted below
            shutil.rmtree(trash, ignore_errors=True)
    if (layout_dir() / "index.json").exists():
        names = {r["name"] for r in records}
        index = _read_index()
        stale = [(d.get("annotations") or {}).get(REF_ANNOTATION) for d in index.get("manifests", [])]
        for tag in stale:
            if tag not in names:
                _retag(tag, None)
        _run([tool("umoci"), "gc", "--layout", str(layout_dir())], "sweeping the image cache")


def _sandboxes_using(root: Path) -> int:
    """How many mount namespaces (sandboxes, runsc gofers) have ``root`` mounted."""
    try:
        st = os.stat(root)
    except OSError:
        return 0
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    seen: set[str] = set()
    users = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            ns = os.readlink(f"/proc/{pid}/ns/mnt")
            if ns in seen:
                continue
            seen.add(ns)
            with open(f"/proc/{pid}/mountinfo") as f:
                for line in f:
                    fields = line.split()
                    # field 3 is the device, 4 the path of the mount's root within its filesystem
                    if len(fields) > 4 and fields[2] == dev and fields[3] != "/" and str(root).endswith(fields[3]) \
                            and fields[3].endswith("/" + root.name):
                        users += 1
                        break
        except OSError:
            continue
    return users


# -- preparing a root --------------------------------------------------------------------------------
def _open_beneath(root_fd: int, rel: str, create: bool = True, mode: int = 0o755) -> int:
    """A descriptor of directory ``rel`` under ``root_fd``; symlinks and non-directories on the way are
    replaced by real directories (never followed)."""
    fd = os.dup(root_fd)
    for comp in [c for c in rel.split("/") if c and c != "."]:
        if comp == "..":
            raise ValueError("'..' in a path Sandlot prepares")
        try:
            st = os.stat(comp, dir_fd=fd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                if not create:
                    os.close(fd)
                    raise NotADirectoryError(comp)
                os.unlink(comp, dir_fd=fd)
                raise FileNotFoundError
        except FileNotFoundError:
            if not create:
                os.close(fd)
                raise
            os.mkdir(comp, mode, dir_fd=fd)
            made = True
        else:
            made = False
        nxt = os.open(comp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        os.close(fd)
        fd = nxt
        if made:
            os.fchmod(fd, mode)  # mkdir's mode went through the umask
    return fd


def _write_beneath(root_fd: int, rel: str, data: bytes, mode: int = 0o644) -> None:
    parent, _, name = rel.strip("/").rpartition("/")
    dfd = _open_beneath(root_fd, parent)
    try:
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(f"/proc/self/fd/{dfd}/{name}")  # rmtree never follows symlinks
            else:
                os.unlink(name, dir_fd=dfd)  # a symlink or a hardlinked file is replaced, never written through
        except FileNotFoundError:
            pass
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dfd)
        try:
            os.write(fd, data)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
    finally:
        os.close(dfd)


def _read_beneath(root_fd: int, rel: str, limit: int = 1 << 20) -> Optional[bytes]:
    parent, _, name = rel.strip("/").rpartition("/")
    try:
        dfd = _open_beneath(root_fd, parent, create=False)
    except (OSError, ValueError):
        return None
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    except OSError:
        return None
    finally:
        os.close(dfd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, limit)
    finally:
        os.close(fd)


def _drop_device_nodes(root: Path) -> None:
    """Images have no business shipping device nodes (a sandbox gets its own /dev); umoci, run as
    root, would have made them. Mounts are nodev anyway; this keeps them off the host's disk too."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            with contextlib.suppress(OSError):
                if stat.S_ISBLK(os.lstat(path).st_mode) or stat.S_ISCHR(os.lstat(path).st_mode):
                    os.unlink(path)


def _merge_accounts(existing: Optional[bytes], ours: list[str]) -> bytes:
    """Keep the image's accounts (services need them), minus any that clash with ours by name or id."""
    names = {line.split(":")[0] for line in ours}
    ids = {line.split(":")[2] for line in ours}
    kept = []
    for line in (existing or b"").decode(errors="replace").splitlines():
        fields = line.split(":")
        if len(fields) >= 3 and fields[0] not in names and fields[2] not in ids and "\0" not in line:
            kept.append(line)
    return ("\n".join(ours + kept) + "\n").encode()


def finalize_rootfs(root: Path) -> None:
    """Make an unpacked root ready to be bound read-only as a sandbox's /: real directories at every
    mount point (replacing planted symlinks), and the /etc files a sandbox needs."""
    os.chmod(root, 0o755)
    _drop_device_nodes(root)
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for rel, mode in (("proc", 0o555), ("dev", 0o755), ("sys", 0o555), ("tmp", 0o1777), ("home", 0o755),
                          ("home/user", 0o755), ("opt/sandlot/_agent", 0o755), ("opt/sandlot/host", 0o755),
                          (SCRATCH.lstrip("/"), 0o755), ("etc", 0o755)):
            os.close(_open_beneath(root_fd, rel, mode=mode))
        for rel in ("home", "opt", "opt/sandlot", "etc"):  # the sandbox user must reach what is mounted below
            fd = _open_beneath(root_fd, rel)
            try:
                os.fchmod(fd, stat.S_IMODE(os.fstat(fd).st_mode) | 0o555)
            finally:
                os.close(fd)
        passwd = _merge_accounts(_read_beneath(root_fd, "etc/passwd"), [
            "root:x:0:0:root:/root:/bin/sh", f"user:x:{USER_UID}:{USER_UID}:user:/home/user:/bin/sh",
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin"])
        group = _merge_accounts(_read_beneath(root_fd, "etc/group"), [
            "root:x:0:", f"user:x:{USER_UID}:", "nogroup:x:65534:"])
        for rel, data in (("etc/passwd", passwd), ("etc/group", group), ("etc/hostname", b"sandbox\n"),
                          ("etc/hosts", b"127.0.0.1 localhost sandbox\n::1 localhost\n"),
                          ("etc/resolv.conf", b"")):
            _write_beneath(root_fd, rel, data)
    finally:
        os.close(root_fd)


# -- Python in an image ------------------------------------------------------------------------------
def _resolve_inside(root: str, path: str, hops: int = 40) -> Optional[str]:
    """Resolve ``path`` as the sandbox would see it (symlinks relative to ``root``), without leaving root."""
    todo = [c for c in path.split("/") if c]
    done: list[str] = []
    while todo:
        comp = todo.pop(0)
        if comp in (".", ""):
            continue
        if comp == "..":
            if done:
                done.pop()
            continue
        host = os.path.join(root, *done, comp)
        try:
            st = os.lstat(host)
        except OSError:
            return None
        if stat.S_ISLNK(st.st_mode):
            hops -= 1
            if hops < 0:
                return None
            target = os.readlink(host)
            if target.startswith("/"):
                done = []
            todo = [c for c in target.split("/") if c] + todo
            continue
        done.append(comp)
    return "/" + "/".join(done)


def _elf_machine(path: str) -> Optional[int]:
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError:
        return None
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    return struct.unpack("<H", head[18:20])[0]


def detect_python(root: str) -> tuple[Optional[str], Optional[str]]:
    """(path inside the image, "3.N") of a Python >= 3.8 able to run the agent, or (None, None).

    Read from files only, never by running anything on the host: the interpreter's real name
    (python3.N) or its prefix's lib/python3.N/os.py, and its ELF machine matching ours."""
    host_machine = _elf_machine(os.path.realpath(sys.executable))
    for candidate in PYTHON_CANDIDATES:
        real = _resolve_inside(root, candidate)
        if real is None:
            continue
        host = root + real
        try:
            st = os.lstat(host)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o111 or _elf_machine(host) != host_machine:
            continue
        versions = []
        m = re.fullmatch(r"python(\d)\.(\d+)", os.path.basename(real))
        if m:
            versions.append((int(m.group(1)), int(m.group(2))))
        prefix = os.path.dirname(os.path.dirname(real))
        for lib in ("lib", "lib64"):
            libdir = _resolve_inside(root, f"{prefix}/{lib}")
            if libdir is None:
                continue
            try:
                names = os.listdir(root + libdir)
            except OSError:
                continue
            for entry in names:
                m = re.fullmatch(r"python(\d)\.(\d+)", entry)
                if m and _resolve_inside(root, f"{libdir}/{entry}/os.py"):
                    versions.append((int(m.group(1)), int(m.group(2))))
        good = sorted(v for v in set(versions) if v >= MIN_PYTHON)
        if good:
            return candidate, "%d.%d" % good[-1]
    return None, None


# -- the host interpreter, for images without Python -------------------------------------------------
def _elf_interp(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:
            raise HostUnsupported(f"{path} is not a 64-bit ELF file")
        phoff, = struct.unpack("<Q", head[32:40])
        phentsize, phnum = struct.unpack("<HH", head[54:58])
        for i in range(phnum):
            f.seek(phoff + i * phentsize)
            ph = f.read(phentsize)
            p_type, = struct.unpack("<I", ph[:4])
            if p_type == 3:  # PT_INTERP
                p_offset, = struct.unpack("<Q", ph[8:16])
                p_filesz, = struct.unpack("<Q", ph[32:40])
                f.seek(p_offset)
                return f.read(p_filesz).rstrip(b"\0").decode()
    raise HostUnsupported(f"{path} is statically linked; cannot lend it to an image")


def _ld_conf_dirs(conf: str = "/etc/ld.so.conf", depth: int = 0) -> list[str]:
    import glob

    found: list[str] = []
    try:
        lines = Path(conf).read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line.startswith("include") and depth < 4:
            for inc in sorted(glob.glob(line.split(None, 1)[1])):
                found += _ld_conf_dirs(inc, depth + 1)
        elif line.startswith("/"):
            found.append(line)
    return found


def host_python_kit() -> dict:
    """How an image without Python still runs the agent: the host's own interpreter (the one Sandlot
    runs on, stdlib only) bound read-only under /opt/sandlot/host and started through its own dynamic
    loader with its own library path, so nothing of it mixes with the image's libraries. The binds
    expose what the builtin template already shows read-only (the host's /usr and the interpreter's
    prefix), never /etc, /home or the data dir."""
    kit = _host_kit()
    skeleton = images_dir() / "hostkit" / kit["key"]  # mount points for the binds (the image root is read-only)
    if not skeleton.is_dir():
        tmp = skeleton.with_name(f".tmp-{kit['key']}-{secrets.token_hex(4)}")
        for d in kit["dirs"]:
            (tmp / d.lstrip("/")).mkdir(parents=True, exist_ok=True)
        for dirpath, _, _ in os.walk(tmp):
            os.chmod(dirpath, 0o755)
        try:
            tmp.rename(skeleton)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return {"argv": kit["argv"], "binds": [(str(skeleton), HOST_KIT)] + [(d, HOST_KIT + d) for d in kit["dirs"]]}


@functools.lru_cache(maxsize=1)
def _host_kit() -> dict:
    from ._agent.isolation import SYSTEM_DIRS

    exe = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    loader = os.path.realpath(_elf_interp(exe))
    prefixes = []
    for p in (sys.base_prefix, sys.base_exec_prefix):
        real = os.path.realpath(p)
        if real not in prefixes:
            prefixes.append(real)
    binds = [d for d in SYSTEM_DIRS if os.path.isdir(d) and not os.path.islink(d)]
    binds += [p for p in prefixes if not any(p == d or p.startswith(d + "/") for d in binds)]
    libdirs: list[str] = []
    for d in [p + "/lib" for p in prefixes] + _ld_conf_dirs() + ["/lib", "/usr/lib", "/lib64", "/usr/lib64"]:
        real = os.path.realpath(d)
        if os.path.isdir(real) and real not in libdirs:
            libdirs.append(real)

    def covered(p: str) -> bool:
        return any(p == d or p.startswith(d + "/") for d in binds)

    for needed in [exe, loader]:
        if not covered(needed):
            raise HostUnsupported(f"cannot lend the host interpreter to an image: {needed} is outside {binds}")
    libdirs = [d for d in libdirs if covered(d)]
    return {
        "argv": [HOST_KIT + loader, "--library-path", ":".join(HOST_KIT + d for d in libdirs), HOST_KIT + exe,
                 "-I", "-S", "-B"],
        "dirs": binds, "key": hashlib.sha256(json.dumps([binds, exe]).encode()).hexdigest()[:16],
    }


def agent_launch(template) -> dict:
    """For an image template: the interpreter argv the agent runs under inside, and what it needs bound."""
    if template.python:
        return {"argv": [template.python, "-I", "-S", "-B"], "binds": []}
    return host_python_kit()
