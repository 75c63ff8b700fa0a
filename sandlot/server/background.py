"""Background commands on the server: their output is kept as events, so any number of clients can
follow a command from its first byte (replay, then live) and a client that reconnects misses nothing.
Memory stays bounded: a command's output is capped by the sandbox's ``output`` limit."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any, AsyncIterator, Optional

from .._exceptions import QuotaExceeded, SandlotError
from .._models import CommandResult


class BackgroundCommand:
    def __init__(self) -> None:
        self.id = "cmd-" + secrets.token_hex(6)
        self.events: list[dict] = []
        self.handle: Any = None
        self.result: Optional[CommandResult] = None
        self.failure: Optional[SandlotError] = None
        self.done = asyncio.Event()
        self._changed = asyncio.Event()
        self._watcher: Optional[asyncio.Task] = None

    def _emit(self, kind: str, text: str) -> None:
        self.events.append({"type": kind, "text": text})
        self._wake()

    def _wake(self) -> None:
        # A fresh Event per change: every follower waiting on the old one wakes, none misses a change.
        self._changed.set()
        self._changed = asyncio.Event()

    async def start(self, sandbox, cmd: str, **kwargs: Any) -> None:
        self.handle = await sandbox.commands.run(
            cmd, background=True, on_stdout=lambda t: self._emit("stdout", t),
            on_stderr=lambda t: self._emit("stderr", t), **kwargs)
        self._watcher = asyncio.get_running_loop().create_task(self._wait())

    async def _wait(self) -> None:
        try:
            self.result = await self.handle.wait()
        except SandlotError as exc:
            self.failure = exc
        finally:
            self.done.set()
            self._wake()

    @property
    def running(self) -> bool:
        return not self.done.is_set()

    async def follow(self) -> AsyncIterator[dict]:
        """Every output event from the start, then live ones, until the command ends."""
        i = 0
        while True:
            changed = self._changed
            while i < len(self.events):
                yield self.events[i]
                i += 1
            if self.done.is_set():
                return
            await changed.wait()


class CommandTable:
    """The background commands of one sandbox, at most ``capacity`` (finished ones make room first)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.commands: dict[str, BackgroundCommand] = {}

    def add(self) -> BackgroundCommand:
        if len(self.commands) >= self.capacity:
            finished = [cid for cid, c in self.commands.items() if not c.running]
            if not finished:
                raise QuotaExceeded(f"this sandbox already runs {self.capacity} background commands; "
                                    "wait for or kill one first")
            del self.commands[finished[0]]
        command = BackgroundCommand()
        self.commands[command.id] = command
        return command

    def discard(self, command: BackgroundCommand) -> None:
        self.commands.pop(command.id, None)

    def get(self, command_id: str) -> Optional[BackgroundCommand]:
        return self.commands.get(command_id)
