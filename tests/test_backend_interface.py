"""One contract, every backend: what the SDK, the pools and the server may ask of a tier.

Runs against every registered backend (the process tier, and gVisor where runsc is installed): the
capabilities a tier declares are the ones that work (pause works where declared and says
InvalidRequest where not), ``describe()`` is plain JSON that ``adopt()`` takes back where the tier can,
``apply_limits`` reaches the kernel's cgroup, the usage probe reads the kernel's counters, and the
registry lists both tiers and refuses an unknown one.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from sandlot import InvalidRequest, SandboxNotFound
from sandlot._backends.base import Backend, Capabilities, Counters, BackendSandbox
from sandlot._backends.registry import ISOLATIONS, backend_class, isolations_with
from sandlot._engine import default_engine
from sandlot._host import cgroups
from sandlot._limits import Limits
from sandlot._templates import get_template

from .conftest import RUNSC_MISSING, needs_sandbox

pytestmark = [needs_sandbox]

# The tiers that run on this host (the kubernetes tier's sandboxes are pods: tests/test_kube_tier.py, on an emulated cluster).
TIERS = [pytest.param(name, id=name, marks=pytest.mark.skipif(
    name == "gvisor" and RUNSC_MISSING is not None, reason=str(RUNSC_MISSING))) for name in ISOLATIONS
    if name != "kubernetes"]


def _cgroup_value(sandbox_id: str, v2: str, v1: str) -> str:
    """A file of the sandbox's cgroup, found from the host side (v2: ``v2``; v1: ``controller/file``)."""
    if (cgroups.ROOT / "cgroup.controllers").exists():
        pattern, name = f"**/sandlot/{sandbox_id}", v2
        base = cgroups.ROOT
    else:
        controller, name = v1.split("/")
        pattern, base = f"**/sandlot/{sandbox_id}", cgroups.ROOT / controller
    found = list(base.glob(pattern))
    assert found, f"no cgroup for {sandbox_id}"
    return (found[0] / name).read_text().strip()


async def _answers(proc: BackendSandbox) -> bool:
    """The agent replies on the handle's channel (a ping, as the SDK sends after a resume)."""
    import asyncio

    rid, queue = proc.channel.new_request()
    try:
        await proc.channel.send({"t": "ping", "id": rid})
        item = await asyncio.wait_for(queue.get(), 30)
    finally:
        proc.channel.forget(rid)
    return isinstance(item, tuple)


# -- the registry ----------------------------------------------------------------------------------------
def test_the_registry_lists_the_tiers_and_refuses_an_unknown_one():
    assert set(ISOLATIONS) == {"process", "gvisor", "kubernetes"}
    for name in ISOLATIONS:
        cls = backend_class(name)
        assert issubclass(cls, Backend) and cls.name == name
        assert isinstance(cls.capabilities, Capabilities)
    with pytest.raises(InvalidRequest, match="unknown isolation 'vmware'.*process.*gvisor"):
        default_engine().backend("vmware")
    with pytest.raises(InvalidRequest, match="unknown isolation"):
        backend_class("vmware")
    # What each tier says it can do, as the README describes the tiers today.
    assert isolations_with("pause") == ["gvisor"] and isolations_with("checkpoint") == ["gvisor"]
    assert isolations_with("fork") == ["process"]  # sandboxes forked from a per-template zygote
    assert isolations_with("network") == ["process", "gvisor"]  # egress by policy, both tiers
    assert isolations_with("mounts") == []  # no tier grants these yet
    assert isolations_with("outlive") == ["process", "gvisor", "kubernetes"]  # a server's sandboxes outlive it
    assert isolations_with("fork_live") == ["gvisor"]  # a copy of a live session (checkpoint and restore)
    with pytest.raises(AttributeError):
        isolations_with("teleport")


def test_capabilities_are_frozen_data():
    caps = backend_class("gvisor").capabilities
    with pytest.raises(dataclasses.FrozenInstanceError):
        caps.pause = False  # type: ignore[misc]
    assert json.loads(json.dumps(caps.to_dict())) == caps.to_dict()
    assert set(caps.to_dict()) == {"pause", "checkpoint", "fork", "network", "mounts", "outlive", "fork_live"}


# -- one live sandbox per tier ---------------------------------------------------------------------------
@pytest.fixture(params=TIERS, scope="module")
async def live(request):
    backend = default_engine().backend(request.param)
    limits = Limits.build({"memory": "256M", "cpu": 1})
    proc = await backend.start(get_template("python"), limits, {"GREETING": "hi"}, awaited=True)
    try:
        yield backend, proc
    finally:
        await proc.kill("test over")
        await proc.wait()


async def test_describe_is_plain_json_that_finds_the_sandbox_again(live):
    backend, proc = live
    record = proc.describe()
    assert json.loads(json.dumps(record)) == record
    assert record["isolation"] == backend.name and record["id"] == proc.id
    assert record["template"] == "python" and record["paused"] is False
    assert Limits.build(record["limits"]) == proc.limits


