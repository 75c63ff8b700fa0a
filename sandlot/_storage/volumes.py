"""Named volumes: persistent, size-capped storage that outlives sandboxes, the server and a reboot.

A volume is an ext4 file system in a sparse image file under the data directory, one directory per scope
(``local`` for this host's SDK, one per tenant on a server), so two scopes never see each other's names.
The kernel enforces its size (the file system is that big: a full volume is ENOSPC to the code, and the
sandbox lives on) and its inode cap (fixed when it is made). Files in it belong to uid/gid 1000 on disk,
the sandbox user's ids: the process tier maps them to each sandbox's own user (id-mapped mount), gVisor's
sandbox user is 1000 on the host.

One writer or many readers: a writable mount takes the volume's lock exclusively, a read-only one
(``vol:NAME:ro``) shares it; a mount that cannot have it is refused at once (never waits). Each mount is a
loop mount of its own (read-only ones on a read-only loop device); while a writer's is attached no other
is made. ``delete`` refuses a volume that is mounted.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path
from typing import Optional

from .. import _config
from .._exceptions import HostUnsupported, InvalidRequest
from .._limits import parse_size
from .._models import VolumeInfo
from .mountpoints import MountPoint, sweep
from .tools import tool
from .mounts import check_volume_name

MIN_SIZE = 16 * 1024**2
MAX_SIZE = 16 * 1024**4
MIN_INODES, MAX_INODES = 64, 100_000_000
OWNER = 1000  # the sandbox user's uid and gid, on disk
LOCAL_SCOPE = "local"
LOCK_WAIT = 2.0  # how long a mount waits for a volume that another sandbox is just releasing


def volumes_root() -> Path:
    return _config.data_dir() / "volumes"


def _mounts_dir() -> Path:
    return volumes_root() / ".mounts"


def _attached_loops(image: Path, writable_only: bool = False) -> list:
    """Loop devices backed by ``image`` now (a mount still attached, or one the kernel is still releasing);
    ``writable_only``: only read-write ones (a writer's)."""
    found = []
    target = os.path.realpath(image)  # the kernel names the backing file by its real path
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            name = backing.read_text().strip()
            if writable_only and (backing.parent.parent / "ro").read_text().strip() == "1":
                continue
        except OSError:
            continue
        if name == target or name == target + " (deleted)":
            found.append(backing.parent.parent.name)
    return found


def _run(argv: list, what: str) -> None:
    argv = [tool(argv[0]), *argv[1:]]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise HostUnsupported(f"{what} needs {argv[0]} (Debian: e2fsprogs / util-linux)") from None
    if done.returncode != 0:
        raise HostUnsupported(f"{what} failed: {(done.stderr or done.stdout).strip()[:400]}")


class VolumeStore:
    """The volumes of one scope."""

    def __init__(self, scope: str = LOCAL_SCOPE, root: Optional[Path] = None) -> None:
        if not scope or "/" in scope or scope.startswith("."):
            raise InvalidRequest(f"bad volume scope {scope!r}")
        self.scope = scope
        self._root = root

    @property
    def root(self) -> Path:
        return (self._root or volumes_root()) / self.scope

    def _dir(self, name: str) -> Path:
        return self.root / check_volume_name(name)

    def _existing(self, name: str) -> Path:
        sweep(_mounts_dir())  # a dead process's mounts first, so "in use" means a live holder
        path = self._dir(name)
        if not (path / "meta.json").is_file():
            raise InvalidRequest(f"no volume {name!r} (sandlot.volumes.create({name!r}, size=...) makes one)")
        return path

    # -- CRUD ---------------------------------------------------------------------------------------------
    def create(self, name: str, size, inodes: Optional[int] = None) -> VolumeInfo:
        """A new, empty volume of ``size`` bytes ("2G" accepted) and ``inodes`` files at most (default: one
        per 16 KiB). InvalidRequest if the name is taken or a cap is out of range."""
        if os.geteuid() != 0:
            raise HostUnsupported("volumes need Sandlot to run as root (loop-mounted file systems)")
        final = self._dir(name)
        size = parse_size(size, "size")
        if not MIN_SIZE <= size <= MAX_SIZE:
            raise InvalidRequest(f"volume size must be between 16M and 16T, not {size} bytes")
        if inodes is None:
            inodes = min(max(size // 16384, 1024), MAX_INODES)
        if isinstance(inodes, bool) or not isinstance(inodes, int) or not MIN_INODES <= inodes <= MAX_INODES:
            raise InvalidRequest(f"volume inodes must be an integer from {MIN_INODES} to {MAX_INODES}")
        if inodes > size // 1024:  # ext4 keeps at least a KiB per inode
            raise InvalidRequest(f"volume inodes: at most one per KiB of its size, {size // 1024} for {size} bytes")
        if final.exists():
            raise InvalidRequest(f"volume {name!r} already exists")
        self.root.mkdir(parents=True, exist_ok=True)
        building = self.root / f".{name}.new-{secrets.token_hex(4)}"
        building.mkdir(mode=0o700)
        try:
            image = building / "image.ext4"
            try:
                with open(image, "wb") as f:
                    f.truncate(size)  # sparse: the host disk pays only for what is written
            except OSError as exc:  # EFBIG: 16T is past ext4's largest file with 4 KiB blocks
                raise HostUnsupported(f"volume {name!r}: the data directory's file system cannot hold an image of "
                                      f"{size} bytes ({exc.strerror})") from None
            _run(["mkfs.ext4", "-q", "-F", "-m", "0", "-N", str(inodes), "-E",
                  f"root_owner={OWNER}:{OWNER},nodiscard", "-O", "^resize_inode", str(image)], "making the volume")
            # An empty volume, as the owner asked: no lost+found (fsck makes one again if it ever needs it).
            _run(["debugfs", "-w", "-R", "rmdir lost+found", str(image)], "making the volume")
            actual = _inode_count(image) or inodes
            (building / "lock").touch(mode=0o600)
            meta = {"name": name, "size": size, "inodes": actual, "created_at": time.time()}
            (building / "meta.json").write_text(json.dumps(meta))
            try:
                os.rename(building, final)  # fails if another create of the same name won
            except OSError:
                raise InvalidRequest(f"volume {name!r} already exists") from None
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        return self.info(name)

    def info(self, name: str) -> VolumeInfo:
        path = self._existing(name)
        meta = json.loads((path / "meta.json").read_text())
        image = path / "image.ext4"
        return VolumeInfo(name=name, size=int(meta["size"]), inodes=int(meta["inodes"]),
                          allocated=image.stat().st_blocks * 512, created_at=float(meta["created_at"]),
                          in_use=self._in_use(path))

    def list(self) -> list:
        if not self.root.is_dir():
            return []
        found = []
        for path in sorted(self.root.iterdir()):
            if path.name.startswith("."):
                continue
            try:
                found.append(self.info(path.name))
            except (InvalidRequest, OSError):
                continue  # deleted while we listed
        return found

    def delete(self, name: str) -> None:
        """Remove a volume and everything in it; InvalidRequest while a sandbox has it mounted."""
        path = self._existing(name)
        fd = os.open(path / "lock", os.O_RDWR | os.O_CLOEXEC)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise InvalidRequest(f"volume {name!r} is mounted by a sandbox; delete it once that ends") from None
            deadline = time.monotonic() + LOCK_WAIT  # a loop device goes a moment after its last mount
            while _attached_loops(path / "image.ext4"):
                if time.monotonic() > deadline:
                    raise InvalidRequest(f"volume {name!r} is still mounted (a sandbox is ending); try again")
                time.sleep(0.02)
            doomed = self.root / f".{name}.deleted-{secrets.token_hex(4)}"
            os.rename(path, doomed)  # gone for every name lookup at once
        finally:
            os.close(fd)
        shutil.rmtree(doomed, ignore_errors=True)

    @staticmethod
    def _in_use(path: Path) -> bool:
        try:
            fd = os.open(path / "lock", os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return bool(_attached_loops(path / "image.ext4"))

    # -- mounting -----------------------------------------------------------------------------------------
    def attach(self, name: str, readonly: bool) -> "AttachedVolume":
        """Mount the volume on the host (a private mount point of its own) for one sandbox, holding its
        lock: exclusive for a writer, shared for readers. Refused at once if that lock is taken."""
        path = self._existing(name)
        fd = os.open(path / "lock", os.O_RDWR | os.O_CLOEXEC)
        try:
            if not _lock_within(fd, fcntl.LOCK_SH if readonly else fcntl.LOCK_EX, LOCK_WAIT):
                how = "read-only ('vol:NAME:ro')" if readonly else "at all"
                raise InvalidRequest(
                    f"volume {name!r} is in use: it has one writer or many readers, so it cannot be mounted "
                    f"{'writable' if not readonly else how} now") from None
            try:  # the lock taken is this volume's (not one deleted, and remade, while we waited)
                same = os.fstat(fd).st_ino == os.stat(path / "lock").st_ino
            except FileNotFoundError:
                same = False
            if not same:
                raise InvalidRequest(f"volume {name!r} was deleted while this mount waited for it")
            image = path / "image.ext4"
            # The last writer's file system must be gone before anyone mounts it again (a reader too: its
            # read-only mount would meet the writer's loop device, 'already mounted'), and a new writer's also
            # waits for the readers'. (A dead process's host mounts were swept when the volume was looked up.)
            deadline = time.monotonic() + 5
            while _attached_loops(image, writable_only=readonly):
                if time.monotonic() > deadline:
                    raise InvalidRequest(f"volume {name!r} is still being released by an ended sandbox; try again")
                time.sleep(0.02)
            point = MountPoint(_mounts_dir(), f"{self.scope}.{name}")
            try:
                _run(["mount", "-t", "ext4", "-o", ",".join(["loop", "nosuid", "nodev", "ro" if readonly else "rw"]),
                      str(image), str(point.path)], f"mounting volume {name!r}")
            except BaseException:
                point.release()
                raise
            return AttachedVolume(name, point, fd)
        except BaseException:
            os.close(fd)
            raise


class AttachedVolume:
    """A volume mounted on the host for one sandbox; ``release()`` detaches it and frees the lock."""

    def __init__(self, name: str, point: MountPoint, lock_fd: int) -> None:
        self.name, self.point, self._lock_fd = name, point, lock_fd

    @property
    def path(self) -> Path:
        return self.point.path

    def release(self) -> None:
        if self._lock_fd < 0:
            return
        self.point.release()
        os.close(self._lock_fd)
        self._lock_fd = -1


def _lock_within(fd: int, kind: int, seconds: float) -> bool:
    """Take a flock, retrying for ``seconds`` (a sandbox that just ended may still be releasing it)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)


def _inode_count(image: Path) -> Optional[int]:
    try:
        out = subprocess.run([tool("dumpe2fs"), "-h", str(image)], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        if line.startswith("Inode count:"):
            return int(line.split(":", 1)[1])
    return None


def sweep_mounts() -> int:
    """Volume mounts that a dead process left attached: detached and removed."""
    return sweep(_mounts_dir())
