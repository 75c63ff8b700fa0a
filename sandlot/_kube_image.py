"""The image the kubernetes tier's pods run (`sandlot kube image`): a base image with python3, plus Sandlot's agent.

Built the way templates are pulled (see _images): skopeo copies the base into a private OCI layout, Sandlot writes
one layer of its own (the agent's stdlib-only sources at /opt/sandlot/_agent, root-owned and read-only to the
sandbox; an empty home for uid 1000), ``umoci raw add-layer`` appends it and ``umoci config`` sets the user,
working directory and entrypoint; skopeo then pushes the result or writes it as an OCI archive. No container
daemon, and nothing of the base runs here: its python3 is found by reading its layers' file lists.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import Callable, Optional

from ._exceptions import ImageError, InvalidRequest
from ._images import MIN_PYTHON, _policy_args, _run, parse_ref, tool

AGENT_DIR = "opt/sandlot/_agent"
HOME = "home/user"
USER = "1000:1000"
ENTRYPOINT = ["python3", "-I", "-S", "-B", "/opt/sandlot/_agent/pod.py"]
CMD = ["--port", "8888"]
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_STDLIB = re.compile(r"(?:usr/)?(?:local/)?lib/python(\d)\.(\d+)/os\.py")
_MTIME = 0  # the layer is the same bytes for the same agent sources, whoever builds it and when

Say = Callable[[str], None]


def agent_sources() -> Path:
    from . import _agent

    return Path(_agent.__file__).resolve().parent


def agent_layer(sources: Optional[Path] = None) -> bytes:
    """An uncompressed layer tar: the agent's sources (no caches), and /home/user owned by the sandbox's user."""
    sources = sources or agent_sources()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def directory(name: str, uid: int = 0, mode: int = 0o755) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.uid, info.gid, info.mtime = tarfile.DIRTYPE, mode, uid, uid, _MTIME
            tar.addfile(info)

        for name in ("opt", "opt/sandlot", "home"):
            directory(name)
        directory(HOME, uid=1000)
        for dirpath, dirnames, filenames in os.walk(sources):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            rel = Path(dirpath).relative_to(sources)
            directory(str(PurePosixPath(AGENT_DIR) / rel.as_posix()) if rel.parts else AGENT_DIR)
            for filename in sorted(filenames):
                path = Path(dirpath) / filename
                if filename.endswith((".pyc", ".pyo")) or not path.is_file() or path.is_symlink():
                    continue
                data = path.read_bytes()
                info = tarfile.TarInfo(str(PurePosixPath(AGENT_DIR) / rel.as_posix() / filename))
                info.size, info.mode, info.mtime = len(data), 0o644, _MTIME
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# -- the base: read, never run ------------------------------------------------------------------------------
def _layout_blob(layout: Path, digest: str) -> Path:
    algo, _, hexd = digest.partition(":")
    if algo != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexd):
        raise ImageError(f"unsupported digest {digest!r}")
    return layout / "blobs" / algo / hexd


def _manifest(layout: Path, tag: str) -> tuple[str, dict, dict]:
    index = json.loads((layout / "index.json").read_text())
    for desc in index.get("manifests", []):
        if (desc.get("annotations") or {}).get("org.opencontainers.image.ref.name") == tag:
            manifest = json.loads(_layout_blob(layout, desc["digest"]).read_bytes())
            config = json.loads(_layout_blob(layout, manifest["config"]["digest"]).read_bytes())
            return desc["digest"], manifest, config
    raise ImageError(f"the image layout holds no {tag!r}")


def _tree(layout: Path, manifest: dict) -> dict[str, Optional[str]]:
    """The base's final file list, from its layers in order: path -> symlink target (None: not a symlink).
    Whiteouts remove what earlier layers added."""
    tree: dict[str, Optional[str]] = {}
    for layer in manifest.get("layers") or []:
        if "zstd" in str(layer.get("mediaType", "")):
            raise ImageError("the base has zstd-compressed layers, which this check cannot read; use a gzip one")
        try:
            with tarfile.open(_layout_blob(layout, layer["digest"]), mode="r:*") as tar:
                for member in tar:
                    name = os.path.normpath("/" + member.name).lstrip("/")
                    parent, base = os.path.split(name)
                    if base == ".wh..wh..opq":
                        prefix = parent + "/"
                        for path in [p for p in tree if p.startswith(prefix)]:
                            del tree[path]
                    elif base.startswith(".wh."):
                        gone = os.path.join(parent, base[4:])
                        for path in [p for p in tree if p == gone or p.startswith(gone + "/")]:
                            del tree[path]
                    else:
                        tree[name] = member.linkname if member.issym() else None
                        while parent and parent not in tree:  # a layer may leave out its directories' entries
                            tree[parent] = None
                            parent = os.path.dirname(parent)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ImageError(f"a layer of the base cannot be read ({exc})") from None
    return tree


def _resolve(tree: dict[str, Optional[str]], path: str, hops: int = 40) -> Optional[str]:
    """``path`` with its symlinks followed inside the image; None when it leads nowhere."""
    parts = [p for p in path.split("/") if p]
    done: list[str] = []
    while parts:
        if hops <= 0:
            return None
        part = parts.pop(0)
        if part == "..":
            done = done[:-1]
            continue
        current = "/".join(done + [part])
        if current not in tree:
            return None
        target = tree[current]
        if target is None:
            done.append(part)
            continue
        hops -= 1
        parts = [p for p in target.split("/") if p] + parts
        if target.startswith("/"):
            done = []
    return "/".join(done)


def find_python(tree: dict[str, Optional[str]], config: dict) -> str:
    """Where the base's ``python3`` is on its PATH (the pods run ``python3``); ImageError when it has none
    or one older than Sandlot's agent supports."""
    env = dict(str(e).partition("=")[::2] for e in (config.get("config") or {}).get("Env") or [])
    for directory in (env.get("PATH") or DEFAULT_PATH).split(":"):
        found = _resolve(tree, f"{directory}/python3")
        if found is None:
            continue
        named = re.search(r"python(\d)\.(\d+)$", found)
        versions = [(int(named.group(1)), int(named.group(2)))] if named else sorted(
            (int(m.group(1)), int(m.group(2))) for m in map(_STDLIB.fullmatch, tree) if m)
        if versions and max(versions) < MIN_PYTHON:
            raise ImageError(f"the base's python3 is {'.'.join(map(str, max(versions)))}; the agent needs "
                             f"{'.'.join(map(str, MIN_PYTHON))} or newer")
        return "/" + found
    raise ImageError(f"the base has no python3 on its PATH ({env.get('PATH') or DEFAULT_PATH}): choose an image "
                     "with Python 3.8 or newer, e.g. python:3.12-slim or debian:12 with python3")


