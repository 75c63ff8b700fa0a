"""TLS on top of an asyncio stream pair, through `ssl.MemoryBIO`.

Why not `StreamWriter.start_tls`: it decides client or server side from how the streams were made (only
streams from `asyncio.start_server` can be a TLS server), and it cannot see bytes the broker already read
while peeking at the ClientHello. Driving an `SSLObject` over memory buffers works for any stream pair the
broker hands over, with any bytes it already consumed (`initial`), on both sides of the interceptor.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl

READ_SIZE = 64 * 1024


class TlsStream:
    """One TLS session over (reader, writer). Not for concurrent use by two tasks in the same direction."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, context: ssl.SSLContext,
                 *, server_side: bool, server_hostname: str | None = None, initial: bytes = b"") -> None:
        self._reader = reader
        self._writer = writer
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side,
                                     server_hostname=server_hostname)
        if initial:
            self._incoming.write(initial)
        self.raw_in = len(initial)   # bytes read from / written to the underlying TCP stream
        self.raw_out = 0

    async def _flush(self) -> None:
        data = self._outgoing.read()
        if data:
            self.raw_out += len(data)
            self._writer.write(data)
            await self._writer.drain()

    async def _fill(self) -> None:
        data = await self._reader.read(READ_SIZE)
        if data:
            self.raw_in += len(data)
            self._incoming.write(data)
        else:
            self._incoming.write_eof()

    async def handshake(self) -> None:
        """Complete the handshake; ssl.SSLError (e.g. SSLCertVerificationError) if it fails."""
        while True:
            try:
                self._ssl.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
                continue
            except ssl.SSLError:
                # Send the alert that says why (the peer gets "unknown CA", not a bare reset), then fail.
                with contextlib.suppress(OSError, ConnectionError):
                    await self._flush()
                raise
            await self._flush()
            return

    def peer_went_away(self) -> bool:
        """Between two exchanges: has the peer closed (FIN) or sent anything (a close_notify) unasked?

        An idle keep-alive connection that the server closed must not be reused for the next request.
        """
        if self._incoming.pending:
            return True
        reader = self._reader
        return reader.at_eof() or bool(getattr(reader, "_buffer", b""))

    @property
    def alpn(self) -> str | None:
        return self._ssl.selected_alpn_protocol()

    async def recv(self, size: int = READ_SIZE) -> bytes:
        """Up to `size` decrypted bytes; b"" at the end (close_notify or a TCP close without it).

        Every TLS record already received is decrypted in one call (SSLObject.read stops at a record,
        16 KiB at most): fewer, larger chunks for the HTTP layer above.
        """
        while True:
            try:
                data = self._ssl.read(size)
            except ssl.SSLWantReadError:
                await self._flush()  # a TLS 1.3 key update may need an answer
                await self._fill()
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""
            if data and len(data) < size and self._incoming.pending:
                parts = [data]
                got = len(data)
                while got < size and self._incoming.pending:
                    try:
                        more = self._ssl.read(size - got)
                    except ssl.SSLError:  # WantRead (a partial record) or the end: next call sees it
                        break
                    if not more:
                        break
                    parts.append(more)
                    got += len(more)
                data = b"".join(parts)
            if self._outgoing.pending:
                await self._flush()
            return data

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                written = self._ssl.write(view)
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
                continue
            view = view[written:]
            await self._flush()

    async def close_notify(self) -> None:
        """Say "no more data" in TLS (close_notify) and in TCP (FIN); reading stays possible."""
        with contextlib.suppress(ssl.SSLError, OSError, ConnectionError):
            self._ssl.unwrap()
        with contextlib.suppress(ssl.SSLError, OSError, ConnectionError):
            await self._flush()
        with contextlib.suppress(OSError, ConnectionError, RuntimeError):
            if self._writer.can_write_eof():
                self._writer.write_eof()

    async def close(self) -> None:
        """Send close_notify (best effort) and close the TCP stream."""
        await self.close_notify()
        self.abort_quietly(graceful=True)

    async def drain_raw(self, seconds: float, limit: int) -> None:
        """Read and drop raw bytes for up to `seconds` / `limit` bytes, or until the peer closes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        drained = 0
        with contextlib.suppress(OSError, ConnectionError, asyncio.TimeoutError):
            while drained < limit:
                left = deadline - loop.time()
                if left <= 0:
                    break
                data = await asyncio.wait_for(self._reader.read(READ_SIZE), left)
                if not data:
                    break
                drained += len(data)

    def abort_quietly(self, *, graceful: bool = False) -> None:
        """Close the TCP stream now (graceful: FIN after what is queued; else RST, nothing more sent)."""
        transport = self._writer.transport
        if graceful:
            self._writer.close()
        else:
            transport.abort()
