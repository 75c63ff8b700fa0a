"""``sandbox.yaml``: a template described in a file, built into a new image root by sandboxed steps.

    base: python:3.12-slim          # a registry reference (pulled if not here yet) or a local template
    insecure: false                 # pull the base over plain HTTP / without TLS verification
    apt: [curl]                     # Debian/Ubuntu packages (the base needs apt-get; Sandlot as root)
    pip: [pandas==2.2.2, ./wheels/mylib-1.0-py3-none-any.whl]
    files:                          # copied in last; src relative to this file
      - {src: app/, dest: /app/}
      - {src: run.sh, dest: /usr/local/bin/run, mode: "0755"}
    env: {APP_MODE: batch}
    workdir: /app
    preload: [pandas]               # imported by each sandbox's agent before the first call
    limits: {memory: 2G, cpu: 2}    # the template's default limits
    pool_size: 2                    # warm sandboxes kept ready (unless configure_pool says otherwise)
    zygote: false                   # exec each sandbox: its own hash secret, ASLR and stack canary

How the build runs (``sandlot template build -f sandbox.yaml -t NAME``):

1. base: the base template's root is copied to a private build directory (on a root host its file
   owners are shifted into a private range of host uids, so the build's root is the owner of its
   files *inside its own user namespace* and nobody's on the host);
2. apt: ``apt-get install`` runs in a process-tier sandbox on that copy, as root of its user
   namespace with Docker's default capabilities, seccomp and Landlock still on. It has no network
   either: apt's HTTP proxy is a loopback port that the sandbox's agent carries to an allowlisting
   proxy on the host (sandlot/_host/egress.py), which reaches only the mirrors the image's own apt
   sources name, on ports 80 and 443, and never an address of this host;
3. pip: wheels are downloaded *on the host* by ``pip download --only-binary=:all:`` for the image's
   Python version and platform (a download never runs package code; sdists are refused for that
   reason), then ``pip install --no-index`` runs in a sandbox **without network** against them;
4. files: copied by the host into the copy, resolving the image's own symlinks inside its root and
   never following one out of it;
5. check: a normal read-only sandbox of the result runs the image's Python and imports every
   preload module (so the version check of the interpreter really runs, inside a sandbox);
6. commit: owners shifted back, mount points and /etc files prepared, the root renamed into
   place and the record written. A failing step names itself and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from . import _images
from ._agent.relay import PROXY_PORT
from ._exceptions import InvalidRequest, SandlotError
from ._host.egress import EgressProxy, apt_source_hosts
from ._images import ImageError, Progress, _emit
from ._limits import Limits
from ._spec import check_env
from ._templates import Template, read_record, register_transient, unregister_transient

STEP_TIMEOUT = 1800.0  # seconds for one apt or pip step
BUILD_LIMITS = {"memory": "4G", "cpu": 2, "pids": 1024, "disk": "4G", "inodes": 1_000_000, "open_files": 4096,
                "timeout": STEP_TIMEOUT, "lifetime": 4 * 3600, "idle_timeout": 4 * 3600, "output": 64 * 1024**2}
_APT_RE = re.compile(r"[a-z0-9][a-z0-9+.-]*(?::[a-z0-9-]+)?(?:=[A-Za-z0-9.+~:-]+)?")
_MODULE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")


# -- the file --------------------------------------------------------------------------------------
class FileCopy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    src: str
    dest: str
    mode: Optional[str] = None

    @field_validator("dest")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not v.startswith("/") or "\0" in v or ".." in v.split("/"):
            raise ValueError("dest must be an absolute path inside the image, without '..'")
        return v

    @field_validator("mode", mode="before")
    @classmethod
    def _mode(cls, v: Any) -> Optional[str]:
        if v is None:
            return None
        text = str(v) if not isinstance(v, int) else oct(v)[2:] if v > 0o777 else format(v, "o")
        if not re.fullmatch(r"0?[0-7]{3,4}", text):
            raise ValueError("mode must be octal, like \"0644\" or \"0755\"")
        return text


class SandboxFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base: str = Field(min_length=1)
    insecure: bool = False
    apt: list[str] = []
    pip: list[str] = []
    files: list[FileCopy] = []
    env: dict[str, str] = {}
    workdir: Optional[str] = None
    preload: list[str] = []
    limits: dict[str, Any] = {}
    pool_size: Optional[int] = Field(default=None, ge=0, le=256)
    # false: never fork this template's sandboxes from a shared zygote, so each gets its own string-hash
    # secret, address-space layout and stack canary (README, "Security: what a sandbox can and cannot
    # observe of others"). Unset: the base template's choice (default true).
    zygote: Optional[bool] = None
    # The network its sandboxes get when their owner gives none: "public" or {"allow": [...], "deny": [...]}
    # (the same rules as Sandbox(network=...)); unset: none.
    network: Optional[Union[str, dict[str, list[str]]]] = None
    # The mounts its sandboxes get by default: {"/data": "/srv/datasets", "/cache": "vol:pipcache"} (the same
    # syntax as Sandbox(mounts=...); host directories absolute). An owner's mount of the same target replaces
    # the template's; on a server, host directories still only within the operator's --host-dir-root.
    mounts: Optional[dict[str, str]] = None

    @field_validator("mounts")
    @classmethod
    def _mounts(cls, v: Any) -> Any:
        from ._storage.mounts import mounts_to_json, parse_mounts

        return mounts_to_json(parse_mounts(v)) or None  # InvalidRequest is a ValueError: the field is named

    @field_validator("network")
    @classmethod
    def _network(cls, v: Any) -> Any:
        from ._net.policy import NetworkPolicy

        policy = NetworkPolicy.build(v)  # InvalidRequest is a ValueError: the file and field are named
        return policy.to_json() if policy is not None else None

    @field_validator("apt")
    @classmethod
    def _apt(cls, v: list[str]) -> list[str]:
        for name in v:
            if not _APT_RE.fullmatch(name):
                raise ValueError(f"{name!r} is not a Debian package name (like curl or curl=7.88.1-10)")
        return v

    @field_validator("pip")
    @classmethod
    def _pip(cls, v: list[str]) -> list[str]:
        for req in v:
            if not req.strip() or req.strip().startswith("-") or "\n" in req:
                raise ValueError(f"{req!r}: pip entries are requirements (pandas>=2) or paths to wheels, not options")
        return [r.strip() for r in v]

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        return check_env({k: str(val) for k, val in v.items()})  # the SDK's one validator (a ValueError)

    @field_validator("workdir")
    @classmethod
    def _workdir(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and (not v.startswith("/") or ".." in v.split("/")):
            raise ValueError("workdir must be an absolute path")
        return v

    @field_validator("preload")
    @classmethod
    def _preload(cls, v: list[str]) -> list[str]:
        for name in v:
            if not _MODULE_RE.fullmatch(name):
                raise ValueError(f"{name!r} is not a module name")
        return v

    @field_validator("limits")
    @classmethod
    def _limits(cls, v: dict[str, Any]) -> dict[str, Any]:
        try:
            Limits.build(v)
        except InvalidRequest as exc:
            raise ValueError(str(exc)) from None
        return v


def load_file(path: str) -> tuple[SandboxFile, Path]:
    """Parse and validate a sandbox.yaml; InvalidRequest names the file and the bad field."""
    file = Path(path)
    try:
        raw = yaml.safe_load(file.read_text())
    except FileNotFoundError:
        raise InvalidRequest(f"no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"cannot read {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise InvalidRequest(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise InvalidRequest(f"{path}: expected a mapping with at least `base:`")
    try:
        spec = SandboxFile.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors())
        raise InvalidRequest(f"{path}: {problems}") from None
    context = file.resolve().parent
    for copy in spec.files:
        src = (context / copy.src).resolve()
        if not src.exists():
            raise InvalidRequest(f"{path}: files: {copy.src} does not exist (paths are relative to {context})")
    return spec, context


# -- the build -------------------------------------------------------------------------------------
class _StepFailed(ImageError):
    pass


def build(path: str, name: str, *, pull: bool = False, progress: Optional[Progress] = None) -> dict:
    """Build the template ``name`` from the sandbox.yaml at ``path``. Returns its record."""
    _images.check_name(name)
    spec, context = load_file(path)
    steps = ["base"] + (["apt"] if spec.apt else []) + (["pip"] if spec.pip else []) \
        + (["files"] if spec.files else []) + ["check", "commit"]
    builds = _images.images_dir() / "builds"
    builds.mkdir(mode=0o700, exist_ok=True)
    _sweep_builds(builds)
    build_id = secrets.token_hex(6)
    home = builds / build_id
    home.mkdir(mode=0o700)
    lock = os.open(builds / f"{build_id}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    slot = None
    state: dict[str, Any] = {"home": home, "context": context, "spec": spec, "name": name}
    try:
        for index, step in enumerate(steps, 1):
            _emit(progress, "step", f"[{index}/{len(steps)}] {step}", index=index, total=len(steps), step=step)
            try:
                if step == "base":
                    slot = _step_base(state, pull, progress)
                elif step == "apt":
                    _step_apt(state, progress)
                elif step == "pip":
                    _step_pip(state, progress)
                elif step == "files":
                    _step_files(state)
                elif step == "check":
                    _step_check(state, progress)
                else:
                    record = _step_commit(state, path, progress)
            except SandlotError as exc:
                raise (InvalidRequest if isinstance(exc, InvalidRequest) else ImageError)(
                    f"build step {index}/{len(steps)} ({step}) failed: {exc}") from None
            except OSError as exc:
                raise ImageError(f"build step {index}/{len(steps)} ({step}) failed: {exc}") from None
    finally:
        if slot is not None:
            slot.release()
        shutil.rmtree(home, ignore_errors=True)
        os.close(lock)
        with contextlib.suppress(OSError):
            (builds / f"{build_id}.lock").unlink()
    _emit(progress, "done", f"template {name} is ready", record=record)
    return record


def _sweep_builds(builds: Path) -> None:
    """Remove what killed builds left (their lock is no longer held)."""
    for lock in builds.glob("*.lock"):
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue
        finally:
            os.close(fd)
        shutil.rmtree(builds / lock.stem, ignore_errors=True)
        lock.unlink(missing_ok=True)


def _step_base(state: dict, pull: bool, progress: Optional[Progress]):
    spec: SandboxFile = state["spec"]
    record = read_record(spec.base) if re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,63}", spec.base) else None
    if record is None:
        existing = [r for r in _images.list_templates()[1:] if r.get("ref") == _images.parse_ref(spec.base)["ref"]]
        if existing and not pull:
            record = existing[0]
        else:
            record = _images.pull(spec.base, tls_verify=not spec.insecure, progress=progress)
    state["base"] = record
    rootfs = state["home"] / "rootfs"
    _emit(progress, "log", f"copying the root of {record['name']} ({record['digest'][:19]})")
    subprocess.run(["cp", "-a", "--reflink=auto", record["rootfs"], str(rootfs)], check=True,
                   capture_output=True)
    state["rootfs"] = rootfs
    slot = None
    if os.geteuid() == 0:
        from ._backends.process import UID_SPAN, UidSlot

        slot = UidSlot()
        _shift_owners(rootfs, 0, UID_SPAN, slot.base)
        state["uid_base"] = slot.base
    return slot


def _shift_owners(root: Path, lo: int, hi: int, delta: int) -> None:
    """Add ``delta`` to every owner and group in [lo, hi) under ``root`` (never following symlinks),
    keeping setuid/setgid bits (chown clears them)."""
    def fix(path: str) -> None:
        st = os.lstat(path)
        uid = st.st_uid + delta if lo <= st.st_uid < hi else st.st_uid
        gid = st.st_gid + delta if lo <= st.st_gid < hi else st.st_gid
        if (uid, gid) != (st.st_uid, st.st_gid):
            os.lchown(path, uid, gid)
            if stat.S_ISREG(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                os.chmod(path, stat.S_IMODE(st.st_mode))

    fix(str(root))
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            fix(os.path.join(dirpath, name))


def _step_template(state: dict, step: str, egress: str = "", binds: tuple = ()) -> Template:
    base = state["base"]
    _images.finalize_rootfs(state["rootfs"])  # a previous step may have planted symlinks at mount points
    env = dict(base.get("env") or {})
    return Template(name=f".build-{state['home'].name}-{step}", python=base.get("python") or "", prefixes=(),
                    env=tuple(sorted(env.items())), rootfs=str(state["rootfs"]), workdir=None,
                    pool_size=0, writable=True, egress=egress, uid_base=state.get("uid_base"),
                    binds=tuple(binds))


@contextlib.contextmanager
def _sandbox(template: Template):
    from ._sync import Sandbox

    register_transient(template)
    try:
        # api_url="": always on this machine, whatever SANDLOT_API_URL says (the build's root is here).
        with Sandbox(template.name, limits=BUILD_LIMITS, isolation="process", api_url="") as sb:
            yield sb
    finally:
        unregister_transient(template.name)


def _run(sb, cmd: str, what: str, progress: Optional[Progress], env: Optional[dict] = None) -> str:
    tail: list[str] = []

    def line(chunk: str) -> None:
        for text in chunk.splitlines():
            if text.strip():
                tail.append(text)
                del tail[:-20]
                _emit(progress, "log", text)

    result = sb.commands.run(cmd, timeout=STEP_TIMEOUT, env=env or {}, on_stdout=line, on_stderr=line)
    if result.exit_code != 0:
        why = result.error or f"exit code {result.exit_code}"
        raise _StepFailed(f"{what} ({why}):\n" + "\n".join(tail[-12:]))
    return result.stdout


def _step_apt(state: dict, progress: Optional[Progress]) -> None:
    spec: SandboxFile = state["spec"]
    if os.geteuid() != 0:
        raise ImageError("apt packages need Sandlot running as root: the build's root must own the image's "
                         "files inside its user namespace (pip and files work without)")
    try:
        hosts = apt_source_hosts(str(state["rootfs"]))
    except InvalidRequest as exc:
        raise ImageError(f"the base image {state['base']['name']}: {exc}") from None
    egress_dir = state["home"] / "egress"
    egress_dir.mkdir()
    egress_dir.chmod(0o755)
    inside = "/.sandlot-build/egress"
    proxy = f"http://127.0.0.1:{PROXY_PORT}"
    apt = f"apt-get -o Acquire::http::Proxy={proxy} -o Acquire::https::Proxy={proxy}"
    _emit(progress, "log", f"apt may reach: {', '.join(sorted(hosts))} (through the build's proxy)")
    with EgressProxy(hosts, str(egress_dir / "proxy.sock")) as egress, \
            _sandbox(_step_template(state, "apt", egress=inside + "/proxy.sock", binds=((str(egress_dir), inside),))) as sb:
        check = sb.commands.run("command -v apt-get", timeout=30)
        if check.exit_code != 0:
            raise ImageError(f"the base image {state['base']['name']} has no apt-get")
        env = {"DEBIAN_FRONTEND": "noninteractive", "HOME": "/root", "LC_ALL": "C"}
        packages = " ".join(spec.apt)
        try:
            _run(sb, f"{apt} update -q", "apt-get update", progress, env)
            _run(sb, f"{apt} install -y -q --no-install-recommends {packages}", f"apt-get install {packages}",
                 progress, env)
        except _StepFailed as exc:
            if egress.refused:
                raise _StepFailed(f"{exc}\nthe build's proxy refused: {'; '.join(sorted(set(egress.refused))[:5])}") \
                    from None
            raise
        _run(sb, "apt-get clean && rm -rf /var/lib/apt/lists/*", "apt-get clean", progress, env)


def _image_platform(root: Path) -> dict:
    """The wheel tags the image's Python accepts: its version, and manylinux/musllinux from its libc."""
    version = _images.detect_python(str(root))[1]
    machine = os.uname().machine
    platforms = []
    musl = list(root.glob("lib/ld-musl-*.so.1")) + list(root.glob("usr/lib/ld-musl-*.so.1"))
    if musl:
        platforms = [f"musllinux_1_{m}_{machine}" for m in (2, 1)]
    else:
        glibc = _glibc_version(root)
        if glibc:
            platforms = [f"manylinux_2_{m}_{machine}" for m in range(glibc[1], 16, -1)]
            platforms += [f"manylinux2014_{machine}", f"manylinux2010_{machine}", f"manylinux1_{machine}"]
    return {"version": version, "platforms": platforms}


