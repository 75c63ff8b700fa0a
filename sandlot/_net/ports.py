"""Reaching a sandbox's own servers from the host: ``sb.get_url(port)``.

A server the code starts in the sandbox listens inside the sandbox's network namespace, which nothing
outside can reach. Each tier opens the connection its own way (``BackendSandbox.open_port``): the host tiers
*inside* that namespace (``connect_inside``: a socket created there, connected to 127.0.0.1:PORT), the
kubernetes tier to the pod's address over the pod network (``connect_address``). Bytes are carried between it
and:

- locally, a listener on the host's 127.0.0.1 (``PortForwarder``): the URL is ``http://127.0.0.1:P/``; it
  carries any TCP protocol (HTTP, WebSocket, a database) for as long as the sandbox lives;
- on a server, one HTTP request at a time (``proxy_request``): ``/v1/sandboxes/{id}/ports/{port}/...``
  behind the server's own API-key check; the request goes to the sandbox's server as HTTP/1.1 (h11)
  and the answer streams back.

On the host tiers only the sandbox's loopback is reached: its server must listen on 127.0.0.1 or 0.0.0.0; a
pod's server is reached at the pod's address: it must listen on 0.0.0.0 (or ::).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator, Awaitable, Callable, Iterable, Optional

import h11

from .._exceptions import InvalidRequest, SandlotError

CHUNK = 64 * 1024
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade", "host", "content-length", "authorization"}


Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
# Opens one new connection to the sandbox's port (a tier's BackendSandbox.open_port, the port bound).
Connect = Callable[[], Awaitable[Streams]]


class PortUnreachable(SandlotError):
    """Nothing listens on that port inside the sandbox (yet)."""

    http_status = 502


def check_port(port: object) -> int:
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise InvalidRequest(f"port must be a whole number 1-65535, got {port!r}")
    return port


async def connect_inside(pid: int, port: int) -> Streams:
    """Port ``port`` on the loopback of the network namespace of host process ``pid`` (the host tiers)."""
    from .netns import open_connection_inside

    try:
        sock = await asyncio.to_thread(open_connection_inside, pid, port)
    except OSError as exc:
        raise PortUnreachable(f"nothing answers on port {port} inside the sandbox ({exc.strerror or exc}); "
                              "its server must listen on 127.0.0.1 or 0.0.0.0") from None
    return await asyncio.open_connection(sock=sock, limit=CHUNK)


async def connect_address(host: str, port: int, timeout: float) -> Streams:
    """Port ``port`` at ``host`` over the network (a pod's address), connected within ``timeout`` seconds."""
    try:
        return await asyncio.wait_for(asyncio.open_connection(host, port, limit=CHUNK), timeout)
    except asyncio.TimeoutError:
        raise PortUnreachable(f"no answer from port {port} of the sandbox at {host} within {timeout:g} s: its pod is "
                              "gone, or a NetworkPolicy drops the connection (Sandlot's manifests let the server's "
                              "pods reach every TCP port of a sandbox pod)") from None
    except OSError as exc:
        everywhere = "::" if ":" in host else "0.0.0.0"  # an IPv6 pod address: the server must listen on IPv6
        raise PortUnreachable(f"nothing answers on port {port} of the sandbox at {host} ({exc.strerror or exc}); "
                              f"its server must listen on {everywhere} (all the pod's addresses)") from None


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            if writer.can_write_eof():
                writer.write_eof()


class PortForwarder:
    """A listener on the host's 127.0.0.1 for one port of one sandbox, open until ``close()``."""

    def __init__(self, connect: Connect, port: int) -> None:
        self.connect, self.port = connect, port
        self._server: Optional[asyncio.AbstractServer] = None
        self._conns: set[asyncio.Task] = set()
        self.url = ""

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        host_port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{host_port}/"
        return self.url

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conns.add(task)
        try:
            try:
                inner_reader, inner_writer = await self.connect()
            except SandlotError:
                writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            try:
                await asyncio.gather(_pump(reader, inner_writer), _pump(inner_reader, writer))
            finally:
                inner_writer.close()
        finally:
            writer.close()
            if task is not None:
                self._conns.discard(task)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> object:
    """The next h11 event of the sandbox server's answer, reading more bytes as h11 asks."""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await reader.read(CHUNK))


async def proxy_request(connect: Connect, port: int, method: str, target: str, headers: Iterable[tuple[str, str]],
                        body: AsyncIterator[bytes]) -> tuple[int, list[tuple[str, str]], AsyncIterator[bytes]]:
    """One HTTP request to the sandbox's server; its status, headers and a stream of its body. The
    caller's credentials (Authorization) and hop-by-hop headers are not passed on; the body keeps the
    framing it came with (a length, chunks, or none)."""
    headers = list(headers)
    names = {k.lower(): v for k, v in headers}
    if "content-length" in names:
        framing = [("Content-Length", names["content-length"])]
    elif "chunked" in names.get("transfer-encoding", "").lower():
        framing = [("Transfer-Encoding", "chunked")]
    else:
        framing = []
    reader, writer = await connect()
    conn = h11.Connection(h11.CLIENT)
    forwarded = [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]
    request = h11.Request(method=method, target=target or "/",
                          headers=[("Host", f"127.0.0.1:{port}"), ("Connection", "close")] + framing + forwarded)
    try:
        writer.write(conn.send(request))
        async for chunk in body:
            if chunk:
                writer.write(conn.send(h11.Data(data=chunk)))
                await writer.drain()
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()
        while True:
            event = await _next_event(conn, reader)
            if isinstance(event, h11.Response):
                break
            if isinstance(event, h11.ConnectionClosed):
                raise PortUnreachable(f"the server on port {port} closed the connection without answering")
    except h11.RemoteProtocolError as exc:
        writer.close()
        raise PortUnreachable(f"the server on port {port} did not answer in HTTP/1.1: {exc}") from None
    except ConnectionError as exc:  # it reset the connection before answering: a bad gateway too
        writer.close()
        raise PortUnreachable(f"the server on port {port} cut the connection without answering ({exc})") from None
    except BaseException:
        writer.close()
        raise
    response_headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers
                        if k.decode("latin-1").lower() not in HOP_BY_HOP]

    async def stream() -> AsyncIterator[bytes]:
        try:
            while True:
                ev = await _next_event(conn, reader)
                if isinstance(ev, h11.Data):
                    yield bytes(ev.data)
                elif isinstance(ev, (h11.EndOfMessage, h11.ConnectionClosed)):
                    return
        except h11.RemoteProtocolError:
            return
        finally:
            writer.close()

    return event.status_code, response_headers, stream()