# -- the build -------------------------------------------------------------------------------------------
def build(base: str, tag: str, *, push: bool = False, output: Optional[str] = None, tls_verify: bool = True,
          progress: Optional[Say] = None) -> dict:
    """Build the agent image from ``base``; push it to ``tag`` and/or write it to ``output`` (an OCI archive).
    Returns ``{"digest": manifest digest, "python": path of python3 in it}``."""
    say = progress or (lambda message: None)
    base_ref, tag_parts = parse_ref(base)["ref"], parse_ref(tag)
    if tag_parts["digest"]:
        raise InvalidRequest(f"--tag {tag!r}: a tag, not a digest (the digest is the result's)")
    if not push and not output:
        raise InvalidRequest("nowhere to put the image: push it, or give an output file")
    skopeo, umoci = tool("skopeo"), tool("umoci")
    tls = [] if tls_verify else ["--src-tls-verify=false"]
    registry = parse_ref(base)["domain"] or "docker.io"
    with tempfile.TemporaryDirectory(prefix="sandlot-kube-image-") as work:
        layout = Path(work) / "oci"
        say(f"fetching {base_ref}")
        _run([skopeo, "copy", "--quiet", *_policy_args(), *tls, f"docker://{base_ref}", f"oci:{layout}:base"],
             f"image {base_ref}", registry)
        _, manifest, config = _manifest(layout, "base")
        python = find_python(_tree(layout, manifest), config)
        say(f"adding Sandlot's agent ({python} runs it)")
        layer = Path(work) / "agent.tar"
        layer.write_bytes(agent_layer())
        _run([umoci, "raw", "add-layer", "--image", f"{layout}:base", "--tag", "agent",
              "--history.created_by", "sandlot kube image: Sandlot's agent at /opt/sandlot/_agent", str(layer)],
             "adding the agent's layer")
        _run([umoci, "config", "--image", f"{layout}:agent", "--clear", "config.entrypoint", "--clear", "config.cmd",
              "--config.user", USER, "--config.workingdir", "/" + HOME, "--config.env=HOME=/" + HOME,
              *[f"--config.entrypoint={arg}" for arg in ENTRYPOINT], *[f"--config.cmd={arg}" for arg in CMD],
              "--history.created_by", "sandlot kube image: user 1000, the agent as entrypoint"],
             "setting the image's configuration")
        digest, _, _ = _manifest(layout, "agent")
        if output:
            say(f"writing {output}")
            target = Path(output)
            partial = target.with_name(f".{target.name}.partial")
            partial.unlink(missing_ok=True)
            _run([skopeo, "copy", "--quiet", *_policy_args(), f"oci:{layout}:agent",
                  f"oci-archive:{partial}:{tag_parts['ref']}"], f"writing {output}")
            os.replace(partial, target)
        if push:
            say(f"pushing {tag_parts['ref']}")
            digest_file = Path(work) / "digest"
            _run([skopeo, "copy", "--quiet", *_policy_args(), *([] if tls_verify else ["--dest-tls-verify=false"]),
                  "--digestfile", str(digest_file), f"oci:{layout}:agent", f"docker://{tag_parts['ref']}"],
                 f"pushing {tag_parts['ref']}", tag_parts["domain"] or "docker.io")
            digest = digest_file.read_text().strip() or digest
    say(f"built {tag_parts['ref']} ({digest})")
    return {"digest": digest, "python": python}
