"""Warm pools sized to bursts, and refills that never compete with a claimed sandbox's code (issue 11).

Process tier, through the engine the SDK uses: a pool whose claims outrun it grows by the claims that found it
empty, keeps that size while the burst is recent and shrinks back after; its boots run at a low CPU weight in
the kernel until a claim gives the sandbox the normal one."""

from __future__ import annotations

import asyncio
import contextlib
import time


from sandlot import _pool
from sandlot._engine import Engine
from sandlot._limits import Limits
from sandlot._spec import SandboxSpec
from sandlot._templates import get_template

from .conftest import needs_sandbox

pytestmark = needs_sandbox


def cpu_weight(proc) -> int:
    cg = proc.cgroup
    name = "cpu.shares" if cg.version == 1 else "cpu.weight"
    return int((cg.dirs["cpu" if cg.version == 1 else ""] / name).read_text())


async def until(predicate, within: float = 90.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def engine_with_pool(min_ready: int, max_ready: int, *, lean: bool):
    """A fresh engine and its pool of the builtin template (or of its lean variant); everything ended after."""
    engine = Engine()
    engine.pools.configure("python", min_ready=min_ready, max_ready=max_ready)
    template = get_template("python")
    pool = engine.pools.pool_for(engine.backend("process"), template.lean() if lean else template, Limits())
    try:
        yield engine, pool
    finally:
        await engine.shutdown()
        engine.close()


def test_a_burst_grows_the_pool_and_it_shrinks_back_after(monkeypatch):
    monkeypatch.setattr(_pool, "BURST_MEMORY", 12.0)

    async def main() -> None:
        async with engine_with_pool(1, 5, lean=True) as (engine, pool):
            spec = SandboxSpec.build("python")
            # Eight one-shot runs at once find the pool empty (it has not filled yet): each counts as a miss.
            sandboxes = await asyncio.gather(*(engine.create(spec, code="1") for _ in range(8)))
            assert pool.burst >= 5
            assert pool.target() == 5  # min_ready plus the burst, capped by max_ready
            await until(lambda: len(pool.ready) == 5)
            for sb in sandboxes:
                assert (await sb.run_code("1 + 1")).text == "2"
                await sb.kill()
            # Past the burst's memory the pool goes back to min_ready, its extra sandboxes killed.
            extra = list(pool.ready)[:4]
            await until(lambda: len(pool.ready) == 1, within=60)
            for proc in extra:
                await until(lambda: proc.returncode is not None, within=10)

    asyncio.run(main())


def test_a_pool_that_keeps_up_never_grows():
    async def main() -> None:
        async with engine_with_pool(2, 8, lean=True) as (engine, pool):
            pool.refill()
            for _ in range(4):  # one at a time, each after the pool has refilled
                await until(lambda: len(pool.ready) == 2)
                sb = await engine.create(SandboxSpec.build("python"), code="1")
                await sb.kill()
            assert pool.burst == 0 and pool.target() == 2

    asyncio.run(main())


def test_warm_sandboxes_boot_at_a_low_cpu_weight_and_a_claim_gives_the_normal_one():
    async def main() -> None:
        async with engine_with_pool(2, 64, lean=False) as (engine, pool):
            pool.refill()
            await until(lambda: len(pool.ready) == 2)
            waiting = list(pool.ready)
            normal, low = {1: (1024, 64), 2: (100, 6)}[waiting[0].cgroup.version]
            assert [cpu_weight(p) for p in waiting] == [low, low]
            sb = await engine.create(SandboxSpec.build("python"))  # claims one of them
            claimed = sb.backend_sandbox
            assert claimed in waiting and cpu_weight(claimed) == normal
            # Owner limits other than the pool's take the same path: the weight is normal too.
            other = await engine.create(SandboxSpec.build("python", limits={"cpu": 0.5}))
            assert cpu_weight(other.backend_sandbox) == normal
            # A sandbox someone waits for (no warm one fits these boot limits) boots at the normal weight.
            direct = await engine.create(SandboxSpec.build("python", limits={"open_files": 1000}))
            assert cpu_weight(direct.backend_sandbox) == normal
            for s in (sb, other, direct):
                assert (await s.run_code("sum(range(10))")).text == "45"
                await s.kill()

    asyncio.run(main())


def test_a_pool_closed_while_it_shrinks_still_kills_the_sandboxes_it_let_go(monkeypatch):
    monkeypatch.setattr(_pool, "BURST_MEMORY", 8.0)

    async def main() -> None:
        engine = Engine()
        engine.pools.configure("python", min_ready=1, max_ready=3)
        backend = engine.backend("process")
        pool = engine.pools.pool_for(backend, get_template("python").lean(), Limits())
        try:
            sandboxes = await asyncio.gather(*(engine.create(SandboxSpec.build("python"), code="1") for _ in range(4)))
            for sb in sandboxes:
                await sb.kill()
            await until(lambda: len(pool.ready) == 3)
            # Past the burst's memory (before the pool's own shrink timer fires), a refill trims the two extra
            # sandboxes, and the pool closes at that very moment (the engine shutting down, a template rebuilt).
            await asyncio.sleep(max(0.0, pool._burst_at + _pool.BURST_MEMORY - time.monotonic()) + 0.1)
            let_go = list(pool.ready)[:2]
            pool.refill()
            await asyncio.sleep(0)  # the refill runs: it takes them out of the pool and starts killing them
            await pool.close()
            for proc in let_go:  # neither in the pool nor running: nobody else would ever kill them
                await until(lambda: proc.returncode is not None, within=10)
        finally:
            await engine.shutdown()
            engine.close()

    asyncio.run(main())
