"""What the tiers share, in one place: neither tier imports the other's private names.

Where the host keeps runtime state, the agent's directory, sandbox ids, the environment and boot
configuration a sandbox's agent gets (the same agent runs under both tiers), the boot-message loop,
and the handle's cgroup side (limits, counters, removal).
"""

from __future__ import annotations

import asyncio
import errno
import os
import secrets
from pathlib import Path

from .. import _config
from .._exceptions import HostUnsupported, SandboxCrashed
from .._host import cgroups, seccomp
from .._host.channel import CLOSED, Channel
from .._limits import Limits
from .._templates import Template
from .base import Counters, BackendSandbox

AGENT_DIR = Path(__file__).resolve().parent.parent / "_agent"


def state_dir() -> Path:
    """Where the host keeps its runtime state. Never visible inside a sandbox."""
    base = _config.state_dir()
    base.mkdir(mode=0o711, parents=True, exist_ok=True)
    base.chmod(0o711)  # sandboxes must traverse it to reach their mountpoint; listing stays private
    return base


def new_sandbox_id() -> str:
    return "sb-" + secrets.token_hex(6)


def is_sandbox_id(value: object) -> bool:
    """The shape ``new_sandbox_id`` makes (safe as a path component and a cgroup name)."""
    return isinstance(value, str) and value.startswith("sb-") and "/" not in value


# -- what the agent is told at boot (both tiers) -------------------------------------------------------
def _mountpoint() -> str:
    """An empty directory each sandbox mounts its new root on, inside its own mount namespace."""
    path = state_dir() / "rootfs-mnt"
    path.mkdir(mode=0o755, exist_ok=True)
    return str(path)