def _glibc_version(root: Path) -> Optional[tuple[int, int]]:
    for rel in ("lib/x86_64-linux-gnu/libc.so.6", "usr/lib/x86_64-linux-gnu/libc.so.6", "lib64/libc.so.6",
                "usr/lib64/libc.so.6", "lib/aarch64-linux-gnu/libc.so.6", "usr/lib/aarch64-linux-gnu/libc.so.6",
                "lib/libc.so.6", "usr/lib/libc.so.6"):
        inside = _images._resolve_inside(str(root), "/" + rel)
        if inside is None or not os.path.isfile(str(root) + inside):
            continue
        with open(str(root) + inside, "rb") as f:
            data = f.read(8 * 1024 * 1024)
        m = re.search(rb"GNU C Library[^\n]*?version (\d+)\.(\d+)", data) or re.search(rb"GLIBC_(\d+)\.(\d+)\D*\x00", data)
        if m:
            return int(m.group(1)), int(m.group(2))
    return None


def _step_pip(state: dict, progress: Optional[Progress]) -> None:
    spec: SandboxFile = state["spec"]
    base = state["base"]
    if not base.get("python"):
        raise ImageError(f"pip packages need Python in the base image; {base['name']} has none")
    platform = _image_platform(state["rootfs"])
    version = platform["version"] or base.get("python_version")
    wheels = state["home"] / "wheels"
    wheels.mkdir()
    requirements = []
    for req in spec.pip:
        local = (state["context"] / req)
        if ("/" in req or req.endswith((".whl", ".tar.gz", ".zip"))) and local.exists():
            requirements.append(("file", str(local.resolve())))
        else:
            requirements.append(("req", req))
    # 1. on the host: download wheels only (a download runs no package code), for the image's Python.
    major, minor = version.split(".")
    argv = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-input", "--progress-bar",
            "off", "--only-binary=:all:", "--dest", str(wheels), "--python-version", f"{major}.{minor}",
            "--implementation", "cp", "--abi", f"cp{major}{minor}", "--abi", "abi3", "--abi", "none"]
    for plat in platform["platforms"]:
        argv += ["--platform", plat]
    argv += [value for _, value in requirements]
    _emit(progress, "log", f"downloading wheels for Python {version} ({', '.join(platform['platforms'][:1]) or 'any'})")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=STEP_TIMEOUT, cwd=state["context"])
    for text in proc.stdout.splitlines():
        _emit(progress, "log", text)
    if proc.returncode != 0:
        detail = "\n".join((proc.stderr.strip() or proc.stdout.strip()).splitlines()[-8:])
        if "No matching distribution" in detail or "Could not find a version" in detail:
            detail += ("\n(only wheels are installed: an sdist would run its build code; is there a wheel for "
                       f"Python {version} on {platform['platforms'][:1] or ['this platform']}?)")
        raise ImageError(f"pip download failed:\n{detail}")
    # 2. in a sandbox without network: install from those wheels only.
    inside = "/.sandlot-build/wheels"
    binds = [(str(wheels), inside)]
    pip_host = _host_pip_dir()
    if pip_host:
        binds.append((pip_host, "/.sandlot-build/pip/pip"))
    specs = [f"{inside}/{Path(value).name}" if kind == "file" else value for kind, value in requirements]
    with _sandbox(_step_template(state, "pip", binds=tuple(binds))) as sb:
        python = base["python"]
        has_pip = sb.commands.run(f"{python} -c 'import pip' 2>/dev/null", timeout=60).exit_code == 0
        env = {"PIP_BREAK_SYSTEM_PACKAGES": "1", "PIP_ROOT_USER_ACTION": "ignore", "PIP_NO_INPUT": "1",
               "PIP_DISABLE_PIP_VERSION_CHECK": "1", "HOME": "/tmp"}
        if not has_pip:
            if not pip_host:
                raise ImageError("the base image has no pip and the host's pip was not found to lend it")
            env["PYTHONPATH"] = "/.sandlot-build/pip"
        quoted = " ".join(_sh_quote(s) for s in specs)
        _run(sb, f"{python} -m pip install --no-index --no-cache-dir --no-warn-script-location "
                 f"--find-links {inside} {quoted}", "pip install", progress, env)


