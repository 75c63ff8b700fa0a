"""Landlock: a second, unprivileged fence on the filesystem (and on signals/abstract sockets, ABI >= 6).

The read-only root already stops writes; Landlock makes the rule independent of mount flags, so a
mistake in the mount table cannot open a writable path. Stdlib only.
"""

from __future__ import annotations

import ctypes
import os

from . import linux

EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
MAKE_REG, MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM = 1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 12
REFER, TRUNCATE, IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1, 2

READ = EXECUTE | READ_FILE | READ_DIR
DEVICE_RW = READ_FILE | WRITE_FILE | TRUNCATE | IOCTL_DEV


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def abi_version() -> int:
    """0 when the kernel has no Landlock (or it is disabled)."""
    try:
        return linux.syscall("landlock_create_ruleset", None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    except OSError:
        return 0


def _all_fs_rights(abi: int) -> int:
    rights = (1 << 13) - 1
    if abi >= 2:
        rights |= REFER
    if abi >= 3:
        rights |= TRUNCATE
    if abi >= 5:
        rights |= IOCTL_DEV
    return rights


def restrict(read_paths: list, write_paths: list, device_paths: list) -> int:
    """Confine this process (and its future children) to the given paths. Returns the ABI used."""
    abi = abi_version()
    if abi < 1:
        return 0
    handled = _all_fs_rights(abi)
    scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0
    # struct landlock_ruleset_attr grew by one u64 at ABI 4 (net) and ABI 6 (scoped).
    fields = [handled, 0, scoped] if abi >= 6 else [handled, 0] if abi >= 4 else [handled]
    attr = (ctypes.c_uint64 * len(fields))(*fields)
    ruleset = linux.syscall("landlock_create_ruleset", ctypes.byref(attr),
                            ctypes.c_size_t(ctypes.sizeof(attr)), ctypes.c_uint32(0))
    try:
        for paths, rights in ((read_paths, READ), (write_paths, handled), (device_paths, DEVICE_RW)):
            for path in paths:
                _add_path_rule(ruleset, path, rights & handled)
        linux.syscall("landlock_restrict_self", ruleset, ctypes.c_uint32(0))
    finally:
        os.close(ruleset)
    return abi


def _add_path_rule(ruleset: int, path: str, rights: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        if not os.path.isdir(path):
            # Directory-only rights are rejected on files.
            rights &= EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV
        rule = _PathBeneath(rights, fd)
        linux.syscall("landlock_add_rule", ruleset, ctypes.c_int(1), ctypes.byref(rule), ctypes.c_uint32(0))
    finally:
        os.close(fd)
