"""Fork of a live gVisor session: a checkpoint of the parent restored twice, as itself and as a new id.

Debian's runsc (2022) cannot checkpoint and keep a container running: its ``checkpoint --leave-running``
destroys the container and restores it from the image inside the checkpoint command, on that command's
stdio, so the parent would lose its channel (the container's stdin/stdout pipes). So a fork is the parent's
own pause and resume: ``runsc checkpoint`` into the parent's image/ (every task stopped; its tmpfs stays
mounted), the files copied while it is stopped, then the parent restored on fresh pipes and, at the same
time, the child restored from the same image (hard links in the child's home: the parent's resume removes its
own names) under a new id. The parent is stopped for the checkpoint and its restore; its session, files and
background commands carry on (requests in flight on the old channel are orphaned, as for any new owner).

The child gets a home of its own under data_dir()/sandboxes/<id> like any gVisor sandbox (bundle/, its own
writable tmpfs, its own cgroup with the parent's limits, the owner's lock). A checkpoint holds memory, not the
files the gofer serves, so the parent's writable tmpfs (home, /tmp, /dev/shm) is copied into the child's
while the parent is stopped: the copy matches the memory image exactly. The child's OCI spec is the parent's
with the writable binds pointing at the child's tmpfs. Its image links are removed once it runs (or with its
home, if the fork fails). A paused parent is forked from its checkpoint as it is, and stays paused.

Refused: a sandbox with a network (its host sockets and broker do not survive a checkpoint) and one with
mounts (its granted host directories and volumes are held for it alone).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Optional

from .._exceptions import InvalidRequest, SandboxCrashed, SandboxNotFound
from ._common import CgroupSandbox

COPY_TIMEOUT = 300.0

# (Both sandboxes are gvisor.GVisorSandbox; typed by their base here: gvisor.py imports this module, not back.)


def refuse_unforkable(parent: CgroupSandbox) -> None:
    """InvalidRequest (or SandboxNotFound) for a sandbox that cannot be forked, before anything is made."""
    if parent._netns is not None:
        raise InvalidRequest("a sandbox with a network cannot be forked: its host sockets and its broker do not "
                             "survive a checkpoint")
    if parent.grants is not None:
        raise InvalidRequest("a sandbox with mounts cannot be forked: its host directories and volumes are "
                             "granted to it alone")
    if parent._cleaned or (not parent.paused and parent.returncode is not None):
        raise SandboxNotFound(f"sandbox {parent.id} is gone: {parent.killed_reason or 'it ended'}")


async def copy_session(parent: CgroupSandbox, child: CgroupSandbox, boot_timeout: float) -> None:
    """Make ``child`` (its home, cgroup and empty writable tmpfs ready, nothing running) a running copy of
    ``parent``'s session; on failure ``child`` is killed (its home and cgroup go with it)."""
    home, rw = child.home, child.home / "rw"
    image = home / "fork-image"
    was_paused = parent.paused
    parent_back: "Optional[asyncio.Task]" = None
    try:
        spec = json.loads((parent.home / "bundle" / "config.json").read_text())
        (home / "bundle" / "config.json").write_text(json.dumps(_child_spec(spec, parent.home / "rw", rw)))
        if not was_paused:
            await parent.pause()
        try:
            await _copy_files(parent.home / "rw", rw, child)
            await asyncio.to_thread(_link_tree, parent.home / "image", image)
        finally:
            if not was_paused:
                parent_back = asyncio.get_running_loop().create_task(_resume_parent(parent))
        await child._launch("restore", f"--image-path={image}", f"--bundle={home / 'bundle'}", child.id)
        # First, before any request of ours: the parent's requests in flight in the copy are orphaned (their
        # ids would collide with the child's own), and the copy's random state is its own.
        await child.channel.send({"t": "owner", "id": 0})
        await child.channel.send({"t": "reseed", "id": 0})
        await _first_ping(child, boot_timeout)
    except BaseException:
        await asyncio.shield(child.kill("fork failed"))
        raise
    finally:
        if parent_back is not None:
            # The parent failing to come back kills it (resume() does): its owner hears so on its next call;
            # a child that runs is returned all the same.
            with contextlib.suppress(Exception):
                await parent_back
        await asyncio.to_thread(shutil.rmtree, image, True)
    meta = parent.home / "meta.json"
    child._write_meta(json.loads(meta.read_text()).get("env", {}) if meta.exists() else {})


async def _resume_parent(parent: CgroupSandbox) -> None:
    await parent.resume()
    await parent.channel.send({"t": "owner", "id": 0})  # requests of the channel before the pause are orphans


def _link_tree(source: Path, target: Path) -> None:
    """``target`` a copy of the directory ``source`` made of hard links (same filesystem: no bytes copied)."""
    shutil.copytree(source, target, copy_function=os.link)


def _child_spec(spec: dict, parent_rw: Path, child_rw: Path) -> dict:
    """The parent's OCI spec with its writable binds (home, /tmp, /dev/shm) on the child's own tmpfs."""
    old = str(parent_rw) + "/"
    for mount in spec.get("mounts", []):
        source = mount.get("source", "")
        if source.startswith(old):
            mount["source"] = str(child_rw) + "/" + source[len(old):]
    if str(spec.get("root", {}).get("path", "")).startswith(str(parent_rw.parent) + "/"):
        raise InvalidRequest("a sandbox booted on a root of its own (mount points for its grants) cannot be forked")
    return spec


async def _copy_files(source: Path, target: Path, child: CgroupSandbox) -> None:
    """``cp -a`` of the parent's tmpfs into the child's, run inside the child's cgroup: the copied pages are
    the child's memory (tmpfs pages count against the cgroup that wrote them), not this process's."""
    procs = [str(d / "cgroup.procs") for d in child.cgroup.dirs.values()]
    script = ('for f in "$@"; do printf %s $$ > "$f" || exit 97; done; exec '
              + shlex.join(["cp", "-a", "--no-target-directory", str(source), str(target)]))
    out = await asyncio.to_thread(subprocess.run, ["/bin/sh", "-c", script, "sh", *procs], capture_output=True, text=True,
                          timeout=COPY_TIMEOUT)
    if out.returncode != 0:
        raise SandboxCrashed(f"copying the sandbox's files failed: {out.stderr.strip()[-500:]}")


async def _first_ping(child: CgroupSandbox, boot_timeout: float) -> None:
    """The restored agent answers on the child's own channel (as resume() checks)."""
    if not await child.channel.ping(boot_timeout):
        raise SandboxCrashed(f"the fork {child.id} did not come back from its checkpoint")
