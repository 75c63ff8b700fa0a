"""NDJSON streaming: one JSON event per line while work runs, then a final ``end`` (or ``exception``) line.

The work runs in its own task and is never cancelled by a client going away: a stateful session must
finish (or time out) its call either way, and the sandbox's limits bound it. Idle streams get a ping
line now and then, so proxies and the client's read timeout see a live connection.

Events wait in an outbox for a slow client. What they hold is capped upstream (the sandbox's ``output``
limit); the outbox merges consecutive text events of one stream while they wait, so a flood of tiny
chunks costs the server its bytes, not one event object per chunk.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi.responses import StreamingResponse

from .._exceptions import SandlotError
from .._output import TextLog
from .errors import error_detail
from .schemas import NDJSON

log = logging.getLogger("sandlot.server")
Emit = Callable[[dict], None]
_DONE = object()
_PING = b'{"type":"ping"}\n'
_orphans: set[asyncio.Task] = set()  # work whose client left; kept referenced until it finishes
_TEXT_EVENTS = ("stdout", "stderr")
_MERGED_CHARS = 64 * 1024  # a waiting text event takes more chunks of its stream up to this size


class _Outbox:
    """Events waiting for the client, in order; consecutive text events of one stream are merged."""

    def __init__(self) -> None:
        self._items: collections.deque = collections.deque()
        self._ready = asyncio.Event()
        self._tail_text: "list | None" = None  # [kind, TextLog, chars] of the newest item, while it is text

    def put(self, item: Any) -> None:
        tail = self._tail_text
        if isinstance(item, dict) and item.get("type") in _TEXT_EVENTS and set(item) == {"type", "text"}:
            if tail is None or tail[0] != item["type"] or tail[2] >= _MERGED_CHARS:
                tail = self._tail_text = [item["type"], TextLog(), 0]
                self._items.append(tail)
            tail[1].append(item["text"])
            tail[2] += len(item["text"])
        else:
            self._tail_text = None
            self._items.append(item)
        self._ready.set()

    async def get(self) -> Any:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft()
        if item is self._tail_text:
            self._tail_text = None
        if isinstance(item, list):
            return {"type": item[0], "text": item[1].text()}
        return item


def finite(value: Any) -> Any:
    """JSON has no NaN or Infinity: such floats (from a user's _repr_json_) become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def line(event: dict) -> bytes:
    return json.dumps(finite(event), separators=(",", ":"), default=str).encode() + b"\n"


def response(work: Callable[[Emit], Awaitable[dict]], heartbeat: float,
             cancel_on_leave: bool = False) -> StreamingResponse:
    """``work(emit)`` emits events and returns the final event. With ``cancel_on_leave`` (work that only
    reads, like following a command's output), a client going away cancels it."""
    return StreamingResponse(_lines(work, heartbeat, cancel_on_leave), media_type=NDJSON,
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


async def _lines(work: Callable[[Emit], Awaitable[dict]], heartbeat: float,
                 cancel_on_leave: bool = False) -> AsyncIterator[bytes]:
    queue = _Outbox()
    task = asyncio.get_running_loop().create_task(work(queue.put))
    task.add_done_callback(lambda _: queue.put(_DONE))
    try:
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), heartbeat)
            except asyncio.TimeoutError:
                yield _PING
                continue
            if item is _DONE:
                break
            yield line(item)
        yield line(_final(task))
    finally:
        if not task.done() and cancel_on_leave:
            task.cancel()
        elif not task.done():
            _orphans.add(task)
            task.add_done_callback(_forget)


def _final(task: asyncio.Task) -> dict:
    try:
        return task.result()
    except SandlotError as exc:
        return {"type": "exception", "error": error_detail(exc)}
    except Exception as exc:  # noqa: BLE001 - the stream has started: report in band, never hang the client
        log.exception("streamed request failed")
        return {"type": "exception", "error": {"type": "SandlotError", "message": f"internal error: {exc}"}}


def _forget(task: asyncio.Task) -> None:
    _orphans.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.info("work of a departed client failed: %s", task.exception())
