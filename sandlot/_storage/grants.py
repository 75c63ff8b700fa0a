"""A sandbox's mounts made ready on the host, and released when it ends.

``prepare`` opens every granted host directory (checked against the operator's roots) and mounts every
volume (holding its lock) before the sandbox boots; a failure undoes what was done and says why. The
backend then takes copies for its sandbox: ``detached(user)`` for the process tier (descriptors of
detached, id-mapped mounts that pid 1 attaches before it pivots), ``attached(base, user)`` for gVisor
(the same copies attached on the host, where runsc's gofer binds them). ``release`` ends the host's side:
volumes unmounted (a sandbox's own copy keeps the file system until it ends) and unlocked.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path
from typing import Optional, Sequence

from .._agent import linux
from .._exceptions import InvalidRequest
from .hostdir import open_host_dir
from .idmap import detached_copy
from .mountpoints import MountPoint
from .volumes import OWNER, AttachedVolume, VolumeStore


@dataclasses.dataclass
class _Entry:
    target: str
    readonly: bool
    fd: int  # O_PATH descriptor of the directory to mount
    owner: tuple  # (uid, gid) on disk that the sandbox's user stands for (None: nobody, root's stay root's)


class PreparedMounts:
    def __init__(self) -> None:
        self._released = False
        self.entries: list[_Entry] = []
        self._volumes: list[AttachedVolume] = []
        self._points: list[MountPoint] = []

    def plan(self) -> list:
        """What the agent needs: each target and whether it is read-only, in the order of the copies."""
        return [{"target": e.target, "ro": e.readonly} for e in self.entries]

    def detached(self, user: int, unmapped_ok: bool = True) -> list:
        """One detached copy per mount (descriptors, the caller closes them), mapped for host uid ``user``
        (``unmapped_ok``: see idmap.detached_copy)."""
        fds: list = []
        try:
            for entry in self.entries:
                fds.append(detached_copy(entry.fd, readonly=entry.readonly, owner=entry.owner, user=user,
                                         unmapped_ok=unmapped_ok))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    def attached(self, base: Path, user: int) -> list:
        """The copies attached under ``base`` on the host: [(host path, target, readonly)]. Released with us.
        (For gVisor, whose user is a real host uid: never an unmapped copy.)"""
        out = []
        fds = self.detached(user, unmapped_ok=False)
        try:
            for entry, fd in zip(self.entries, fds):
                point = MountPoint(base, "grant")
                self._points.append(point)
                linux.move_mount(fd, str(point.path))
                out.append((str(point.path), entry.target, entry.readonly))
        finally:
            for fd in fds:
                os.close(fd)
        if self._released:  # its sandbox gave up while this ran in a thread: undo, nothing is left attached
            self.release()
            raise OSError("the sandbox's mounts were released while they were being attached")
        return out

    def release(self) -> None:
        self._released = True
        for point in self._points:
            point.release()
        self._points = []
        for entry in self.entries:
            if entry.fd >= 0:
                os.close(entry.fd)
                entry.fd = -1
        for volume in self._volumes:
            volume.release()
        self._volumes = []


def _owner(uid: int, gid: int) -> tuple:
    """The ids on disk the sandbox's user stands for in a host directory: its owner's, never root's (a
    root-owned directory maps nobody: the sandbox gets only what its files give to others)."""
    if uid == 0:
        return (None, None)
    return (uid, None if gid == 0 else gid)


def prepare(mounts: Sequence, volumes: VolumeStore, roots: Optional[Sequence[str]]) -> Optional[PreparedMounts]:
    """Open and mount what ``mounts`` (spec Mounts) grant; None when there is nothing to grant."""
    if not mounts:
        return None
    prepared = PreparedMounts()
    try:
        for mount in mounts:
            if mount.kind == "volume":
                volume = volumes.attach(mount.source, mount.readonly)
                prepared._volumes.append(volume)
                fd = os.open(volume.path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
                prepared.entries.append(_Entry(mount.target, mount.readonly, fd, (OWNER, OWNER)))
            else:
                granted = open_host_dir(mount.source, roots, writable=not mount.readonly)
                if not mount.readonly and (granted.uid == 0 or granted.gid == 0):
                    granted.close()
                    fix = ("" if granted.uid == 0 else
                           "; give it its owner's group (chgrp) to grant it writable")
                    whose = "owned by root" if granted.uid == 0 else "of group root"
                    raise InvalidRequest(f"host directory {mount.source!r} is {whose}: it can be granted read-only, "
                                         "never writable (the sandbox would act as root there, and its files would be "
                                         f"root's on the host){fix}")
                owner = _owner(granted.uid, granted.gid)
                prepared.entries.append(_Entry(mount.target, mount.readonly, granted.fd, owner))
    except BaseException:
        prepared.release()
        raise
    return prepared


async def prepare_async(mounts: Sequence, volumes: VolumeStore,
                        roots: Optional[Sequence[str]]) -> Optional[PreparedMounts]:
    """``prepare`` in a thread. A caller cancelled meanwhile (a timeout, a client gone) cannot stop the thread;
    what it prepares is then released when it ends, instead of holding volumes mounted and locked for good."""
    future = asyncio.get_running_loop().run_in_executor(None, prepare, mounts, volumes, roots)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        future.add_done_callback(_release_unclaimed)
        raise


def _release_unclaimed(future: "asyncio.Future") -> None:
    if not future.cancelled() and future.exception() is None and future.result() is not None:
        future.result().release()
