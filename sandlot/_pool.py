"""Warm pools: sandboxes fully isolated and waiting, so that creating one is taking one.

A pool serves sandboxes of one template with the template's default limits (a sandbox asking for
other limits is forked directly: its disk size and rlimits are fixed at boot). A pooled sandbox is
handed out once and never reused; the owner's environment reaches it in the first message. Refills
run in the background and never delay a claim: their boots have a low CPU weight until claimed, so a
claimed sandbox's code comes first; an empty pool means a direct fork from the zygote.

A pool is sized to its bursts: claims that found it empty within ``BURST_WINDOW`` seconds (after the
first) grow it by as many (at most to ``max_ready``) for ``BURST_MEMORY`` seconds, then it shrinks back to ``min_ready``.
A batch of runs that arrives again (an agent's test suite, an evaluation) then finds its sandboxes
booted; a pool that keeps up with its claims never grows.

Configure with ``sandlot.configure_pool("python", min_ready=4, max_ready=16)`` or the environment
variables ``SANDLOT_POOL_MIN`` / ``SANDLOT_POOL_MAX`` (0 turns pooling off). The pools belong to an
Engine (_engine.py), which owns everything local sandboxes share.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
import time
from typing import Callable, Optional

from . import _config
from ._backends.base import Backend, BackendSandbox
from ._exceptions import InvalidRequest
from ._limits import Limits
from ._templates import Template


@dataclasses.dataclass
class PoolConfig:
    min_ready: int
    max_ready: int

    @classmethod
    def from_environment(cls) -> "PoolConfig":
        return cls(_config.pool_min(), _config.pool_max())


BURST_WINDOW = 10.0  # claims this close together are one burst
BURST_MEMORY = 300.0  # how long a pool stays sized for its last burst


class WarmPool:
    def __init__(self, backend: Backend, template: Template, limits: Limits, config: PoolConfig) -> None:
        self.backend = backend
        self.template = template
        self.limits = limits
        self.config = config
        self.ready: list[BackendSandbox] = []
        self._refilling: Optional[asyncio.Task] = None
        self._shrink: Optional[asyncio.TimerHandle] = None
        self._misses: collections.deque[float] = collections.deque()  # claims that found it empty, last window
        self.burst = 0  # the most such claims within one window, lately
        self._burst_at = 0.0
        self.failures = 0
        self.closed = False

    # What the engine's pools may hold beyond their min_ready together (set by Pools): a tenant's bursts of
    # one-shot runs cannot make a server keep more idle sandboxes than this over all its pools.
    room_for_bursts: "Callable[[WarmPool], int]" = staticmethod(lambda pool: 1 << 30)

    def target(self) -> int:
        """How many ready sandboxes this pool keeps now: ``min_ready``, plus its last burst while it is recent
        (within the room its engine's other pools leave)."""
        burst = self.burst if time.monotonic() - self._burst_at < BURST_MEMORY else 0
        burst = min(burst, self.room_for_bursts(self))
        return min(self.config.max_ready, self.config.min_ready + burst)

    def _count_miss(self) -> None:
        now = time.monotonic()
        self._misses.append(now)
        while self._misses[0] < now - BURST_WINDOW:
            self._misses.popleft()
        # The first miss of a window is not a burst (a pool not filled yet, a lone claim after a quiet spell):
        # only the ones after it grow the pool.
        burst = len(self._misses) - 1
        if burst >= self.burst or now - self._burst_at >= BURST_MEMORY:
            self.burst, self._burst_at = burst, now

    def take(self) -> Optional[BackendSandbox]:
        """A ready sandbox, or None. Never waits."""
        while self.ready:
            sandbox = self.ready.pop()
            # The channel is the agent's lifeline: open means pid 1 answers. (``returncode`` is not a
            # liveness test here: a sandbox forked through an outer process reports that process's exit.)
            if sandbox.channel.is_open:
                self.refill()
                return sandbox
            # Dead or not, never drop a sandbox without killing it: its cgroup, descriptors and any
            # process left would otherwise outlive it for as long as this process runs.
            asyncio.get_running_loop().create_task(sandbox.kill("found dead in the warm pool"))
        self._count_miss()
        self.refill()
        return None

    def refill(self) -> None:
        if self.closed:
            return
        if self._refilling is None or self._refilling.done():
            self._refilling = asyncio.get_running_loop().create_task(self._refill())

    async def _refill(self) -> None:
        # Boots overlap (one per core): most of a boot is the new sandbox's own setup, not our work.
        width = max(1, min(os.cpu_count() or 1, 4))
        while True:
            missing = self.target() - len(self.ready)
            if missing <= 0:
                await self._trim()
                return
            results = await asyncio.gather(*(self._boot_one() for _ in range(min(missing, width))),
                                           return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    # A failing host shows up on the direct path, with its reason; do not spin here.
                    self.failures += 1
                else:
                    self.failures = 0
            if self.failures > 3:
                return
            if self.failures:
                await asyncio.sleep(0.5)

    async def _trim(self) -> None:
        """Past a burst's memory, the sandboxes kept for it go (oldest first); while it lasts, look again at its end."""
        extra = len(self.ready) - self.target()
        if extra > 0:
            gone, self.ready = self.ready[:extra], self.ready[extra:]
            # Shielded: out of the pool, nothing else would ever kill them, and the pool closing cancels us.
            kills = asyncio.gather(*(s.kill("the warm pool shrank") for s in gone), return_exceptions=True)
            await asyncio.shield(kills)
        if self.target() > self.config.min_ready and len(self.ready) > self.config.min_ready:
            if self._shrink is not None:
                self._shrink.cancel()
            delay = self._burst_at + BURST_MEMORY - time.monotonic() + 1.0
            self._shrink = asyncio.get_running_loop().call_later(max(delay, 1.0), self.refill)

    async def _boot_one(self) -> None:
        # Each boot files its sandbox itself, so that a refill cancelled half-way (the pool closing)
        # loses none that had finished: they are in ``ready``, or killed if the pool closed meanwhile.
        sandbox = await self.backend.start(self.template, self.limits, {})
        if self.closed:
            await sandbox.kill("pool closed")
        else:
            self.ready.append(sandbox)

    async def close(self) -> None:
        self.closed = True
        if self._shrink is not None:
            self._shrink.cancel()
        if self._refilling is not None:
            self._refilling.cancel()
            await asyncio.gather(self._refilling, return_exceptions=True)
        sandboxes, self.ready = self.ready, []
        await asyncio.gather(*(s.kill("pool closed") for s in sandboxes), return_exceptions=True)


# Fixed when a sandbox boots (tmpfs size, rlimits): a pooled sandbox serves only owners who agree.
# cpu and memory are cgroup settings, applied again when a sandbox is claimed.
BOOT_LIMITS = ("disk", "inodes", "open_files", "pids")


def poolable(limits: Limits, default: Optional[Limits] = None) -> bool:
    default = default or Limits()
    # (A claim with other memory resizes the warm sandbox's storage to Limits.storage: apply_limits.)
    return all(getattr(limits, name) == getattr(default, name) for name in BOOT_LIMITS)


class Pools:
    """The warm pools of one engine: one per (event loop, tier, template), and their sizes."""

    def __init__(self) -> None:
        self._pools: dict[tuple, WarmPool] = {}
        self._configured: dict[str, PoolConfig] = {}
        self._closing: set = set()

    def configure(self, template: str, *, min_ready: int, max_ready: Optional[int] = None) -> None:
        """Keep ``min_ready`` sandboxes of ``template`` waiting (at most ``max_ready``)."""
        max_ready = max(min_ready, max_ready if max_ready is not None else _config.pool_max())
        if not 0 <= min_ready <= max_ready <= 4096:
            raise InvalidRequest("need 0 <= min_ready <= max_ready <= 4096")
        self._configured[template] = PoolConfig(min_ready, max_ready)
        for pool in list(self._pools.values()):  # running pools adopt it at their next refill
            if pool.template.name == template:  # its lean variant's pool too
                pool.config = self._configured[template]

    def forget_configuration(self, template: str) -> None:
        """Back to the environment's and the template's own sizes."""
        self._configured.pop(template, None)

    def config_for(self, template: str, pool_size: Optional[int] = None) -> PoolConfig:
        """configure() first, then SANDLOT_POOL_MIN, then the template's own pool size (sandbox.yaml)."""
        if template in self._configured:
            return self._configured[template]
        default = PoolConfig.from_environment()
        if pool_size is not None and not _config.is_set("SANDLOT_POOL_MIN"):
            return PoolConfig(min_ready=pool_size, max_ready=max(pool_size, default.max_ready))
        return default

    def pool_for(self, backend: Backend, template: Template, limits: Limits) -> Optional[WarmPool]:
        """The pool of this event loop for (template, limits), or None when pooling does not apply."""
        # An image template's pool boots with the template's default limits (sandbox.yaml `limits:`).
        base = Limits.build(template.default_limits()) if template.limits else Limits()
        config = self.config_for(template.name, template.pool_size)
        if config.min_ready <= 0 or not backend.pooled or not poolable(limits, base):
            return None
        loop = asyncio.get_running_loop()
        key = (id(loop), backend.name, template.key)
        pool = self._pools.get(key)
        if pool is not None and pool.template != template:
            # The template was rebuilt or pulled again under the same name: a new pool for the new root.
            self._pools.pop(key)
            task = loop.create_task(pool.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
            pool = None
        if pool is None:
            pool = self._pools[key] = WarmPool(backend, template, base, config)
            pool.room_for_bursts = self._room_for_bursts
        return pool

    def _room_for_bursts(self, pool: WarmPool) -> int:
        """SANDLOT_POOL_MAX, less what the other pools hold beyond their min_ready now."""
        others = sum(max(0, len(p.ready) - p.config.min_ready) for p in list(self._pools.values()) if p is not pool)
        return max(0, _config.pool_max() - others)

    def ready(self, *, loop: Optional[asyncio.AbstractEventLoop] = None, isolation: Optional[str] = None,
              template: Optional[str] = None) -> list[BackendSandbox]:
        """The sandboxes waiting in this engine's pools (of one event loop, isolation or template if given)."""
        return [sandbox for (loop_id, name, _), pool in list(self._pools.items())
                if (loop is None or loop_id == id(loop)) and isolation in (None, name)
                and template in (None, pool.template.name)
                for sandbox in list(pool.ready)]

    def stats(self) -> dict[str, int]:
        """Ready sandboxes per template, over every pool (for metrics)."""
        counts: dict[str, int] = {}
        for pool in list(self._pools.values()):  # a template's lean variant counts as the template
            counts[pool.template.name] = counts.get(pool.template.name, 0) + len(pool.ready)
        return counts

    async def close(self) -> None:
        """Kill every waiting sandbox of this event loop's pools."""
        loop_id = id(asyncio.get_running_loop())
        for key in [k for k in self._pools if k[0] == loop_id]:
            await self._pools.pop(key).close()