def _host_pip_dir() -> Optional[str]:
    try:
        import pip
    except ImportError:
        return None
    return os.path.dirname(os.path.realpath(pip.__file__))


def _sh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def _step_files(state: dict) -> None:
    """Copy the build context's files in, on the host: each destination is resolved as the image sees
    it (its symlinks followed inside its root, never out of it), then written through descriptors."""
    spec: SandboxFile = state["spec"]
    root = str(state["rootfs"])
    owner = state.get("uid_base", os.getuid() if os.geteuid() != 0 else 0)
    for copy in spec.files:
        src = (state["context"] / copy.src).resolve()
        mode = int(copy.mode, 8) if copy.mode else None
        dest = copy.dest
        if src.is_dir():
            for dirpath, dirnames, filenames in os.walk(src):
                rel = os.path.relpath(dirpath, src)
                target_dir = dest.rstrip("/") + ("" if rel == "." else "/" + rel)
                _make_dirs(root, target_dir, owner)
                for fname in filenames:
                    full = os.path.join(dirpath, fname)
                    if os.path.isfile(full):
                        _copy_file(root, full, f"{target_dir}/{fname}", mode, owner)
        else:
            target = dest + src.name if dest.endswith("/") else dest
            _copy_file(root, str(src), target, mode, owner)


