"""Durable sessions bench (issue #12): what taking back a sandbox that outlived its owner's process costs.

    sudo .venv/bin/python bench/durable.py [--sandboxes 10]

A child process (a durable engine, as a server's) makes N process-tier sandboxes, sets a variable in each
and prints their records; it is then killed with SIGKILL. This process takes each back (``Engine.adopt``,
timed: pid 1 proven by its cgroup, its channel taken with pidfd_getfd, a ping) and runs one cell in it
(the first call after re-adoption, timed), then kills it. Prints p50 and p95 of both, and the load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import asyncio, json, sys, time
from sandlot._engine import Engine
from sandlot._spec import SandboxSpec

async def main(n):
    engine = Engine(durable=True)
    for i in range(n):
        sb = await engine.create(SandboxSpec.build("python", isolation="process", limits={"lifetime": 300}))
        await sb.run_code(f"x = {i}")
        print(json.dumps(sb.backend_sandbox.describe()), flush=True)
    print("done", flush=True)
    time.sleep(600)

asyncio.run(main(int(sys.argv[1])))
"""


def percentile(values: list, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def take_back(records: list) -> tuple[list, list]:
    from sandlot._engine import Engine
    from sandlot._spec import SandboxSpec

    engine = Engine(durable=True)
    adopt_ms, first_call_ms = [], []
    for i, record in enumerate(records):
        start = time.perf_counter()
        sandbox = await engine.adopt(record, SandboxSpec.build("python", isolation="process"), time.time() + 60)
        adopt_ms.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        execution = await sandbox.run_code("x")
        first_call_ms.append((time.perf_counter() - start) * 1000)
        assert execution.text == str(i), execution
        await sandbox.kill()
    await engine.shutdown()
    return adopt_ms, first_call_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sandboxes", type=int, default=10)
    args = parser.parse_args()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(args.sandboxes)], stdout=subprocess.PIPE, text=True,
                             cwd=ROOT)
    records = []
    assert child.stdout is not None
    for line in child.stdout:
        if line.strip() == "done":
            break
        records.append(json.loads(line))
    child.kill()  # SIGKILL: its sandboxes outlive it
    child.wait()
    adopt_ms, first_call_ms = asyncio.run(take_back(records))
    print(f"load {os.getloadavg()[0]:.2f}  {len(records)} sandboxes outlived their owner (kill -9)")
    for name, values in (("adopt", adopt_ms), ("first run_code after", first_call_ms)):
        print(f"{name:>22}: p50 {statistics.median(values):7.1f} ms  p95 {percentile(values, 0.95):7.1f} ms")


if __name__ == "__main__":
    main()
