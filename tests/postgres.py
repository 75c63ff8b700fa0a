"""A throwaway PostgreSQL for the tests, from Debian's package (apt: postgresql; scripts/setup installs it).

``PostgresServer().start()`` runs initdb into a fresh directory under /tmp and starts the server there on a
free loopback port (trust authentication, fsync off: it holds nothing worth keeping), as the ``postgres``
system user when the tests run as root (initdb refuses root). ``new_database()`` gives each test an empty
database's URL; ``stop_only()``/``start_again()`` restart it on its data; ``stop()`` stops it (pg_ctl, else a
SIGKILL to the postmaster it started) and removes its directory. The ``postgres_server`` fixture (one per test
module that imports it) skips, with its reason, only where the binaries are missing (or, as root, the
``postgres`` user); ``pg_url`` is a fresh database on it.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Iterator, Optional

import pytest

from .serverproc import free_port


def binaries() -> Optional[Path]:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb and pg_ctl (Debian 12: 15, Debian 13: 17)."""
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")
             if Path(p).with_name("pg_ctl").exists()]
    version = lambda path: [int(n) for n in re.findall(r"\d+", path.parent.name)] or [0]  # noqa: E731
    return max(found, key=version) if found else None


def why_not() -> Optional[str]:
    if binaries() is None:
        return "PostgreSQL is not installed (apt-get install postgresql: /usr/lib/postgresql/*/bin/initdb)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run initdb as (Debian's package makes it)"
    return None


class PostgresServer:
    def __init__(self) -> None:
        self.bin = binaries()
        self.port = free_port()
        self.dir: Optional[Path] = None
        self.postmaster: Optional[int] = None

    def _run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        return subprocess.run(prefix + list(argv), capture_output=True, text=True, timeout=timeout,
                              cwd=self.dir, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"})

    def start(self) -> "PostgresServer":
        assert self.bin is not None
        self.dir = Path(tempfile.mkdtemp(prefix="sandlot-pg-"))  # under /tmp: the postgres user can reach it
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
        out = self._run(str(self.bin / "initdb"), "-D", str(self.dir / "data"), "-U", "postgres", "--auth=trust",
                        "-E", "UTF8", "--no-locale", "--no-sync")
        assert out.returncode == 0, f"initdb failed:\n{out.stdout}\n{out.stderr}"
        return self.start_again()

    def start_again(self) -> "PostgresServer":
        """Start the server on its data directory (after ``stop_only``: a restart, as an operator's)."""
        data = self.dir / "data"
        options = (f"-k {self.dir} -p {self.port} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c full_page_writes=off -c max_connections=200")  # fsync off: only an OS crash loses data
        out = self._run(str(self.bin / "pg_ctl"), "-D", str(data), "-l", str(self.dir / "log"), "-w", "-t", "60",
                        "-o", options, "start")
        pid_file = data / "postmaster.pid"
        if pid_file.exists():
            self.postmaster = int(pid_file.read_text().split()[0])
        if out.returncode != 0:
            log = (self.dir / "log").read_text(errors="replace") if (self.dir / "log").exists() else ""
            self.stop()
            raise AssertionError(f"pg_ctl start failed:\n{out.stdout}\n{out.stderr}\n{log}")
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """An empty database of its own, for one test. -> its URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop_only(self) -> None:
        """Stop the server as a crash would (immediate: clients' connections are cut); its data stays."""
        if self.postmaster is not None:
            out = self._run(str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop")
            if out.returncode != 0:  # pg_ctl could not: end the postmaster it started (its children follow)
                try:
                    os.kill(self.postmaster, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.postmaster = None

    def stop(self) -> None:
        if self.dir is None:
            return
        self.stop_only()
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None


@pytest.fixture(scope="module")  # each module that imports it gets its own, stopped when the module is done
def postgres_server() -> Iterator[PostgresServer]:
    reason = why_not()
    if reason:
        pytest.skip(reason)
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> str:
    return postgres_server.new_database()
