"""The host's end of the agent channel: frames in, frames out, demultiplexed by request id.

Nothing the agent says is trusted: every frame is size-checked by the protocol module before it
is read, unknown ids are dropped, and a framing error closes the channel for good (the sandbox is
then killed by its owner).
"""

from __future__ import annotations

import asyncio
import itertools
import socket
from typing import Optional

from .._agent import protocol

CLOSED = object()  # queued to every open request when the channel ends
# Frames without an id (boot messages) waiting to be read: they are read only while the agent boots, so an agent
# (or the sandbox's code, through it) sending more afterwards would have them kept for the sandbox's life.
CONTROL_BACKLOG = 8
MOVED = "another owner took the sandbox over"  # closed_reason after a holder's "moved" frame


class Channel:
    def __init__(self, sock: "socket.socket | tuple") -> None:
        self._sock = sock
        self._ids = itertools.count(1)
        self._queues: dict[int, asyncio.Queue] = {}
        self._windows: dict[int, list] = {}  # request id -> [window, payload bytes held and not acknowledged]
        self._reader: Optional[asyncio.StreamReader] = None
        self._writer: Optional[asyncio.StreamWriter] = None
        self._task: Optional[asyncio.Task] = None
        self.closed_reason: Optional[str] = None
        self.control: asyncio.Queue = asyncio.Queue()  # frames without an id (boot messages)
        # A holder that hands the sandbox to a newer owner says so first ({"t": "moved"}, no id): set by a tier
        # whose holder is trusted to say it and filters it out of what its agent sends (a pod's: pod.py).
        self.honours_moved = False
        self.moved = False
        self._ended = asyncio.Event()  # set when the channel closes, for whoever waits on its end

    async def open(self) -> None:
        if isinstance(self._sock, tuple):  # (read pipe, write pipe): a gVisor container's stdout/stdin
            loop = asyncio.get_running_loop()
            read_pipe, write_pipe = self._sock
            self._reader = asyncio.StreamReader(limit=protocol.MAX_PAYLOAD)
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(self._reader), read_pipe)
            transport, proto = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, write_pipe)
            self._writer = asyncio.StreamWriter(transport, proto, None, loop)
        elif self._sock.family == socket.AF_UNIX:
            self._reader, self._writer = await asyncio.open_unix_connection(sock=self._sock,
                                                                            limit=protocol.MAX_PAYLOAD)
        else:  # TCP: a pod's holder over the pod network (the kubernetes tier)
            self._reader, self._writer = await asyncio.open_connection(sock=self._sock, limit=protocol.MAX_PAYLOAD)
        self._task = asyncio.get_running_loop().create_task(self._read_loop())

    @property
    def is_open(self) -> bool:
        return self.closed_reason is None

    def new_request(self, window: Optional[int] = None) -> tuple[int, asyncio.Queue]:
        """A request id and the queue its answers arrive on. With ``window``, the agent may send at most
        that many payload bytes not yet acknowledged (``ack``): more breaks the protocol and closes the
        channel, so a reader that stops reading never makes this process buffer what the agent keeps sending."""
        rid = next(self._ids)
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = queue
        if window is not None:
            self._windows[rid] = [window, 0]
        if not self.is_open:
            queue.put_nowait(CLOSED)
        return rid, queue

    def forget(self, rid: int) -> None:
        self._queues.pop(rid, None)
        self._windows.pop(rid, None)

    async def ack(self, rid: int, size: int) -> None:
        """``size`` payload bytes of ``rid`` were consumed: the agent may send as many more."""
        window = self._windows.get(rid)
        if window is not None:
            window[1] = max(0, window[1] - size)
            await self.send({"t": "fack", "id": 0, "target": rid, "bytes": size})

    async def ping(self, within: float) -> bool:
        """Whether the agent answers a ping within ``within`` seconds: the whole path to it works (after a
        restore, an adoption...)."""
        rid, queue = self.new_request()
        try:
            await self.send({"t": "ping", "id": rid})
            item = await asyncio.wait_for(queue.get(), within)
        except asyncio.TimeoutError:
            item = CLOSED
        finally:
            self.forget(rid)
        return item is not CLOSED

    async def send(self, header: dict, payload: bytes = b"") -> None:
        if not self.is_open or self._writer is None:
            return
        self._writer.write(protocol.encode(header, payload))
        try:
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            self._close("channel write failed: %s" % exc)

    async def _read_loop(self) -> None:
        assert self._reader is not None
        reason = "the agent closed the channel"
        try:
            while True:
                prefix = await self._reader.readexactly(protocol.PREFIX.size)
                head_len, payload_len = protocol.check_prefix(prefix)
                header = protocol.decode_header(await self._reader.readexactly(head_len))
                payload = await self._reader.readexactly(payload_len) if payload_len else b""
                rid = header.get("id")
                if rid is None:
                    if header.get("t") == "moved" and self.honours_moved:
                        self.moved = True
                        reason = MOVED
                        break
                    if self.control.qsize() < CONTROL_BACKLOG:  # (boot messages carry no payload: none is kept)
                        self.control.put_nowait((header, b""))
                    continue
                queue = self._queues.get(rid) if isinstance(rid, int) else None
                if queue is not None:
                    window = self._windows.get(rid)
                    if window is not None:
                        window[1] += payload_len
                        if window[1] > window[0]:
                            raise protocol.ProtocolError("request %d: %d bytes sent past a %d-byte window"
                                                         % (rid, window[1], window[0]))
                    queue.put_nowait((header, payload))
        except asyncio.IncompleteReadError:
            pass
        except (protocol.ProtocolError, RecursionError) as exc:  # (RecursionError: a header's JSON nested too deep)
            reason = "the agent broke the protocol: %s" % exc
        except (ConnectionError, OSError) as exc:
            reason = "channel error: %s" % exc
        except asyncio.CancelledError:
            reason = "channel closed by the host"
        self._close(reason)

    def _close(self, reason: str) -> None:
        if self.closed_reason is not None:
            return
        self.closed_reason = reason
        self._ended.set()
        for queue in self._queues.values():
            queue.put_nowait(CLOSED)
        self.control.put_nowait(CLOSED)
        if self._writer is not None:
            self._writer.close()

    async def closed(self) -> str:
        """Wait until the channel closes (the agent's end, or ours); its reason."""
        await self._ended.wait()
        assert self.closed_reason is not None
        return self.closed_reason

    async def aclose(self) -> None:
        self._close("channel closed by the host")
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
