"""Mounts bench (issue #9): what a host-directory grant or a volume adds to making a sandbox.

    sudo .venv/bin/python bench/mounts.py [--rounds 20] [--isolation process|gvisor] [--no-pool]

Each round makes a sandbox, runs ``1`` in it (so it has booted and answers) and kills it; p50 and p95 of
that, in one run, for: no mounts, a writable host directory at a new top-level target (/project: the
private shadow root), one under home (/home/user/p), and a volume. A sandbox with mounts never comes from
the warm pool, so ``--no-pool`` shows what the grant itself costs against a fresh boot without one. The
host directory and the volume are the bench's own (a temporary directory, a volume in a temporary data dir).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(rounds: int, **kwargs) -> list:
    import sandlot

    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        sandbox = sandlot.Sandbox(**kwargs)
        sandbox.run_code("1")
        times.append((time.perf_counter() - start) * 1000)
        sandbox.kill()
    return sorted(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--isolation", default="process")
    parser.add_argument("--no-pool", action="store_true", help="every sandbox boots fresh (SANDLOT_POOL_MIN=0)")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="sandlot-bench-mounts-")
    os.environ["SANDLOT_DATA_DIR"] = os.path.join(work, "data")
    if args.no_pool:
        os.environ["SANDLOT_POOL_MIN"] = "0"
    sys.path.insert(0, str(ROOT))
    import sandlot

    project = Path(work, "project")
    project.mkdir()
    os.chown(project, 1234, 1234)  # an ordinary user's directory
    sandlot.volumes.create("bench", "64M")
    cases = [("no mounts", {}), ("host dir at /project", {"/project": f"{project}:rw"}),
             ("host dir in home", {"/home/user/p": f"{project}:rw"}), ("volume", {"/cache": "vol:bench"})]
    measure(2, isolation=args.isolation)  # the zygote (and a pool) up first
    load = os.getloadavg()[0]
    print(f"isolation={args.isolation} rounds={args.rounds} pool={'off' if args.no_pool else 'on'} load={load:.2f}")
    try:
        for label, mounts in cases:
            times = measure(args.rounds, isolation=args.isolation, mounts=mounts or None)
            p95 = times[max(0, int(len(times) * 0.95) - 1)]
            print(f"  {label:22s} p50 {statistics.median(times):7.1f} ms   p95 {p95:7.1f} ms", flush=True)
    finally:
        sandlot.volumes.delete("bench")
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
