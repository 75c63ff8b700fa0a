"""The backend interface: small and Popen-like, in the spirit of jupyter_client's provisioners.

A backend starts a sandbox running the agent and hands back a ``BackendSandbox``: a channel that
speaks the wire protocol, plus process control, limits and the kernel's counters. Everything above
(sessions, commands, files, limits reporting, pools, the server) is written once against this
interface and asks a tier's declared ``Capabilities``, never the handle's attributes, what it can do.

``describe()`` and ``Backend.adopt()`` are jupyter_client's ``get_provisioner_info`` /
``load_provisioner_info``: plain JSON data about a sandbox that a later owner (a restarted server, a
new process) hands back to take the sandbox over, where the tier can.

This module knows no tier: the registry (registry.py) maps names to tiers; code both tiers share is
in _common.py.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Optional

from .._exceptions import InvalidRequest
from .._host.channel import Channel
from .._limits import Limits
from .._templates import Template

if TYPE_CHECKING:
    from .._storage.grants import PreparedMounts


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a tier can do beyond start, exec and kill. Declared, so callers ask instead of probing."""

    pause: bool = False  # pause()/resume(): stop a live sandbox and bring it back, variables intact
    checkpoint: bool = False  # a paused sandbox is on disk: adopt() takes it back in a later process
    fork: bool = False  # sandboxes fork from a warm per-template parent (prepare() starts it)
    # fork_live(): a copy of one owner's *live* session (variables, files, cwd) as a new sandbox. Not ``fork``
    # above, which is how a tier boots fresh sandboxes fast (a zygote), not something an owner asks for.
    fork_live: bool = False
    network: bool = False  # a network policy (egress by rules, secrets) beyond "no network"
    mounts: bool = False  # host directories or volumes granted at create (none yet)
    outlive: bool = False  # a leased sandbox outlives its owner's process; adopt() takes it back live

    def to_dict(self) -> dict[str, bool]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Counters:
    """A sandbox's usage at one moment, from the kernel's own counters (never reported by the sandbox)."""

    cpu_seconds: float
    memory: int  # bytes in use now
    memory_peak: int  # bytes, since the last reset_peak (or the sandbox's birth)
    oom_kills: int
    memory_limit_hits: int  # how often usage ran into the memory limit, even without an OOM kill
    pids_limit_hits: int  # how often a fork failed at the process limit
    processes: Optional[int] = None  # counted only when asked: it lists the sandbox's tasks


class BackendSandbox(abc.ABC):
    id: str
    isolation: ClassVar[str] = "?"  # the name of the backend (tier) that made it
    template: str
    limits: Limits
    channel: Channel
    killed_reason: Optional[str]
    # The backend that made it keeps its background cleanup alive (set by the backend at creation).
    on_cleanup: Callable[["asyncio.Task[None]"], None]
    # Its granted host directories and volumes (held on the host until its cleanup releases them).
    grants: "Optional[PreparedMounts]" = None

    def release_grants(self) -> None:
        """The host's side of its mounts released (volumes unmounted and unlocked): once it has ended."""
        grants, self.grants = self.grants, None
        if grants is not None:
            grants.release()

    async def grants_released(self, within: float = 10.0) -> None:
        """Wait (a killed sandbox's cleanup runs in the background) until its mounts are released."""
        deadline = asyncio.get_running_loop().time() + within
        while self.grants is not None and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.005)

    @property
    @abc.abstractmethod
    def pid(self) -> int: ...

    @property
    @abc.abstractmethod
    def returncode(self) -> Optional[int]: ...

    @abc.abstractmethod
    async def wait(self) -> int: ...

    @abc.abstractmethod
    async def kill(self, reason: str = "killed") -> None: ...

    # -- limits and usage --------------------------------------------------------------------------
    @abc.abstractmethod
    async def apply_limits(self, limits: Limits) -> None:
        """These limits from now on (a warm sandbox takes its owner's). Those fixed at boot (disk,
        inodes, open files, pids) must be unchanged; cpu and memory change in the kernel. Raises
        InvalidRequest when the kernel refuses to lower one below current use (then nothing changed
        that matters: the caller drops the sandbox)."""

    async def refresh_usage(self, *, reset_peak: bool = False) -> None:
        """Fetch the counters now where they are not on this host (a pod's): ``usage()`` then answers from them.
        Tiers that read the kernel's counters here do nothing."""

    @abc.abstractmethod
    def usage(self, *, reset_peak: bool = False, processes: bool = False) -> Counters:
        """The kernel's counters now (cheap: read around every call). ``reset_peak`` first starts the
        memory peak over; ``processes`` also counts the sandbox's tasks."""

    # -- pause (where the tier declares it) ----------------------------------------------------------
    @property
    def paused(self) -> bool:
        """Stopped by ``pause()`` and waiting for ``resume()``."""
        return False

    async def pause(self) -> dict[str, float]:
        """Stop the live sandbox, keeping its state; returns figures ({"seconds", "bytes"})."""
        raise self._unsupported("pause")

    async def resume(self) -> dict[str, float]:
        """Bring a paused sandbox back; returns figures ({"seconds"})."""
        raise self._unsupported("pause")

    # -- fork a live session (where the tier declares fork_live) ------------------------------------
    async def fork_live(self) -> "BackendSandbox":
        """A new sandbox holding a copy of this one's session as it is now (memory, files, cwd), independent
        from then on; this one runs on. The caller owns the copy (and reseeds its random state)."""
        raise self._unsupported("fork_live", "fork a live session")

    def _unsupported(self, capability: str, doing: Optional[str] = None) -> InvalidRequest:
        able = " or ".join(f"isolation={name!r}" for name in _isolations_with(capability)) or "a tier that can"
        return InvalidRequest(f"the {self.isolation} tier cannot {doing or capability}: use {able}")

    # -- network (where the tier declares it) ---------------------------------------------------------
    def netns_pid(self) -> int:
        """A host pid whose network namespace is the sandbox's, for the host to configure and serve."""
        raise self._unsupported("network")

    def check_ports(self) -> None:
        """Raise what keeps ``open_port`` from reaching any port of this sandbox (a gVisor sandbox made without a
        network), so ``get_url`` says so at once instead of handing out a URL that only ever answers 502."""
        self.netns_pid()

    async def open_port(self, port: int) -> "tuple[asyncio.StreamReader, asyncio.StreamWriter]":
        """A new TCP connection to ``port`` of the sandbox (a server its code started: ``get_url`` and the server's
        /ports/ route); PortUnreachable when nothing answers there. The host tiers connect inside its network
        namespace, to its loopback."""
        from .._net.ports import connect_inside

        return await connect_inside(self.netns_pid(), port)

    async def leased(self, until: Optional[float]) -> None:
        """Its owner told it its deadline (unix time): a tier that keeps its own record of the sandbox's
        end (a cluster's claim) moves it too."""

    # -- taking a sandbox back -----------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """Plain JSON data enough to find this sandbox again (``Backend.adopt`` takes it back)."""
        return {"isolation": self.isolation, "id": self.id, "template": self.template, "limits": self.limits.to_dict(),
                "paused": self.paused}


