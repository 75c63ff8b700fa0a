"""A throwaway network namespace made the way a sandbox's is: a process in a new user + net namespace.

``with NetnsHolder() as pid:`` gives the pid whose /proc/<pid>/ns/net is a fresh, empty namespace (only a
down lo) owned by a new user namespace; when the block ends the holder exits and the namespace is gone.
Nothing is bind-mounted, nothing persists.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time


def netns_problem() -> str | None:
    """Why this machine cannot run the netns tests, or None."""
    for tool in ("unshare", "nsenter", "ip", "nft"):
        if shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin") is None:
            return f"`{tool}` is not installed"
    if os.geteuid() != 0:
        return "entering another process's network namespace needs root here"
    return None


class NetnsHolder:
    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> int:
        # unshare execs cat (no --fork): the Popen pid is the holder itself, inside the namespaces; it
        # ends at EOF on stdin, i.e. when we close it or when this process dies.
        self.proc = subprocess.Popen(["unshare", "--user", "--map-root-user", "--net", "cat"],
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        mine = os.stat("/proc/self/ns/net").st_ino
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if os.stat(f"/proc/{self.proc.pid}/ns/net").st_ino != mine:
                    return self.proc.pid
            except FileNotFoundError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.01)
        self.__exit__()
        raise RuntimeError("the namespace holder did not start")

    def __exit__(self, *exc) -> None:
        if self.proc is None:
            return
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


class LoopInNamespace:
    """An asyncio loop on a thread that enters a network namespace (``ns_path``) for its whole life.

    The broker stands for the host; in tests the "host" is the lab namespace (tests/netlab.py), so the
    broker's upstream dials and DNS queries can reach only the fake internet. The thread is never
    reused: it ends with the loop.
    """

    def __init__(self, ns_path: str) -> None:
        import asyncio
        import threading

        from sandlot._net import netns

        self.loop = asyncio.new_event_loop()
        ready: dict = {}
        started = threading.Event()

        def main() -> None:
            try:
                fd = os.open(ns_path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    netns._setns(fd)
                finally:
                    os.close(fd)
            except OSError as e:
                ready["error"] = e
                started.set()
                return
            asyncio.set_event_loop(self.loop)
            started.set()
            self.loop.run_forever()
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

        self.thread = threading.Thread(target=main, name="netns-loop", daemon=True)
        self.thread.start()
        started.wait()
        if "error" in ready:
            raise ready["error"]

    def run(self, coro, timeout: float = 30):
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn, *args):
        """fn(*args) on the loop's thread (in the namespace); its result."""
        async def call():
            return fn(*args)
        return self.run(call())

    def close(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