def _make_dirs(root: str, path: str, owner: int) -> str:
    """mkdir -p inside the image root; returns the real (symlink-free) inside path."""
    done = "/"
    for comp in [c for c in path.split("/") if c]:
        candidate = _images._resolve_inside(root, done.rstrip("/") + "/" + comp)
        if candidate is None:  # missing (or a dangling link): create it where it would be
            candidate = done.rstrip("/") + "/" + comp
            fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.close(_images._open_beneath(fd, candidate, create=True))
            finally:
                os.close(fd)
            os.lchown(root + candidate, owner, owner)
        elif not os.path.isdir(root + candidate) or os.path.islink(root + candidate):
            raise ImageError(f"files: {done.rstrip('/')}/{comp} exists in the image and is not a directory")
        done = candidate
    return done


def _copy_file(root: str, src: str, dest: str, mode: Optional[int], owner: int) -> None:
    parent = _make_dirs(root, os.path.dirname(dest) or "/", owner)
    name = os.path.basename(dest)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        dfd = _images._open_beneath(fd, parent, create=False)
    finally:
        os.close(fd)
    try:
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                raise ImageError(f"files: {dest} is a directory in the image")
            os.unlink(name, dir_fd=dfd)
        final_mode = mode if mode is not None else (0o755 if os.stat(src).st_mode & 0o111 else 0o644)
        out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        try:
            with open(src, "rb") as f:
                while True:
                    chunk = f.read(1 << 20)
                    if not chunk:
                        break
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(out, view):]
            os.fchown(out, owner, owner)
            os.fchmod(out, final_mode)
        finally:
            os.close(out)
    finally:
        os.close(dfd)


