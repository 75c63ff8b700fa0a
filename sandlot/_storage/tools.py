"""Finding the system tools the storage code runs (mkfs.ext4, debugfs, mount, unshare)."""

from __future__ import annotations

import os
import shutil


def tool(name: str) -> str:
    """The path of a system tool, /usr/sbin and /sbin included (a root shell's PATH may lack them)."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin", "/bin"])
    return shutil.which(name, path=search) or name
