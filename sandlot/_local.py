"""LocalSandbox: a sandbox of this process, reached over its agent's channel (the local transport's handle).

Every limit is enforced by the kernel (cgroups, rlimits, tmpfs caps) or by this host-side code
(wall timeouts, output caps); nothing here inspects the user's code. An Engine (_engine.py) makes these;
``AsyncSandbox`` and the server's registry use them. Arguments arrive validated (the facade's
_calls.py, or the server's schemas).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, Optional, Protocol, Union

from ._backends.base import Backend, Counters, BackendSandbox
from ._backends.registry import isolations_with
from ._exceptions import (FileError, InvalidRequest, QuotaExceeded, SandboxCrashed, SandboxNotFound,
                          SandlotError)
from ._host.channel import CLOSED
from ._limits import Limits
from ._output import CallOutput, OutputHandler, call as _call
from ._net.policy import NetworkPolicy
from ._net.ports import PortForwarder, proxy_request
from ._net.sandbox_network import SandboxNetwork
from ._spec import SandboxSpec
from ._models import (CommandResult, EntryInfo, Execution, ExecutionError, PauseInfo, Result, SandboxMetrics, Usage)
from ._transport import AsyncCommandHandle, CommandInfo, CommandsHandle, FilesHandle, ResultHandler, SandboxHandle
from ._agent import protocol
from ._calls import chunks as _chunks

INTERRUPT_GRACE = 2.0  # seconds code gets to honour KeyboardInterrupt before its sandbox is killed


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


_human = human_size


def _isolations_that(capability: str) -> str:
    """``isolation='gvisor'``: the tiers that declare ``capability``, as an owner would ask for them."""
    return " or ".join(f"isolation={name!r}" for name in isolations_with(capability))


class Hibernation(Protocol):
    """What the owner of a sandbox (a server: its quotas and its records) says about its pauses and wakes.
    Without one (the local SDK), a sandbox pauses and wakes freely."""

    def check_pause(self, checkpoint_bytes: int) -> None:
        """Raise QuotaExceeded to refuse a checkpoint of this size (it is then undone, or for an idle
        pause the sandbox ends)."""

    def paused(self, info: PauseInfo, idle: bool) -> None:
        """It is on disk now (``idle``: by its idle timeout, not by a call)."""

    async def wake(self, restore: Callable[[], Awaitable[PauseInfo]], explicit: bool) -> PauseInfo:
        """Bring it back with ``restore()`` (or raise QuotaExceeded first); ``explicit``: by resume(),
        not by a call that found it paused."""


class LocalSandbox(SandboxHandle):
    """A live local sandbox: a stateful Python session, shell commands and files."""

    dies_with_owner = True

    def __init__(self, spec: SandboxSpec, backend: Backend, proc: BackendSandbox,
                 network: Optional[SandboxNetwork] = None) -> None:
        self.spec = spec
        self.network = network  # None: no network at all
        self.template = proc.template
        self.isolation = backend.name
        self.limits = spec.limits
        self.env = dict(spec.env)
        self.metadata = dict(spec.metadata)
        self.on_idle = spec.on_idle
        self._backend = backend
        self._proc = proc
        self.sandbox_id = proc.id
        # False: it ends with this process even on a tier and engine that could keep it (a server's one-shot
        # run: on no record, nothing would take it back, count it or end it before its lifetime).
        self.outlives = True
        self._exec_lock = asyncio.Lock()
        # Held while the sandbox goes to disk or comes back: a call that finds it paused waits here, so two
        # calls at once wake it once, and no call wakes it halfway through its checkpoint.
        self._state_lock = asyncio.Lock()
        self.hooks: Optional[Hibernation] = None  # the owner's say in pauses and wakes (a server's quotas)
        self.checkpoint_bytes = 0  # the size of its checkpoint on disk while paused
        self._dead: Optional[str] = None
        self._dead_limit: Optional[str] = None
        self._started_at = self._last_activity = time.monotonic()
        self._deadline = self._started_at + self.limits.lifetime
        # A new deadline (set_timeout, one taken back from disk) or a wake: the watchdog looks again at once.
        self._look_again = asyncio.Event()
        # Runs while it is paused too: a paused sandbox still ends at its lifetime (and its checkpoint with it).
        self._watchdog: Optional[asyncio.Task] = asyncio.get_running_loop().create_task(self._watch())
        self._forwarders: dict[int, PortForwarder] = {}  # get_url's listeners, by the sandbox's port
        self.commands = LocalCommands(self)
        self.files = LocalFiles(self)

    @property
    def durable(self) -> bool:
        """It outlives this process until its lifetime ends, for a later one to take back (a server's
        sandboxes, on a tier that can, without mounts or secrets: this process holds its grants and its
        secrets' CA key; a network policy is served again by the next process)."""
        # (A tier that makes a network namespace at boot for its sandbox, gVisor's, holds it in this process.)
        return (self.outlives and self._backend.durable and self._backend.capabilities.outlive
                and not self.spec.mounts
                and (self.network is None or not (self.network.secrets or self._backend.network_at_boot)))

    async def lease(self) -> None:
        """Tell the sandbox (its agent; on gVisor its keeper) until when it may outlive its owner: its deadline."""
        if self.durable and not self._proc.paused and self._proc.channel.is_open:
            until = time.time() + max(0.0, self._deadline - time.monotonic())
            await self._proc.channel.send({"t": "lease", "id": 0, "until": until})
            await self._proc.leased(until)

    def current_spec(self) -> SandboxSpec:
        """Its spec as it stands now: the network rules in force (``update_network`` changes them)."""
        if self.network is None or self.network.asked is None:
            return self.spec
        return dataclasses.replace(self.spec, network=self.network.asked)

    @property
    def backend_sandbox(self) -> BackendSandbox:
        """The backend's handle (its pid, cgroup and counters): for the engine, the server and tests."""
        return self._proc

    async def pause(self) -> PauseInfo:
        """Checkpoint the live session to disk and free its memory (gVisor tier). The next call of any kind
        (or ``resume()``) restores it with its variables, open files and working directory; so does
        ``connect(id)`` from a later process. Pausing a paused sandbox changes nothing."""
        async with self._exec_lock:
            return await self._hibernate(idle=False)

    async def _hibernate(self, idle: bool) -> PauseInfo:
        """The checkpoint itself (the caller holds the exec lock: no code of the owner's is running)."""
        async with self._state_lock:
            if self._dead is None and self._proc.paused:
                return PauseInfo(seconds=0.0, checkpoint_bytes=self.checkpoint_bytes)
            proc = self._alive()
            if not self._backend.capabilities.pause:
                raise InvalidRequest(f"pause() needs {_isolations_that('pause')}: the {self.isolation} tier cannot checkpoint")
            if self.network is not None:
                raise InvalidRequest("a sandbox with a network cannot be paused: its host sockets and its broker "
                                     "do not survive a checkpoint")
            if self.spec.mounts:
                raise InvalidRequest("a sandbox with mounts cannot be paused: its host directories and volumes "
                                     "are held for it only while it runs")
            # Kept beside the checkpoint, so a later owner (connect(id), a restarted server) honours them.
            proc.hibernation = {"expires_at": self.expires_at, "on_idle": self.on_idle}
            try:
                figures = await proc.pause()
            except SandlotError:
                if self._dead is not None:  # it ended meanwhile (its lifetime): say that instead
                    self._alive()
                raise
            info = PauseInfo(seconds=figures["seconds"], checkpoint_bytes=int(figures["bytes"]))
            self.checkpoint_bytes = info.checkpoint_bytes
            if self.hooks is not None:
                try:
                    self.hooks.check_pause(info.checkpoint_bytes)
                except QuotaExceeded:
                    if not idle:  # refused: it runs on as it was (an idle one is killed by the caller)
                        await self._restore()
                    raise
                self.hooks.paused(info, idle)
            return info

    async def resume(self) -> PauseInfo:
        """Bring a paused sandbox back (a no-op for a running one). Any other call does it too."""
        async with self._state_lock:
            if not self._proc.paused or self._dead is not None:
                self._alive()
                return PauseInfo(seconds=0.0, checkpoint_bytes=0)
            return await self._wake(explicit=True)

    async def _wake(self, explicit: bool = False) -> PauseInfo:
        """Restore it from its checkpoint (the state lock held), through the owner's hooks if any."""
        if self.hooks is not None:
            return await self.hooks.wake(self._restore, explicit)
        return await self._restore()

    async def _restore(self) -> PauseInfo:
        figures = await self._proc.resume()
        self.checkpoint_bytes = 0
        # The idle timeout starts over; the lifetime does not: it kept counting while the sandbox slept.
        self._last_activity = time.monotonic()
        self._look_again.set()  # it slept until the deadline: the idle timeout counts again
        await self.lease()  # restored: whatever holds its channel now is told its deadline again
        return PauseInfo(seconds=figures["seconds"], checkpoint_bytes=0)

    async def _awake(self) -> BackendSandbox:
        """The live backend handle for a call, waking a paused sandbox first (once, whoever asks at once)."""
        if self._proc.paused and self._dead is None:
            async with self._state_lock:
                if self._proc.paused and self._dead is None:
                    try:
                        await self._wake()
                    except SandlotError:
                        if self._dead is not None:  # it ended meanwhile (its lifetime): say that instead
                            self._alive()
                        raise
        return self._alive()

    @property
    def expires_at(self) -> float:
        """When its lifetime ends (wall clock, seconds since the epoch), paused or not."""
        return time.time() + (self._deadline - time.monotonic())

    def expire_at(self, when: float) -> None:
        """End it at ``when`` (wall clock): a sandbox taken back from disk keeps its first deadline."""
        self._deadline = time.monotonic() + (when - time.time())
        self._look_again.set()

    async def fork(self) -> "LocalSandbox":
        """A new sandbox with a copy of this session as it is now (variables, files in /home/user and /tmp,
        the working directory), independent from then on, its random state reseeded (gVisor tier: this one
        is checkpointed and restored twice, so it stops for that long). A paused one is forked from its
        checkpoint and stays paused. The copy has this one's limits, environment and metadata, and a
        lifetime of its own from now."""
        async with self._exec_lock:
            proc = self._proc
            if self._dead is not None:
                raise SandboxNotFound(f"sandbox {proc.id} is gone: {self._dead}")
            if not proc.paused:
                self._alive()
            if not self._backend.capabilities.fork_live:
                raise InvalidRequest(f"the {self.isolation} tier cannot fork a live session: use "
                                     f"{_isolations_that('fork_live')}")
            if self.network is not None:
                raise InvalidRequest("a sandbox with a network cannot be forked: its host sockets and its broker "
                                     "do not survive a checkpoint")
            if self.spec.mounts:
                raise InvalidRequest("a sandbox with mounts cannot be forked: its host directories and volumes "
                                     "are granted to it alone")
            running = [h.pid for h in self.commands._background.values() if h.running]
            if running and not proc.paused:
                # A fork stops this sandbox and restores it on a new channel: the streams of its background
                # commands (whose handles read the old channel) would end as if the sandbox had died.
                raise InvalidRequest(f"sandbox {proc.id} has background commands running (pids {running}): a fork "
                                     "checkpoints and restores it, which would cut their output streams; wait for "
                                     "them or kill them first")
            async with self._state_lock:  # it is stopped and restored meanwhile: no call may wake it halfway
                child = await proc.fork_live()
        copy = LocalSandbox(self.spec, self._backend, child)
        await copy.lease()
        if not proc.paused:
            await self.lease()  # restored: whatever holds its channel now is told its deadline again
        return copy

    async def interrupt(self) -> None:
        """Send KeyboardInterrupt to the code running now (like Ctrl-C in a notebook). Its run_code
        call then returns with that error; the session keeps its variables."""
        if self._proc.paused and self._dead is None:
            return  # nothing runs in a paused sandbox: no reason to wake it
        proc = self._alive()
        await proc.channel.send({"t": "interrupt", "id": 0})

    @property
    def is_running(self) -> bool:
        return self._dead is None and self._proc.channel.is_open

    @property
    def is_paused(self) -> bool:
        """Checkpointed to disk (gVisor tier) by ``pause()`` or its idle timeout; the next call wakes it."""
        return self._dead is None and self._proc.paused

    @property
    def moved_away(self) -> bool:
        """Another owner (a server replica) took this sandbox over: it runs on, no longer this process's."""
        return self._dead is None and self._proc.channel.moved

    @property
    def end_reason(self) -> Optional[str]:
        """Why the sandbox ended (None while it runs)."""
        if self._dead is None and not self._proc.channel.is_open and not self._proc.paused:
            return f"its agent went away ({self._proc.channel.closed_reason})"
        return self._dead

    @property
    def end_limit(self) -> Optional[str]:
        """The limit that ended the sandbox, if one did ("lifetime", "idle_timeout", "memory", "timeout"...)."""
        if self._dead is None and not self._proc.channel.is_open and not self._proc.paused:
            return "protocol"
        return self._dead_limit

    async def kill(self) -> None:
        """End the sandbox and everything in it. Safe to call twice."""
        await self._die("killed by its owner")

    async def expire(self, reason: str) -> None:
        """End it for its lifetime (a sandbox taken back from disk past its deadline)."""
        await self._die(reason, "lifetime")

    async def _die(self, reason: str, limit: Optional[str] = None) -> None:
        if self._dead is None:
            self._dead, self._dead_limit = reason, limit
        if self._watchdog is not None and self._watchdog is not asyncio.current_task():
            self._watchdog.cancel()
        await self._proc.kill(reason)
        if self.spec.mounts:
            # Its volumes are free again when kill() returns: the next sandbox may mount one writable at once.
            await self._proc.grants_released()
        if self.network is not None:
            await self.network.close()
        forwarders, self._forwarders = list(self._forwarders.values()), {}
        for forwarder in forwarders:
            await forwarder.close()

    async def metrics(self) -> SandboxMetrics:
        """Memory, CPU and process count of the sandbox right now, from its cgroup."""
        proc = await self._awake()
        await proc.refresh_usage()
        now = await asyncio.to_thread(proc.usage, processes=True)
        net = self.network.stats() if self.network is not None else {}
        return SandboxMetrics(memory=now.memory, memory_peak=now.memory_peak, cpu_seconds=now.cpu_seconds,
                              processes=now.processes or 0, network_bytes_out=net.get("bytes_out", 0),
                              network_bytes_in=net.get("bytes_in", 0), network_connections=net.get("connections", 0),
                              network_allowed=net.get("allowed", 0), network_denied=net.get("denied", 0),
                              network_open=net.get("open", 0))

    async def set_timeout(self, seconds: float) -> None:
        """Let the sandbox live ``seconds`` from now (capped by 14 days), like E2B's set_timeout."""
        Limits.build({"lifetime": seconds})
        await self._awake()
        self._deadline = time.monotonic() + seconds
        await self.lease()
        self._look_again.set()

    async def keep_alive(self) -> None:
        """Count as activity now: the idle timeout starts over."""
        await self._awake()

    # -- network ---------------------------------------------------------------------------------
    async def update_network(self, allow: Optional[list], deny: Optional[list]) -> Any:
        """New rules, live (connections they no longer allow are cut). A sandbox made without a network
        gets one now: its namespace is configured and served from this call on."""
        proc = await self._awake()
        if self.network is None:
            if self._backend.network_by_cluster:
                raise InvalidRequest(f"the {self.isolation} tier's network is the cluster's, fixed at create (a "
                                     "NetworkPolicy of its pod): make a sandbox with the network= it needs")
            if not self._backend.capabilities.network:
                raise InvalidRequest(f"the {self.isolation} tier has no network yet: use "
                                     f"{_isolations_that('network')}")
            network = SandboxNetwork(NetworkPolicy.build({"allow": allow or [], "deny": deny or []}))
            await network.attach(proc.netns_pid())
            self.network = network
            return network.policy_json()
        return self.network.update(allow, deny)

    async def get_url(self, port: int) -> str:
        """An http://127.0.0.1:P/ URL of this host that reaches ``port`` inside the sandbox (any TCP:
        HTTP, WebSocket...), open while the sandbox lives."""
        proc = await self._awake()
        forwarder = self._forwarders.get(port)
        if forwarder is None:
            proc.check_ports()
            forwarder = PortForwarder(functools.partial(proc.open_port, port), port)
            await forwarder.start()
            self._forwarders[port] = forwarder
        return forwarder.url

    async def proxy(self, port: int, method: str, target: str, headers: list, body: Any) -> tuple:
        """One HTTP request to the sandbox's server on ``port`` (the server's /ports/ route)."""
        proc = await self._awake()
        return await proxy_request(functools.partial(proc.open_port, port), port, method, target, headers, body)

    async def network_log(self, since: Optional[float] = None) -> "list[dict]":
        await self._awake()
        return self.network.log(since) if self.network is not None else []

    async def _watch(self) -> None:
        """End the sandbox at its lifetime (paused or not); after idle_timeout without a call, pause it
        (on_idle="pause") or end it."""
        while self._dead is None:
            now = time.monotonic()
            idle_end = self._last_activity + self.limits.idle_timeout
            if now >= self._deadline:
                paused = " while paused" if self._proc.paused else ""
                await self._die(f"its lifetime ended{paused} ({self.limits.lifetime:.0f} s)", "lifetime")
                return
            busy = self._exec_lock.locked() or self._state_lock.locked()
            if now >= idle_end and not busy and not self._proc.paused:
                if self.on_idle == "pause" and self._backend.capabilities.pause:
                    await self._idle_pause()
                    continue
                await self._die(f"it was idle for {self.limits.idle_timeout:.0f} s", "idle_timeout")
                return
            wake_at = self._deadline if self._proc.paused else min(self._deadline, idle_end)
            try:
                await asyncio.wait_for(self._look_again.wait(), max(0.05, wake_at - now))
            except asyncio.TimeoutError:
                pass
            self._look_again.clear()

    async def _idle_pause(self) -> None:
        """Hibernate after the idle timeout; a checkpoint the owner refuses (a quota of paused bytes) or
        that fails ends the sandbox instead, saying why."""
        idle = f"it was idle for {self.limits.idle_timeout:.0f} s"
        async with self._exec_lock:
            if self._dead is not None or time.monotonic() < self._last_activity + self.limits.idle_timeout:
                return  # a call came in meanwhile
            try:
                await self._hibernate(idle=True)
            except QuotaExceeded as exc:
                await self._die(f"{idle} and could not be paused: {exc}", "idle_timeout")
            except SandlotError as exc:
                await self._die(f"{idle} and its checkpoint failed: {exc}", "idle_timeout")

    def _alive(self) -> BackendSandbox:
        if self._dead is not None:
            if self._dead_limit in ("memory", "pids", "protocol"):
                raise SandboxCrashed(f"sandbox {self._proc.id} is dead: {self._dead}", limit=self._dead_limit)
            raise SandboxNotFound(f"sandbox {self._proc.id} is gone: {self._dead}")
        if self._proc.paused:
            raise InvalidRequest(f"sandbox {self._proc.id} is paused: call resume() first")
        if not self._proc.channel.is_open:
            raise SandboxCrashed(f"sandbox {self._proc.id} lost its agent: {self._proc.channel.closed_reason}",
                                 limit="protocol")
        self._last_activity = time.monotonic()
        return self._proc

    # -- code --------------------------------------------------------------------------------
    async def run_code(self, code: str, *, timeout: Optional[float] = None,
                       on_stdout: Optional[OutputHandler] = None, on_stderr: Optional[OutputHandler] = None,
                       on_result: Optional[ResultHandler] = None) -> Execution:
        """Run Python in the sandbox's session. Variables persist between calls.

        The user's exceptions and limits that stop the code come back in ``Execution.error``;
        only failures of the sandbox itself raise.
        """
        timeout = self._call_timeout(timeout)
        async with self._exec_lock:
            proc = await self._awake()
            rid, queue = proc.channel.new_request()
            await proc.refresh_usage(reset_peak=True)
            usage_start = self._usage_start(proc)
            output = CallOutput(self.limits.output, on_stdout, on_stderr)
            execution = Execution()
            started = time.monotonic()
            try:
                await proc.channel.send({"t": "exec", "id": rid, "code": code})
                done = await self._pump(proc, rid, queue, timeout, output, execution, on_result)
            finally:
                proc.channel.forget(rid)
                self._last_activity = time.monotonic()
            execution.logs.stdout = output.chunks("stdout")
            execution.logs.stderr = output.chunks("stderr")
            execution.truncated = output.truncated
            await proc.refresh_usage()
            execution.usage = self._usage_end(proc, usage_start, started)
            await self._finish_execution(proc, execution, done, timeout, output, usage_start)
            return execution

    def _call_timeout(self, timeout: Optional[float]) -> float:
        if timeout is None:
            return self.limits.timeout
        return Limits.build({"timeout": timeout}).timeout

    async def _pump(self, proc, rid, queue, timeout, output, execution, on_result) -> dict:
        """Collect frames of one execution until it is done, interrupting it at the timeout or output cap."""
        deadline = time.monotonic() + timeout
        interrupted_for: Optional[str] = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if interrupted_for is None:
                    interrupted_for = "timeout"
                    await proc.channel.send({"t": "interrupt", "id": rid})
                    deadline = time.monotonic() + INTERRUPT_GRACE
                    continue
                after = "the timeout" if interrupted_for == "timeout" else "the output cap"
                await self._die(f"its code ignored the interrupt after {after}", interrupted_for)
                return {"t": "killed", "why": interrupted_for}
            try:
                # Frames already here are taken without a timer each: after an interrupt the backlog
                # (thousands of tiny results) must drain well within the grace the code gets.
                item = queue.get_nowait()
            except asyncio.QueueEmpty:
                try:
                    item = await asyncio.wait_for(queue.get(), remaining)
                except asyncio.TimeoutError:
                    continue
            if item is CLOSED:
                return {"t": "closed", "why": interrupted_for}
            header, payload = item
            kind = header.get("t")
            if kind in ("stdout", "stderr"):
                await output.feed(kind, payload)
                if output.over_cap and interrupted_for is None:
                    interrupted_for = "output"
                    await proc.channel.send({"t": "interrupt", "id": rid})
                    deadline = time.monotonic() + INTERRUPT_GRACE
            elif kind == "result" and isinstance(header.get("data"), dict):
                # A rich result is charged its serialized size against the same cap as printed bytes:
                # a display() loop must not pile up gigabytes in this process.
                if not output.admit(header["data"]):
                    if interrupted_for is None:
                        interrupted_for = "output"
                        await proc.channel.send({"t": "interrupt", "id": rid})
                        deadline = time.monotonic() + INTERRUPT_GRACE
                    continue
                result = Result.from_mime(header["data"], bool(header.get("main")))
                execution.results.append(result)
                await _call(on_result, result)
            elif kind == "done":
                return dict(header, why=interrupted_for)
            elif kind == "error":
                return {"t": "done", "why": interrupted_for, "error": {
                    "name": "InvalidRequest", "value": str(header.get("message")), "traceback": ""}}

    async def _finish_execution(self, proc, execution, done, timeout, output, usage_start) -> None:
        why = done.get("why")
        count = done.get("execution_count")
        execution.execution_count = count if isinstance(count, int) else None
        raw = done.get("error")
        if isinstance(raw, dict):
            execution.error = ExecutionError(str(raw.get("name")), str(raw.get("value")), str(raw.get("traceback") or ""))
        oom = self._oom_since(proc, usage_start)
        cap = _human(self.limits.output)
        if done["t"] == "killed" and why == "output":
            execution.error = ExecutionError(
                "OutputLimitExceeded", f"the code's output (printed text and results) passed {cap} and it ignored "
                "the interrupt, so the sandbox was killed", limit="output")
        elif done["t"] == "killed":
            execution.error = ExecutionError(
                "TimeoutError", f"the code ran past its {timeout:g} s timeout and ignored the interrupt, "
                "so the sandbox was killed", limit="timeout")
        elif done["t"] == "closed":
            limit = "memory" if oom else "protocol"
            msg = (f"the sandbox exceeded its memory limit ({_human(self.limits.memory)}) and was killed" if oom
                   else f"the sandbox's agent stopped answering ({proc.channel.closed_reason}); the sandbox was killed")
            execution.error = ExecutionError("OutOfMemory" if oom else "SandboxCrashed", msg, limit=limit)
            await self._die(msg, limit)
        elif done.get("died"):
            if oom:
                execution.error = ExecutionError(
                    "OutOfMemory", f"the session used more than its memory limit ({_human(self.limits.memory)}) "
                    "and was killed; its variables are lost, the sandbox still runs", limit="memory")
            else:
                execution.error.value += "; its variables are lost, the sandbox still runs"
        elif why == "timeout":
            execution.error = ExecutionError(
                "TimeoutError", f"the code ran past its {timeout:g} s timeout and was interrupted "
                "(KeyboardInterrupt); the session and its variables are intact",
                execution.error.traceback if execution.error else "", limit="timeout")
        elif why == "output":
            execution.error = ExecutionError(
                "OutputLimitExceeded", f"the code's output (printed text and results) passed {cap} and it was "
                "interrupted; the output was truncated", execution.error.traceback if execution.error else "", limit="output")
        if execution.error is not None and execution.error.limit is None and self._pids_hit_since(proc, usage_start):
            execution.error.limit = "pids"
            execution.error.value += f" (the sandbox reached its process limit of {self.limits.pids})"

    # -- usage from the kernel's own counters (the backend's probe) ----------------------------
    def _usage_start(self, proc: BackendSandbox) -> Counters:
        return proc.usage(reset_peak=True)

    def _usage_end(self, proc: BackendSandbox, start: Counters, started: float) -> Usage:
        now = proc.usage()
        return Usage(wall_seconds=time.monotonic() - started, cpu_seconds=max(0.0, now.cpu_seconds - start.cpu_seconds),
                     peak_memory=now.memory_peak)

    def _oom_since(self, proc: BackendSandbox, start: Counters) -> bool:
        now = proc.usage()
        # An OOM kill, or (gVisor's sentry may exit on a failed allocation, with no OOM kill counted)
        # the cgroup ran into its limit during the call.
        return (now.oom_kills > start.oom_kills or now.memory_limit_hits > start.memory_limit_hits
                or now.memory_peak >= 0.95 * self.limits.memory)

    def _pids_hit_since(self, proc: BackendSandbox, start: Counters) -> bool:
        return proc.usage().pids_limit_hits > start.pids_limit_hits

    # -- plumbing shared by commands and files -------------------------------------------------
    async def _request(self, header: dict, payload: bytes = b"", timeout: float = 60.0) -> dict:
        """One request, one reply (``ok`` or ``error``)."""
        proc = await self._awake()
        rid, queue = proc.channel.new_request()
        try:
            await proc.channel.send(dict(header, id=rid), payload)
            item = await self._next(proc, queue, timeout)
            return self._reply(item, header)
        finally:
            proc.channel.forget(rid)

    async def _next(self, proc, queue: asyncio.Queue, timeout: float):
        try:
            item = await asyncio.wait_for(queue.get(), timeout)
        except asyncio.TimeoutError:
            raise SandboxCrashed(f"the sandbox's agent did not answer within {timeout:g} s") from None
        if item is CLOSED:
            reason = proc.channel.closed_reason
            await self._die(f"its agent went away ({reason})", "protocol")
            raise SandboxCrashed(f"sandbox {proc.id} died: {reason}", limit="protocol")
        return item

    @staticmethod
    def _reply(item, request: dict) -> dict:
        header, _ = item
        if header.get("t") == "error":
            message = str(header.get("message"))
            if header.get("etype") in ("InvalidRequest", "ValueError", "TypeError", "KeyError"):
                raise InvalidRequest(message)
            errno = header.get("errno") if isinstance(header.get("errno"), int) else None
            raise FileError(f"{header.get('etype')}: {message}", errno=errno, path=request.get("path"))
        return header


class LocalCommandHandle(AsyncCommandHandle):
    """A command running in a local sandbox."""

    def __init__(self, sandbox: LocalSandbox, proc, rid: int, queue: asyncio.Queue,
                 on_stdout: Optional[OutputHandler], on_stderr: Optional[OutputHandler],
                 timeout: Optional[float], cmd: str = "", cwd: Optional[str] = None, kills_at_cap: bool = True) -> None:
        self._sandbox, self._proc, self._rid, self._queue = sandbox, proc, rid, queue
        self._kills_at_cap = kills_at_cap  # the handle that started it enforces the output cap; readers only stop keeping
        self._muted = False
        # Callbacks of this handle, then of handles reattached later (commands.connect): each gets what
        # arrives after it attached; the text itself is kept once, here, under the output cap.
        self._listeners: list[tuple[Optional[OutputHandler], Optional[OutputHandler]]] = [(on_stdout, on_stderr)]
        self._output = CallOutput(sandbox.limits.output, lambda text: self._fan(0, text),
                                  lambda text: self._fan(1, text))
        self._timeout = timeout
        self._result: Optional[CommandResult] = None
        self._started = time.monotonic()
        self.info = CommandInfo(pid=0, cmd=cmd, cwd=cwd, started_at=datetime.now(timezone.utc))
        self._task = asyncio.get_running_loop().create_task(self._collect())
        self.pid: Optional[int] = None

    async def _fan(self, stream: int, text: str) -> None:
        if self._muted:
            return
        for listener in list(self._listeners):
            await _call(listener[stream], text)

    def attach(self, on_stdout: Optional[OutputHandler], on_stderr: Optional[OutputHandler]) -> None:
        if on_stdout is not None or on_stderr is not None:
            self._listeners.append((on_stdout, on_stderr))

    @property
    def running(self) -> bool:
        return not self._task.done()

    @property
    def stdout(self) -> str:
        return self._output.text("stdout")

    @property
    def stderr(self) -> str:
        return self._output.text("stderr")

    async def _collect(self) -> CommandResult:
        error = None
        limit: Optional[str] = None
        exit_code = None
        measured: dict = {}
        deadline = self._started + self._timeout if self._timeout else None
        try:
            while True:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0 and error is None:
                    error, limit = f"the command ran past its {self._timeout:g} s timeout and was killed", "timeout"
                    await self.kill()
                    deadline = time.monotonic() + 5
                    continue
                if remaining is not None and remaining <= 0:
                    raise SandboxCrashed("the agent did not report the end of a killed command")
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except asyncio.TimeoutError:
                    continue
                if item is CLOSED:
                    error = error or f"the sandbox died while the command ran ({self._proc.channel.closed_reason})"
                    break
                header, payload = item
                kind = header.get("t")
                if kind in ("stdout", "stderr"):
                    await self._take(kind, header, payload)
                    if self._kills_at_cap and self._output.over_cap and error is None:
                        error = f"the command printed more than {_human(self._output.cap)} and was killed"
                        limit = "output"
                        await self.kill()
                elif kind == "started":
                    self.pid = header.get("pid") if isinstance(header.get("pid"), int) else None
                    self.info.pid = self.pid or 0
                elif kind == "exit":
                    exit_code = header.get("exit_code") if isinstance(header.get("exit_code"), int) else None
                    measured = header.get("usage") if isinstance(header.get("usage"), dict) else {}
                    break
                elif kind == "error":
                    # The agent could not start it (EAGAIN at the process limit, a bad cwd...).
                    error = f"the command could not start: {header.get('message')}"
                    if header.get("errno") == 11:
                        error += f" (the sandbox is at its process limit of {self._sandbox.limits.pids})"
                        limit = "pids"
                    break
        finally:
            self._proc.channel.forget(self._rid)
        # The agent measured the command's CPU time itself (wait4), kept only if it is a number.
        cpu = measured.get("cpu_seconds")
        usage = Usage(cpu_seconds=float(cpu) if isinstance(cpu, (int, float)) and cpu >= 0 else 0.0,
                      wall_seconds=time.monotonic() - self._started)
        self._result = CommandResult(exit_code=exit_code, stdout=self.stdout, stderr=self.stderr, error=error,
                                     usage=usage,
                                     truncated=self._output.truncated, limit=limit)
        return self._result

    async def _take(self, kind: str, header: dict, payload: bytes) -> None:
        await self._output.feed(kind, payload)

    async def wait(self) -> CommandResult:
        return await asyncio.shield(self._task)

    async def kill(self, signal: int = 9) -> None:
        if self._proc.channel.is_open:
            await self._proc.channel.send({"t": "signal", "id": 0, "target": self._rid, "signal": int(signal)})

    async def send_stdin(self, data: Union[str, bytes], close: bool = False) -> None:
        raw = data.encode() if isinstance(data, str) else bytes(data)
        for i in range(0, max(len(raw), 1), protocol.CHUNK):
            last = i + protocol.CHUNK >= len(raw)
            await self._proc.channel.send({"t": "stdin", "id": 0, "target": self._rid, "close": close and last},
                                          raw[i:i + protocol.CHUNK])


class LocalCommands(CommandsHandle):
    """Shell commands in the sandbox (same filesystem as the session), via /bin/sh -c."""

    def __init__(self, sandbox: LocalSandbox) -> None:
        self._sandbox = sandbox
        self._background: dict[int, LocalCommandHandle] = {}  # running background commands, by request id

    async def run(self, cmd: str, *, timeout: Optional[float] = None, env: Optional[Mapping[str, str]] = None,
                  cwd: Optional[str] = None, stdin: Union[str, bytes, None] = None,
                  on_stdout: Optional[OutputHandler] = None, on_stderr: Optional[OutputHandler] = None,
                  background: bool = False) -> Union[CommandResult, AsyncCommandHandle]:
        """Run ``cmd``; return its result, or with ``background=True`` a handle to wait on or kill."""
        sandbox = self._sandbox
        timeout = None if background and timeout is None else sandbox._call_timeout(timeout)
        proc = await sandbox._awake()
        rid, queue = proc.channel.new_request()
        keep_stdin = background or stdin is not None
        # keep: what the agent keeps of its output for a later reader (connect), this sandbox's output cap;
        # kept_total: of all its commands together, an eighth of its memory (the agent's memory is the sandbox's)
        limits = sandbox.limits
        await proc.channel.send({"t": "cmd", "id": rid, "cmd": cmd, "env": dict(env or {}), "cwd": cwd,
                                 "stdin": keep_stdin, "keep": limits.output,
                                 "kept_total": max(limits.output, limits.memory // 8)})
        handle = LocalCommandHandle(sandbox, proc, rid, queue, on_stdout, on_stderr, timeout, cmd, cwd)
        if stdin is not None:
            await handle.send_stdin(stdin, close=True)
        if background:
            self._background[rid] = handle
            handle._task.add_done_callback(lambda _: self._background.pop(rid, None))
            return handle
        return await handle.wait()

    async def list(self) -> "list[CommandInfo]":
        """Asked of the agent, which remembers its commands: also those another process started (a sandbox
        re-adopted after a restart of its owner)."""
        await self._sandbox._awake()
        reply = await self._sandbox._request({"t": "cmd_list"})
        raws = reply.get("commands")
        return [_command_info(raw) for raw in (raws if isinstance(raws, list) else [])
                if isinstance(raw, dict) and raw.get("running") is True]

    async def connect(self, pid: int, *, offset: Union[None, int, Mapping[str, int]] = None,
                      on_stdout: Optional[OutputHandler] = None,
                      on_stderr: Optional[OutputHandler] = None) -> AsyncCommandHandle:
        """A handle to background command ``pid``, running or ended (the agent remembers the last ones).
        ``offset=None``: its output so far in ``stdout``/``stderr``, the callbacks get what it prints from now
        on. ``offset=N`` (or ``{"stdout": N, "stderr": M}``): its output from byte N of each stream, callbacks
        included; ``offset=0`` replays all the agent kept. The agent keeps the newest ``output``-limit bytes of
        each command: ``handle.offsets`` says where the handle's text starts if older bytes were dropped."""
        await self._sandbox._awake()
        if offset is None:  # started by this process: the same handle (its full text, result and error)
            for handle in self._background.values():
                if handle.pid == pid and handle.running:
                    return _Reattached(handle, on_stdout, on_stderr)
        return await self._attach(pid, offset, on_stdout, on_stderr)

    async def _attach(self, pid: int, offset: Union[None, int, Mapping[str, int]],
                      on_stdout: Optional[OutputHandler], on_stderr: Optional[OutputHandler]) -> "AttachedCommand":
        sandbox = self._sandbox
        proc = sandbox._alive()
        start = {name: 0 if offset is None else offset if isinstance(offset, int) else offset.get(name, 0)
                 for name in ("stdout", "stderr")}
        rid, queue = proc.channel.new_request()
        try:
            await proc.channel.send({"t": "cmd_attach", "id": rid, "pid": pid, **start})
            header, _ = await sandbox._next(proc, queue, 60)
        except BaseException:
            proc.channel.forget(rid)
            raise
        if header.get("t") != "started":
            proc.channel.forget(rid)
            raise SandboxNotFound(f"no background command with pid {pid} runs or ended lately in sandbox "
                                  f"{sandbox.sandbox_id} (commands.list() shows those that run)")
        handle = AttachedCommand(sandbox, proc, rid, queue, header, on_stdout, on_stderr, quiet_replay=offset is None)
        # Its output up to now is in stdout/stderr when connect returns (the replay is at most the output cap).
        try:
            await asyncio.wait_for(handle._replayed.wait(), 120)
        except asyncio.TimeoutError:
            await handle.detach()
            raise SandboxCrashed("the agent did not replay a command's output within 120 s") from None
        return handle


def _offset(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SandboxCrashed("the agent sent a malformed command offset", limit="protocol")
    return value


def _command_info(raw: dict) -> CommandInfo:
    """A command as the agent describes it (checked: the agent is inside the sandbox)."""
    pid, cmd, cwd, started = raw.get("pid"), raw.get("cmd"), raw.get("cwd"), raw.get("started_at")
    if (isinstance(pid, bool) or not isinstance(pid, int) or not isinstance(cmd, str)
            or not isinstance(cwd, (str, type(None))) or not isinstance(started, (int, float))):
        raise SandboxCrashed("the agent sent a malformed command", limit="protocol")
    try:
        when = datetime.fromtimestamp(started, timezone.utc)
    except (OverflowError, OSError, ValueError):
        when = datetime.now(timezone.utc)
    return CommandInfo(pid=pid, cmd=cmd, cwd=cwd, started_at=when)


class AttachedCommand(LocalCommandHandle):
    """A reader of a command through the agent (``commands.connect``): the command may have been started by
    another process, or have ended. It keeps at most the sandbox's output cap of what it reads (``truncated``
    past it) and never kills the command for its output: the handle that started it does that."""

    def __init__(self, sandbox: LocalSandbox, proc, rid: int, queue: asyncio.Queue, started: dict,
                 on_stdout: Optional[OutputHandler], on_stderr: Optional[OutputHandler], quiet_replay: bool) -> None:
        info = _command_info(started)
        super().__init__(sandbox, proc, rid, queue, on_stdout, on_stderr, None, info.cmd, info.cwd, kills_at_cap=False)
        self.info, self.pid = info, info.pid
        cursor = started.get("cursor") if isinstance(started.get("cursor"), dict) else {}
        # offsets: the byte of each stream its stdout/stderr begin at (more than asked when older bytes were
        # dropped). The callbacks get nothing before ``quiet`` (offset=None: what was printed before now).
        self.offsets = {name: _offset(cursor.get(name)) for name in ("stdout", "stderr")}
        ends = {name: (started.get(name) or {}).get("end") if isinstance(started.get(name), dict) else 0
                for name in ("stdout", "stderr")}
        self._ends = {name: _offset(ends[name]) for name in ("stdout", "stderr")}
        self._quiet = self._ends if quiet_replay else {"stdout": 0, "stderr": 0}
        self._next_at = dict(self.offsets)
        self.gap = False  # bytes were dropped between two chunks it read (it fell behind a flood)
        self._replayed = asyncio.Event()  # what the command had printed when it attached has arrived
        self._task.add_done_callback(lambda _: self._replayed.set())
        self._check_replayed()

    def _check_replayed(self) -> None:
        if all(self._next_at[name] >= self._ends[name] for name in self._ends):
            self._replayed.set()

    async def _take(self, kind: str, header: dict, payload: bytes) -> None:
        at = header.get("offset")
        at = self._next_at[kind] if isinstance(at, bool) or not isinstance(at, int) else at
        if at > self._next_at[kind]:
            if self._next_at[kind] == self.offsets[kind]:  # nothing read yet: the text starts here
                self.offsets[kind] = at
            else:
                self.gap = True
                self._output.truncated = True
        self._next_at[kind] = at + len(payload)
        quiet = max(0, min(len(payload), self._quiet[kind] - at))
        if quiet:
            self._muted = True
            try:
                await self._output.feed(kind, payload[:quiet])
            finally:
                self._muted = False
        if quiet < len(payload):
            await self._output.feed(kind, payload[quiet:])
        self._check_replayed()

    async def detach(self) -> None:
        """Stop reading (the command runs on): the agent stops sending to this handle."""
        if not self._task.done():
            self._task.cancel()
            if self._proc.channel.is_open:
                await self._proc.channel.send({"t": "cmd_detach", "id": 0, "target": self._rid})


class _Reattached(AsyncCommandHandle):
    """Another handle to a running local command: the same output, result and controls; its own callbacks."""

    def __init__(self, handle: LocalCommandHandle, on_stdout: Optional[OutputHandler],
                 on_stderr: Optional[OutputHandler]) -> None:
        self._handle = handle
        self.pid = handle.pid
        handle.attach(on_stdout, on_stderr)

    @property
    def stdout(self) -> str:
        return self._handle.stdout

    @property
    def stderr(self) -> str:
        return self._handle.stderr

    async def wait(self) -> CommandResult:
        return await self._handle.wait()

    async def kill(self, signal: int = 9) -> None:
        await self._handle.kill(signal)

    async def send_stdin(self, data: Union[str, bytes], close: bool = False) -> None:
        await self._handle.send_stdin(data, close)


class LocalFiles(FilesHandle):
    """Files inside the sandbox. Paths are resolved by the agent, inside the sandbox's own root:
    a symlink or hardlink planted by sandbox code can never make the host read or write its files."""

    def __init__(self, sandbox: LocalSandbox) -> None:
        self._sandbox = sandbox

    async def write(self, path: str, data: Union[str, bytes, Any], *, append: bool = False) -> EntryInfo:
        """Write text, bytes, a binary file object, or an (async) iterable of bytes, in chunks."""
        sandbox = self._sandbox
        proc = await sandbox._awake()
        rid, queue = proc.channel.new_request()
        try:
            await proc.channel.send({"t": "fwrite", "id": rid, "path": path, "append": append})
            async for chunk in _chunks(data):
                await proc.channel.send({"t": "fdata", "id": rid}, chunk)
                if not queue.empty():  # an early error (disk full, bad path) ends the upload
                    break
            await proc.channel.send({"t": "fend", "id": rid})
            sandbox._reply(await sandbox._next(proc, queue, 120), {"path": path})
        finally:
            proc.channel.forget(rid)
        return await self.stat(path)

    async def stream(self, path: str) -> AsyncIterator[bytes]:
        sandbox = self._sandbox
        proc = await sandbox._awake()
        # Flow-controlled: the file comes at the reader's pace, never piling up in this process.
        rid, queue = proc.channel.new_request(window=protocol.FREAD_WINDOW)
        finished = False
        try:
            await proc.channel.send({"t": "fread", "id": rid, "path": path})
            while True:
                item = await sandbox._next(proc, queue, 120)
                header, payload = item
                if header.get("t") == "data":
                    yield payload
                    await proc.channel.ack(rid, len(payload))
                    continue
                finished = True
                sandbox._reply(item, {"path": path})
                return
        finally:
            proc.channel.forget(rid)
            if not finished:
                await proc.channel.send({"t": "fcancel", "id": 0, "target": rid})

    async def list(self, path: str = "/home/user", *, depth: int = 1) -> list[EntryInfo]:
        reply = await self._sandbox._request({"t": "flist", "path": path, "depth": int(depth)})
        return [_entry(e) for e in reply.get("entries", [])]

    async def stat(self, path: str) -> EntryInfo:
        reply = await self._sandbox._request({"t": "fstat", "path": path})
        return _entry(reply["entry"])

    async def exists(self, path: str) -> bool:
        reply = await self._sandbox._request({"t": "fexists", "path": path})
        return bool(reply.get("exists"))

    async def remove(self, path: str) -> None:
        await self._sandbox._request({"t": "fremove", "path": path})

    async def mkdir(self, path: str) -> bool:
        """Create a directory and its parents; False if it already existed."""
        reply = await self._sandbox._request({"t": "fmkdir", "path": path})
        return bool(reply.get("created"))


def _entry(raw: dict) -> EntryInfo:
    try:
        return EntryInfo(name=str(raw["name"]), path=str(raw["path"]), type=str(raw["type"]),
                         size=int(raw["size"]), mode=int(raw["mode"]), mtime=float(raw["mtime"]))
    except (KeyError, TypeError, ValueError):
        raise SandboxCrashed("the agent sent a malformed file entry", limit="protocol") from None