def _step_check(state: dict, progress: Optional[Progress]) -> None:
    """Run the image's Python and the preload imports in an ordinary (read-only, no network) sandbox."""
    spec: SandboxFile = state["spec"]
    base = state["base"]
    template = _step_template(state, "check")
    template = Template(name=template.name, python=template.python, prefixes=(), env=template.env,
                        rootfs=template.rootfs, pool_size=0, uid_base=template.uid_base)
    with _sandbox(template) as sb:
        if not base.get("python"):
            result = sb.commands.run("true", timeout=60)
            if result.exit_code != 0:
                raise ImageError(f"the built image cannot run /bin/sh: {result.stderr.strip()[-300:]}")
            if spec.preload:
                raise ImageError("preload needs Python in the image, and it has none")
            return
        code = "import sys, json\nprint(json.dumps(list(sys.version_info[:2])))\n"
        for module in spec.preload:
            code += f"import {module}\n"
        ex = sb.run_code(code, timeout=300)
        if ex.error is not None:
            raise ImageError(f"the image's Python failed ({ex.error.name}: {ex.error.value})"
                             + (f"; preload: {', '.join(spec.preload)}" if spec.preload else ""))
        version = tuple(json.loads("".join(ex.logs.stdout).strip().splitlines()[0]))
        if version < _images.MIN_PYTHON:
            raise ImageError(f"the image's Python is {version[0]}.{version[1]}; the agent needs >= 3.8")
        state["python_version"] = "%d.%d" % version
        _emit(progress, "log", f"Python {state['python_version']} runs; preload imports: {spec.preload or 'none'}")


