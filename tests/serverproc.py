"""A real Sandlot server in a subprocess on a free loopback port, for the server and remote-SDK tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import httpx

from sandlot import server as sandlot_server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, log, name: str, timeout: float) -> None:
    """Until ``url``/healthz answers 200; a process that exits first fails with its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log()}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{name} did not come up:\n{log()}")


def read_log(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def terminate(proc: Optional[subprocess.Popen]) -> None:
    """SIGTERM (a server shuts down cleanly on it), then SIGKILL after 30 s."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def end_left_sandboxes(db_path: Path) -> int:
    """End what a stopped server left running. Its durable sandboxes run on until their lifetime, for the next
    server on its database to take back (by design): a test's server has no next one. Returns how many."""
    import sqlite3

    from sandlot._host import cgroups

    if not Path(db_path).exists():
        return 0
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        ids = {row[0] for row in db.execute("SELECT id FROM sandboxes WHERE status = 'running'")}
    except sqlite3.Error:
        ids = set()
    finally:
        db.close()
    return cgroups.remove_named(ids) if ids else 0


class ServerProcess:
    def __init__(self, db_path: Path, *args: str, port: Optional[int] = None, env: Optional[dict] = None) -> None:
        self.db_path = Path(db_path)
        self.args = args
        self.port = port or free_port()
        self.env = env
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = self.db_path.with_suffix(".log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def key(self, tenant: str, **quotas) -> str:
        """A new API key for ``tenant`` (created on demand), straight through the store, as the CLI does."""
        key = sandlot_server.create_key(tenant, self.db_path)
        if quotas:
            sandlot_server.set_quotas(tenant, self.db_path, **quotas)
        return key

    def start(self, timeout: float = 60) -> "ServerProcess":
        env = dict(os.environ if self.env is None else self.env)
        env.pop("SANDLOT_API_URL", None)  # the server runs its sandboxes locally whatever the test set
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sandlot.server", "--port", str(self.port), "--db", str(self.db_path),
             "--log-level", "warning", *self.args], stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        wait_healthy(self.proc, self.url, self.log, "server", timeout)
        return self

    def wait_warm(self, key: str, timeout: float = 60) -> None:
        """Until the preloaded zygote answers (the first sandbox pays for importing numpy, pandas...)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = httpx.post(self.url + "/v1/run", json={"code": "1"}, headers={"Authorization": f"Bearer {key}"},
                           timeout=timeout)
            if r.status_code == 200:
                return
            time.sleep(0.2)
        raise RuntimeError("server never ran code")

    def log(self) -> str:
        return read_log(self.log_path)

    def stop(self) -> None:
        terminate(self.proc)
        end_left_sandboxes(self.db_path)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (by parent links in /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0
