"""The server's state store: what one call costs on SQLite and on PostgreSQL (a throwaway local server from
Debian's package, as the tests start it), interleaved in one run so both see the same load.

    .venv/bin/python bench/store.py [--rounds 5] [--calls 500]

Calls: authenticate (every request makes one: a read), audit (most requests make one: a write), and
add_sandbox + end_sandbox (every sandbox, its tenant's rows counted for a quota in the same transaction). Median over the
rounds of the mean per call, in microseconds. PostgreSQL is on loopback here: across a network, add the
round trip (one per read, about three per write).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sandlot.server import Store  # noqa: E402
from tests.postgres import PostgresServer, why_not  # noqa: E402

LIMITS = {"memory": 256 * 1024**2, "pids": 64}


def per_call(fn, calls: int) -> float:
    started = time.perf_counter()
    for i in range(calls):
        fn(i)
    return (time.perf_counter() - started) / calls * 1e6


def round_of(store, calls: int) -> dict[str, float]:
    key = store.create_key("bench")
    tenant = store.authenticate(key)
    prefix = uuid.uuid4().hex[:8]

    def add_end(i: int) -> None:
        now = time.time()
        store.add_sandbox(f"sb-{prefix}-{i}", tenant, "python", {"job": "bench"}, LIMITS, now, now + 60,
                          check=lambda counts: None)
        store.end_sandbox(f"sb-{prefix}-{i}", "ended", "bench")

    return {"authenticate": per_call(lambda i: store.authenticate(key), calls),
            "audit": per_call(lambda i: store.audit("bench", "run_code", None, "print(1)", tenant.key_id), calls),
            "add_sandbox+end_sandbox": per_call(add_end, calls // 5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=500)
    args = parser.parse_args()
    if why_not():
        sys.exit(why_not())
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    server = PostgresServer().start()
    workdir = tempfile.mkdtemp(prefix="sandlot-bench-store-")
    try:
        stores = {"sqlite": Store(Path(workdir) / "sandlot.db"), "postgresql": Store(server.new_database())}
        results: dict[str, dict[str, list[float]]] = {name: {} for name in stores}
        for _ in range(args.rounds):
            for name, store in stores.items():  # interleaved: both backends see the same load
                for call, micros in round_of(store, args.calls).items():
                    results[name].setdefault(call, []).append(micros)
        for store in stores.values():
            store.close()
        print(f"{'call':26} {'sqlite µs':>10} {'postgresql µs':>14}")
        for call in results["sqlite"]:
            print(f"{call:26} {statistics.median(results['sqlite'][call]):10.0f} "
                  f"{statistics.median(results['postgresql'][call]):14.0f}")
        print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    finally:
        server.stop()
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