async def test_apply_limits_changes_the_cgroup(live):
    backend, proc = live
    quota = lambda: _cgroup_value(proc.id, "cpu.max", "cpu/cpu.cfs_quota_us").split()[0]  # noqa: E731
    assert quota() == "100000"
    wider = Limits.build({"cpu": 0.5, "memory": "384M"}, base=proc.limits)
    await proc.apply_limits(wider)
    assert proc.limits == wider
    assert quota() == "50000"
    if (cgroups.ROOT / "cgroup.controllers").exists():
        assert int(_cgroup_value(proc.id, "memory.max", "")) == wider.memory
    else:  # v1: the limit is split between memory and (host sockets only) the TCP buffers' share
        memory = int(_cgroup_value(proc.id, "", "memory/memory.limit_in_bytes"))
        tcp = int(_cgroup_value(proc.id, "", "memory/memory.kmem.tcp.limit_in_bytes"))
        assert memory + (tcp if backend.name == "process" else 0) == wider.memory
    assert await _answers(proc)


async def test_usage_reads_the_kernels_counters(live):
    _, proc = live
    first = proc.usage(reset_peak=True, processes=True)
    assert isinstance(first, Counters)
    assert first.memory > 0 and first.cpu_seconds > 0 and first.processes >= 1
    assert first.oom_kills == 0 and first.pids_limit_hits == 0
    await _answers(proc)
    assert proc.usage().cpu_seconds >= first.cpu_seconds
    assert proc.usage().processes is None  # counted only when asked: it lists the cgroup's tasks


async def test_pause_works_where_declared_and_says_so_where_not(live):
    backend, proc = live
    if not backend.capabilities.pause:
        with pytest.raises(InvalidRequest, match=f"the {backend.name} tier cannot pause.*isolation='gvisor'"):
            await proc.pause()
        with pytest.raises(InvalidRequest, match=f"the {backend.name} tier cannot pause"):
            await proc.resume()
        assert proc.paused is False and await _answers(proc)
        return
    figures = await proc.pause()
    assert proc.paused and proc.describe()["paused"] is True and figures["bytes"] > 0
    await proc.resume()
    assert not proc.paused and await _answers(proc)


async def test_adopt_takes_back_what_the_tier_can(live):
    backend, proc = live
    with pytest.raises(InvalidRequest, match="not a sandbox id"):
        await backend.adopt({"isolation": backend.name, "id": "../../etc"})
    if not backend.capabilities.checkpoint:
        # A live process-tier sandbox is taken back only once its owner is gone (a durable one outlives it:
        # test_durable.py); while its owner holds it, it offers no channel to anyone else.
        with pytest.raises(SandboxNotFound, match="did not offer a channel"):
            await backend.adopt(json.loads(json.dumps(proc.describe())))
        assert await _answers(proc)
        return
    # A live sandbox is taken over: its keeper hands the channel to the newest owner (the earlier one's closes).
    owner = await backend.adopt(json.loads(json.dumps(proc.describe())))
    assert owner.id == proc.id and not owner.paused and owner.limits == proc.limits and await _answers(owner)
    assert not proc.channel.is_open or not await _answers(proc)
    await owner.pause()
    adopted = await backend.adopt(json.loads(json.dumps(owner.describe())))
    assert adopted.id == proc.id and adopted.paused and adopted.limits == proc.limits
    assert adopted.describe() == owner.describe()
    await adopted.resume()
    try:
        assert await _answers(adopted)
    finally:
        await adopted.kill("test over")
        await adopted.wait()
        await backend.finish_cleanups()
    with pytest.raises(SandboxNotFound):  # gone
        await backend.adopt(owner.describe())


# -- the SDK asks the declared capabilities ---------------------------------------------------------------
async def test_the_sdk_refuses_what_a_tier_does_not_declare():
    from sandlot import AsyncSandbox

    with pytest.raises(InvalidRequest, match="'pause' with isolation='gvisor'"):
        AsyncSandbox(isolation="process", on_idle="pause")
    async with AsyncSandbox(isolation="process", api_url="") as sb:
        with pytest.raises(InvalidRequest, match="pause\\(\\) needs isolation='gvisor': the process tier cannot"):
            await sb.pause()
        assert not sb.is_paused
        assert (await sb.resume()).seconds == 0.0  # a running sandbox: nothing to resume
        assert (await sb.metrics()).processes >= 1
        # Its sandboxes end with their owner: nothing on this host to take back (no server asked).
        with pytest.raises(InvalidRequest, match="the process tier cannot take a sandbox back"):
            await AsyncSandbox.connect(sb.sandbox_id, isolation="process", api_url="")
        assert (await sb.run_code("6 * 7")).text == "42"
