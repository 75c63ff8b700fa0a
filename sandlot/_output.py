"""What the host keeps of one call's output, and the cap on it.

Everything a sandbox makes the host keep for a call is charged against the sandbox's ``output`` limit,
here on the host (the agent is untrusted; nothing it says about sizes counts):

- stdout and stderr, by the raw bytes that arrived (each decodes to at most one character);
- every rich result (display(), the cell's value, ``_repr_json_``, HTML, images), by the serialized size
  of its mime bundle as it is stored (UTF-8 bytes of each string, the JSON text of anything else), plus
  ``RESULT_OVERHEAD`` for the Python object that holds it: a million ``display(1)`` calls are small on
  the wire but not in memory.

Past the cap nothing more is kept (``truncated``) and the caller interrupts the code. Small chunks are
merged as they are stored, so a flood of one-byte writes costs the host its bytes, not a Python object
per byte; callbacks still see every chunk as it comes.
"""

from __future__ import annotations

import codecs
import inspect
import json
from typing import Any, Awaitable, Callable, Optional, Union

OutputHandler = Callable[[str], Union[None, Awaitable[None]]]
RESULT_OVERHEAD = 1024  # bytes charged per kept result: about what its Result object costs beyond its data
_MERGE_COUNT = 256  # small chunks waiting to be merged into one stored string
_MERGE_BYTES = 64 * 1024


async def call(handler: Optional[Callable], value: Any) -> None:
    if handler is not None:
        out = handler(value)
        if inspect.isawaitable(out):
            await out


def serialized_size(value: Any) -> int:
    """Bytes of one mime value as the host stores it: UTF-8 of a string, the JSON text of anything else."""
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    try:
        return len(json.dumps(value, separators=(",", ":"), default=str).encode("utf-8", "surrogatepass"))
    except (TypeError, ValueError, RecursionError):
        return len(str(value).encode("utf-8", "surrogatepass"))


def bundle_size(data: dict) -> int:
    """A result's charge: its mime bundle, key by key, plus the cost of keeping it at all."""
    return RESULT_OVERHEAD + sum(len(str(k)) + serialized_size(v) for k, v in data.items())


class TextLog:
    """The chunks of one stream, merged as they are stored (at most ``_MERGE_COUNT`` small ones wait)."""

    def __init__(self) -> None:
        self._stored: list[str] = []
        self._waiting: list[str] = []
        self._waiting_bytes = 0

    def append(self, text: str) -> None:
        self._waiting.append(text)
        self._waiting_bytes += len(text)
        if len(self._waiting) >= _MERGE_COUNT or self._waiting_bytes >= _MERGE_BYTES:
            self._merge()

    def _merge(self) -> None:
        if self._waiting:
            self._stored.append("".join(self._waiting))
            self._waiting, self._waiting_bytes = [], 0

    def chunks(self) -> list[str]:
        self._merge()
        return list(self._stored)

    def text(self) -> str:
        self._merge()
        return "".join(self._stored)


class CallOutput:
    """Decodes, caps and keeps one call's stdout/stderr and results, feeding the callbacks as they arrive."""

    def __init__(self, cap: int, on_stdout: Optional[OutputHandler] = None,
                 on_stderr: Optional[OutputHandler] = None) -> None:
        self.cap = cap
        self.seen = 0  # bytes charged, including what arrived past the cap
        self.truncated = False
        self.logs = {"stdout": TextLog(), "stderr": TextLog()}
        self.handlers = {"stdout": on_stdout, "stderr": on_stderr}
        self.decoders = {name: codecs.getincrementaldecoder("utf-8")("replace") for name in self.logs}

    @property
    def over_cap(self) -> bool:
        return self.seen > self.cap

    async def feed(self, stream: str, data: bytes) -> None:
        room = self.cap - self.seen
        self.seen += len(data)
        if room <= 0:
            self.truncated = True
            return
        if len(data) > room:
            data = data[:room]
            self.truncated = True
        text = self.decoders[stream].decode(data)
        if text:
            self.logs[stream].append(text)
            await call(self.handlers[stream], text)

    def admit(self, data: dict) -> bool:
        """Charge one result's mime bundle; False (and nothing kept) if it does not fit under the cap."""
        if self.over_cap:  # past the cap already: do not even measure it
            self.truncated = True
            return False
        self.seen += bundle_size(data)
        if self.over_cap:
            self.truncated = True
            return False
        return True

    def chunks(self, stream: str) -> list[str]:
        return self.logs[stream].chunks()

    def text(self, stream: str) -> str:
        return self.logs[stream].text()