class Backend(abc.ABC):
    """One tier. An Engine (_engine.py) makes one instance of each tier it uses and owns it: what the
    instance holds (the process tier's zygotes, the cleanups of killed sandboxes) is the engine's."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities] = Capabilities()
    # A sandbox with a network must be booted with it (start(network=True)): a warm one cannot be given one.
    network_at_boot: ClassVar[bool] = False
    # Its sandboxes' network policy is the cluster's to enforce (given to start() as ``policy=``), not this host's
    # broker's: no names, no secrets, no log.
    network_by_cluster: ClassVar[bool] = False
    # Warm sandboxes of this tier are kept by the engine's pools (False: elsewhere, a cluster's warm pool).
    pooled: ClassVar[bool] = True
    # Its sandboxes are reachable from any server that shares the database (a cluster's pods), not only from
    # this host: servers take them over on demand instead of at start (replicas), and none marks them lost.
    reachable_anywhere: ClassVar[bool] = False
    # Set by the engine: its sandboxes may outlive this process (a lease frame tells each how long) and
    # ``adopt()`` takes them back in the next one. Otherwise each ends with its owner.
    durable: bool = False

    def __init__(self) -> None:
        self._cleanups: set[asyncio.Task[None]] = set()

    def track_cleanup(self, task: "asyncio.Task[None]") -> None:
        """Keep a killed sandbox's cleanup alive until it is done (``finish_cleanups`` waits for it)."""
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def finish_cleanups(self) -> None:
        """Wait until every killed sandbox of this event loop has released its cgroup and descriptors."""
        loop = asyncio.get_running_loop()
        pending = [t for t in self._cleanups if t.get_loop() is loop]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    def close(self) -> None:
        """Stop what this backend runs besides its sandboxes (the process tier's zygotes). Live sandboxes
        do not depend on it."""

    @classmethod
    def network_problem(cls, policy: Any, secrets: Any) -> Optional[str]:
        """Why this tier cannot give a sandbox this network policy and these secrets (None: it can)."""
        if cls.capabilities.network:
            return None
        tiers = " or ".join(f"isolation={name!r}" for name in _isolations_with("network"))
        return f"network= and secrets= need {tiers}: the {cls.name} tier has no network yet"

    def lean(self, template: Template) -> "Optional[Template]":
        """A cheaper variant of ``template`` for code that needs none of its preloaded modules (see _hints),
        or None where this tier has none."""
        return None

    @abc.abstractmethod
    async def start(self, template: Template, limits: Limits, env: dict[str, str], *,
                    awaited: bool = False, network: bool = False,
                    mounts: "Optional[PreparedMounts]" = None) -> BackendSandbox:
        """A new sandbox running the agent. ``awaited``: a caller is waiting for this one (not a warm
        pool filling up), so it should be ready as soon as possible rather than fully warmed.
        ``network``: it will be given a network (``netns_pid()`` then names its namespace); a tier whose
        sandboxes always have a namespace of their own ignores it. ``mounts``: granted host directories
        and volumes, opened on the host (``_storage.grants``), attached before any code runs; the caller
        releases them when the sandbox ends."""

    async def prepare(self, template: Template) -> None:
        """Make the next start of ``template`` fast (a tier that forks starts its parent now)."""

    async def sweep_orphans(self, keep: "set[str]") -> int:
        """End what this tier still runs for sandboxes outside ``keep`` (ids an owner holds a record of) that an
        owner which died mid-create left behind; how many. Tiers whose sandboxes die with their owner have none."""
        return 0

    async def adopt(self, record: Mapping[str, Any]) -> BackendSandbox:
        """The sandbox ``record`` (from ``describe()``, maybe of an earlier process) describes, taken over
        by this process: SandboxNotFound when it is gone, InvalidRequest when this tier cannot."""
        raise InvalidRequest(f"the {self.name} tier cannot take a sandbox back: its sandboxes end with "
                             "their owner")


def _isolations_with(capability: str) -> list[str]:
    """The tiers loaded in this process that declare ``capability`` (without importing any: the
    registry loads every tier before it hands out a backend, so this is all of them by then)."""
    found, todo = [], list(Backend.__subclasses__())
    while todo:
        cls = todo.pop(0)
        todo += cls.__subclasses__()
        if getattr(cls.capabilities, capability) and getattr(cls, "name", None) not in found:
            found.append(cls.name)
    return found
