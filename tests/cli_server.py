"""`sandlot serve` (the CLI's entry point, so /mcp is mounted) in a subprocess, with keys from `sandlot keys`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional


from .serverproc import end_left_sandboxes, free_port, read_log, terminate, wait_healthy

SCRIPT = Path(sys.executable).with_name("sandlot")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "sandlot.cli"]
CHECKOUT = Path(__file__).resolve().parents[1]  # the sandlot package under test, whatever the venv installed


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any SANDLOT_API_* of the caller's, plus ``extra``; the checkout's sandlot first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDLOT_API")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CHECKOUT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


class CliServer:
    def __init__(self, workdir: Path) -> None:
        self.db = workdir / "sandlot.db"
        self.log_path = workdir / "serve.log"
        self.port = free_port()
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def key(self, tenant: str) -> str:
        r = subprocess.run(COMMAND + ["keys", "create", "--tenant", tenant, "--db", str(self.db), "--json"],
                           capture_output=True, text=True, env=clean_env(), timeout=60)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["key"]

    def start(self, *args: str, timeout: float = 60) -> "CliServer":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(COMMAND + ["serve", "--port", str(self.port), "--db", str(self.db),
                                                    "--log-level", "warning", *args],
                                         stdout=log, stderr=subprocess.STDOUT, env=clean_env())
        wait_healthy(self.proc, self.url, self.log, "sandlot serve", timeout)
        return self

    def log(self) -> str:
        return read_log(self.log_path)

    def stop(self) -> None:
        terminate(self.proc)
        end_left_sandboxes(self.db)
