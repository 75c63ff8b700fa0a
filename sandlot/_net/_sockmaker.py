"""Make sockets from a list of specs; also a script that makes them and hands them over a Unix socket.

Stdlib only and free of package imports: netns.py calls make_sockets() on a thread that entered a
sandbox's network namespace (root), and runs this file as a helper process under
``nsenter --user --net`` (rootless: a process may not setns() a thread into a namespace whose owner it
only owns, but a single-threaded helper may enter the user namespace first), which sends the descriptors
back with SCM_RIGHTS.

A spec is [family, type, host or None, port or None, listen: bool].
"""

from __future__ import annotations

import json
import socket
import sys


def make_sockets(specs: list) -> list[socket.socket]:
    made: list[socket.socket] = []
    try:
        for family, type_, host, port, listen in specs:
            s = socket.socket(family, type_)
            made.append(s)
            if host is not None:
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((host, port))
            if listen:
                s.listen(1024)
        return made
    except BaseException:
        for s in made:
            s.close()
        raise


def _main(specs_json: str, channel_fd: int) -> int:
    channel = socket.socket(fileno=channel_fd)
    try:
        made = make_sockets(json.loads(specs_json))
    except OSError as e:
        channel.sendall(json.dumps({"error": str(e), "errno": e.errno}).encode())
        return 1
    socket.send_fds(channel, [b"{}"], [s.fileno() for s in made])
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1], int(sys.argv[2])))