def _step_commit(state: dict, path: str, progress: Optional[Progress]) -> dict:
    spec: SandboxFile = state["spec"]
    base = state["base"]
    rootfs: Path = state["rootfs"]
    if state.get("uid_base") is not None:
        from ._backends.process import UID_SPAN

        _shift_owners(rootfs, state["uid_base"], state["uid_base"] + UID_SPAN, -state["uid_base"])
    scratch = rootfs / ".sandlot-build"  # mount points of the wheels and the lent pip
    with contextlib.suppress(FileNotFoundError):
        if scratch.is_symlink() or not scratch.is_dir():
            scratch.unlink()
        else:
            shutil.rmtree(scratch)  # never follows symlinks
    _images.finalize_rootfs(rootfs)
    python, version = _images.detect_python(str(rootfs))
    digest_src = json.dumps([base["digest"], spec.model_dump(), state["home"].name], sort_keys=True)
    build_digest = "build:" + hashlib.sha256(digest_src.encode()).hexdigest()
    env = dict(base.get("env") or {})
    env.update(spec.env)
    with _images.locked(progress):
        final = _images.rootfs_dir() / f"build-{build_digest.split(':')[1][:32]}"
        rootfs.rename(final)
        record = {
            "name": state["name"], "source": "build", "ref": base.get("ref") or base["name"],
            "base": base["name"], "base_digest": base["digest"], "spec": str(Path(path).resolve()),
            "digest": build_digest, "rootfs": str(final), "python": python,
            "python_version": state.get("python_version") or version, "env": env,
            "workdir": spec.workdir or base.get("workdir"), "preload": list(spec.preload),
            "limits": dict(spec.limits), "pool_size": spec.pool_size, "network": spec.network, "mounts": spec.mounts,
            "zygote": base.get("zygote", True) if spec.zygote is None else spec.zygote,
            "layers": list(base.get("layers") or []), "size": _du(final),
            "architecture": base.get("architecture"), "created": _images._now(),
        }
        try:
            _images._write_record(record)
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)
            raise
        _images._gc_locked()
    return record


def _du(root: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total
