"""A loopback TCP port forwarded to a Unix socket bound in from the host.

The apt step of a build has no network of its own: apt's HTTP proxy is 127.0.0.1:PROXY_PORT here,
and each connection to it is carried to the host's allowlisting proxy (sandlot/_host/egress.py)
over the Unix socket. Stdlib only; daemon threads of pid 1, which runs no user code.
"""

from __future__ import annotations

import socket
import threading

PROXY_PORT = 3142


def forward_loopback(unix_path: str, port: int = PROXY_PORT) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(64)
    threading.Thread(target=_accept, args=(listener, unix_path), daemon=True).start()


def _accept(listener: socket.socket, unix_path: str) -> None:
    while True:
        client, _ = listener.accept()
        threading.Thread(target=_carry, args=(client, unix_path), daemon=True).start()


def _carry(client: socket.socket, unix_path: str) -> None:
    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        upstream.connect(unix_path)
    except OSError:
        client.close()
        upstream.close()
        return
    splice(client, upstream)
    client.close()
    upstream.close()


def splice(a: socket.socket, b: socket.socket) -> None:
    """Copy both ways until both directions are done (the host's egress proxy uses it too)."""
    other = threading.Thread(target=_pump, args=(b, a), daemon=True)
    other.start()
    _pump(a, b)
    other.join()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
            try:
                s.shutdown(how)
            except OSError:
                pass