def sandbox_env(template: Template, env: dict[str, str]) -> dict[str, str]:
    """The environment code in the sandbox sees: ours, the template's, then the owner's."""
    # An image's python is a path inside the image (its PATH usually comes with its env); an image
    # without one has "" (and an empty PATH entry would mean the cwd).
    python_dir = os.path.dirname(template.python) if template.python else "/usr/sbin:/sbin"
    base = {"PATH": "/usr/local/bin:/usr/bin:/bin:" + python_dir,
            "HOME": "/home/user", "USER": "user", "LANG": "C.UTF-8", "TERM": "dumb",
            "MPLBACKEND": "module://_agent.mpl_backend", "MPLCONFIGDIR": "/home/user/.config/matplotlib",
            "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    base.update(dict(template.env))
    base.update(env)
    return base


def template_config(template: Template, env: dict[str, str]) -> dict:
    """The part of the agent's boot plan that depends on the template only (a zygote's, shared by its forks)."""
    config = {
        "mountpoint": _mountpoint(),
        "prefixes": list(template.prefixes),
        "agent_dir": str(AGENT_DIR),
        "setup_uid": 0 if os.geteuid() == 0 else 1000,
        "seccomp": seccomp.compiled_filter(allow_merging=_config.ksm()).hex(),
        "preload": list(template.preload),
        "env": sandbox_env(template, env),
        "template": template.name,
    }
    if template.rootfs:
        config.update(image_config(template))
    if _config.ksm():  # only when asked: a zygote's key (a hash of this plan) is unchanged otherwise
        from .._host import ksm

        ksm.engage()
        config["ksm"] = True
    return config


def image_config(template: Template) -> dict:
    """What an image template adds to the plan (both tiers): its root, the interpreter the agent runs
    under inside (the image's Python, or the host's lent under /opt/sandlot/host when it has none),
    and the build-step switches."""
    from .._images import agent_launch

    launch = agent_launch(template)
    return {
        "rootfs": template.rootfs, "exec": launch["argv"], "python": template.has_python,
        "binds": [list(b) for b in launch["binds"]] + [list(b) for b in template.binds],
        "workdir": template.workdir, "writable": template.writable, "egress": template.egress,
        "build_root": template.writable and os.geteuid() == 0,  # root of its own user namespace
    }


def sandbox_config(limits: Limits, env: dict, storage_overhead: int = 0) -> dict:
    """The part of the agent's boot plan that is this sandbox's own: its environment and rlimits."""
    return {"env": env, "limits": {
        "disk": limits.storage(storage_overhead), "inodes": limits.inodes, "open_files": limits.open_files, "pids": limits.pids,
        # RLIMIT_CPU is a per-process backstop only (the wall timeouts and lifetime are the host's):
        # fixed at the longest lifetime allowed, so it never depends on the owner's settings.
        "cpu_seconds": int(14 * 86400 * max(1.0, limits.cpu)) + 1}}


# -- booting -------------------------------------------------------------------------------------------
async def boot_message(channel: Channel, who: str = "sandbox") -> dict:
    """The agent's next message while it boots: SandboxCrashed if the sandbox died, HostUnsupported if
    its setup failed (the agent says why)."""
    item = await channel.control.get()
    if item is CLOSED:
        raise SandboxCrashed(f"{who} died while booting: {channel.closed_reason}")
    header, _ = item
    if header.get("t") == "boot_error":
        raise HostUnsupported(f"{who} setup failed: {header.get('error')}")
    return header


# -- the handle's cgroup side --------------------------------------------------------------------------
CLAIM_MARGIN = 32 * 1024**2  # what a claimed warm sandbox keeps free beside its files and current memory


class CgroupSandbox(BackendSandbox):
    """A handle whose sandbox lives in one cgroup (both tiers): limits and counters are the kernel's."""

    cgroup: cgroups.Cgroup
    # What the tier itself keeps in the sandbox's memory cgroup beside the code (Limits.storage).
    storage_overhead: int = 0
    storage_bytes: int = 0  # the size its tmpfs was given (set at boot, changed by _fit_storage)

    def cgroup_limits(self, limits: Limits) -> Limits:
        """What the cgroup gets for these limits (a tier may keep room for its own helpers)."""
        return limits

    async def apply_limits(self, limits: Limits) -> None:
        before = self.limits
        if (limits.cpu, limits.memory, limits.pids) != (before.cpu, before.memory, before.pids):
            await asyncio.to_thread(self._apply_cgroup, self.cgroup_limits(limits))
        elif self.cgroup.background:
            self.cgroup.set_background(False)  # one short write (~35 us): cheaper here than a thread hop
        if limits.memory != before.memory:
            await asyncio.to_thread(self._fit_storage, limits)
        self.limits = limits  # once the kernel took them (a refused write leaves the old ones)

    def _apply_cgroup(self, limits: Limits) -> None:
        self.cgroup.apply(limits)
        if self.cgroup.background:  # a warm sandbox booted in the background: its owner's code gets a full share
            self.cgroup.set_background(False)

    def _fit_storage(self, limits: Limits) -> None:
        """Its storage is memory too (a tmpfs): with other memory, other room for files, or a full disk would
        be an OOM kill. A warm sandbox already holds some memory (a preloaded session, gVisor's sentry): its
        files get what the new limit leaves beside that, at most what a fresh sandbox would (Limits.storage);
        if that is too little, OSError: the caller boots a fresh one. A warm sandbox's storage is still
        nearly empty, so shrinking it works."""
        want = limits.storage(self.storage_overhead)
        fit = min(want, limits.memory - self.cgroup.memory_current() - CLAIM_MARGIN - self.storage_overhead)
        if fit < min(64 * 1024**2, want):
            raise OSError(errno.ENOMEM, f"this warm sandbox already uses {self.cgroup.memory_current() >> 20} MiB: "
                                        f"{limits.memory >> 20} MiB leaves its files too little room")
        if fit != self.storage_bytes:
            self.resize_scratch(fit)
            self.storage_bytes = fit

    def resize_scratch(self, size: int) -> None:
        """Give home, /tmp and /dev/shm (one tmpfs) ``size`` bytes; OSError if the kernel refuses."""
        raise OSError(errno.ENOTSUP, f"{self.isolation} sandboxes cannot resize their storage")

    def usage(self, *, reset_peak: bool = False, processes: bool = False) -> Counters:
        cg = self.cgroup
        if reset_peak:
            cg.reset_peak()
        return Counters(cpu_seconds=cg.cpu_seconds(), memory=cg.memory_current(), memory_peak=cg.memory_peak(),
                        oom_kills=cg.oom_kills(), memory_limit_hits=cg.memory_limit_hits(),
                        pids_limit_hits=cg.pids_limit_hits(), processes=len(cg.pids()) if processes else None)

    async def remove_cgroup(self) -> None:
        """Delete the cgroup once the kernel has detached its last exited task (within seconds)."""
        for _ in range(500):
            if self.cgroup.try_remove():
                return
            await asyncio.sleep(0.01)
