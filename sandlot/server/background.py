"""Background commands on the server: their output is kept as events, so any number of clients can
follow a command from its first byte (replay, then live) and a client that reconnects misses nothing.

Memory stays bounded by the sandbox's ``output`` limit: each command keeps at most that much (its handle
kills it past the cap), its small chunks are merged as they are stored (a flood of tiny writes costs its
bytes, not an object per chunk), and the finished commands of a sandbox together keep at most that much
too: the oldest are forgotten first (the newest finished one always stays).

A command this server did not start (its sandbox was re-adopted after a restart of the server) is adopted
when a client asks for it: followed through the sandbox's agent, which remembers its commands, from the
oldest byte the agent kept."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any, AsyncIterator, Callable, Optional

from .._exceptions import QuotaExceeded, SandboxNotFound, SandlotError
from .._models import CommandResult
from .._output import TextLog

_EVENT_CHARS = 64 * 1024  # an event grows while it is the newest, up to this; then a new one starts


class _Event:
    """A run of one stream's output, stored merged."""

    __slots__ = ("kind", "log", "size")

    def __init__(self, kind: str) -> None:
        self.kind, self.log, self.size = kind, TextLog(), 0

    def add(self, text: str) -> None:
        self.log.append(text)
        self.size += len(text)


class BackgroundCommand:
    def __init__(self) -> None:
        self.id = "cmd-" + secrets.token_hex(6)
        self.events: list[_Event] = []
        self.handle: Any = None
        self.result: Optional[CommandResult] = None
        self.failure: Optional[SandlotError] = None
        self.budget: Optional[int] = None  # the sandbox's output cap
        self.done = asyncio.Event()
        self.on_end: Optional[Callable[["BackgroundCommand"], None]] = None
        self._changed = asyncio.Event()
        self._watcher: Optional[asyncio.Task] = None

    def _emit(self, kind: str, text: str) -> None:
        last = self.events[-1] if self.events else None
        if last is None or last.kind != kind or last.size >= _EVENT_CHARS:
            last = _Event(kind)
            self.events.append(last)
        last.add(text)
        self._wake()

    def _wake(self) -> None:
        # A fresh Event per change: every follower waiting on the old one wakes, none misses a change.
        self._changed.set()
        self._changed = asyncio.Event()

    @property
    def retained(self) -> int:
        """Characters of output this command keeps (its events; its handle holds the same text again)."""
        return sum(event.size for event in self.events)

    async def start(self, sandbox, cmd: str, **kwargs: Any) -> None:
        self.budget = sandbox.limits.output
        self.handle = await sandbox.commands.run(
            cmd, background=True, on_stdout=lambda t: self._emit("stdout", t),
            on_stderr=lambda t: self._emit("stderr", t), **kwargs)
        self._watcher = asyncio.get_running_loop().create_task(self._wait())

    async def adopt(self, sandbox, pid: int) -> None:
        """Follow command ``pid``, running or ended, that another process started (SandboxNotFound if the
        sandbox does not know it): its output from the oldest byte the sandbox kept, then live."""
        self.budget = sandbox.limits.output
        self.handle = await sandbox.commands.connect(
            pid, offset=0, on_stdout=lambda t: self._emit("stdout", t), on_stderr=lambda t: self._emit("stderr", t))
        self._watcher = asyncio.get_running_loop().create_task(self._wait())

    async def _wait(self) -> None:
        try:
            self.result = await self.handle.wait()
        except SandlotError as exc:
            self.failure = exc
        finally:
            self.done.set()
            self._wake()
            if self.on_end is not None:
                self.on_end(self)

    @property
    def running(self) -> bool:
        return not self.done.is_set()

    async def follow(self) -> AsyncIterator[dict]:
        """Every output event from the start, then live ones, until the command ends."""
        i, sent = 0, 0  # the event being followed, and how many of its characters went out
        while True:
            changed = self._changed
            while i < len(self.events):
                event = self.events[i]
                if event.size > sent:
                    text = event.log.text()[sent:]
                    sent += len(text)
                    yield {"type": event.kind, "text": text}
                    continue  # it may have grown meanwhile (only the newest event grows)
                if i + 1 == len(self.events):
                    break
                i, sent = i + 1, 0
            if self.done.is_set():
                return
            await changed.wait()


class CommandTable:
    """The background commands of one sandbox, at most ``capacity`` (finished ones make room first)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.commands: dict[str, BackgroundCommand] = {}
        self._adopting = asyncio.Lock()  # two clients asking at once adopt a command once

    def by_pid(self, pid: int) -> Optional[BackgroundCommand]:
        """The command with this pid: the running one, else the newest ended one."""
        matches = [c for c in self.commands.values() if c.handle is not None and c.handle.pid == pid]
        running = [c for c in matches if c.running]
        return (running or matches or [None])[-1]

    async def adopt(self, sandbox, pid: int, running: bool) -> Optional[BackgroundCommand]:
        """The table's command with ``pid`` (running if ``running``), adopting it from the sandbox if the table
        does not have it (a command of an earlier server process); None if the sandbox does not know it."""
        async with self._adopting:
            known = self.by_pid(pid)
            if known is not None and (known.running or not running):
                return known
            if any(c.running and (c.handle is None or c.handle.pid is None) for c in self.commands.values()):
                return None  # one this process starts has no pid yet: it may be that one (listed once it has)
            command = self.add()
            try:
                await command.adopt(sandbox, pid)
            except SandboxNotFound:
                self.discard(command)
                return None
            except BaseException:
                self.discard(command)
                raise
            return command

    def add(self) -> BackgroundCommand:
        if len(self.commands) >= self.capacity:
            finished = [cid for cid, c in self.commands.items() if not c.running]
            if not finished:
                raise QuotaExceeded(f"this sandbox already runs {self.capacity} background commands; "
                                    "wait for or kill one first")
            del self.commands[finished[0]]
        command = BackgroundCommand()
        command.on_end = self._trim
        self.commands[command.id] = command
        return command

    def _trim(self, ended: BackgroundCommand) -> None:
        """Finished commands keep at most the sandbox's output cap in all: forget the oldest first."""
        if ended.budget is None:
            return
        finished = [c for c in self.commands.values() if not c.running]
        kept = sum(c.retained for c in finished)
        for command in finished[:-1]:
            if kept <= ended.budget:
                break
            kept -= command.retained
            self.discard(command)

    def discard(self, command: BackgroundCommand) -> None:
        self.commands.pop(command.id, None)

    def get(self, command_id: str) -> Optional[BackgroundCommand]:
        return self.commands.get(command_id)
