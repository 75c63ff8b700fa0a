"""Hibernate bench (issue #12): what a pause (checkpoint to disk), a wake (restore) and a fork cost on the gVisor tier.

    sudo .venv/bin/python bench/hibernate.py [--rounds 5]

For a bare session and one that imported pandas (and made a small DataFrame), one sandbox each, paused and
woken ``--rounds`` times: p50 and p95 of the pause's seconds and checkpoint bytes (from ``pause()``), and of
the wake: the wall time of the first call after the pause (``run_code``: restore plus the call), with
``resume()``'s own seconds beside it; and of ``fork()`` (the copy made and answering; the copy is killed).
Prints /proc/loadavg before and after: the figures move with the load.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def percentile(values: list, q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q * (len(ordered) - 1))))]


def measure(rounds: int, setup: str) -> dict:
    import sandlot

    figures: dict = {"pause_s": [], "bytes": [], "resume_s": [], "wake_call_s": [], "fork_s": []}
    with sandlot.Sandbox(isolation="gvisor", limits={"memory": "1G"}) as sandbox:
        ex = sandbox.run_code(setup)
        assert ex.error is None, ex.error
        for _ in range(rounds):
            info = sandbox.pause()
            figures["pause_s"].append(info.seconds)
            figures["bytes"].append(info.checkpoint_bytes)
            start = time.perf_counter()
            assert sandbox.run_code("kept").text == "1"  # the call wakes it
            figures["wake_call_s"].append(time.perf_counter() - start)
            sandbox.pause()
            figures["resume_s"].append(sandbox.resume().seconds)
            start = time.perf_counter()
            copy = sandbox.fork()
            assert copy.run_code("kept").text == "1"
            figures["fork_s"].append(time.perf_counter() - start)
            copy.kill()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    print(f"loadavg before: {Path('/proc/loadavg').read_text().strip()}  rounds={args.rounds}", flush=True)
    cases = [("bare session", "kept = 1"),
             ("pandas imported", "import pandas as pd\ndf = pd.DataFrame({'a': range(1000)})\nkept = 1")]
    for label, setup in cases:
        f = measure(args.rounds, setup)
        mib = [b / 1024**2 for b in f["bytes"]]
        print(f"  {label:16s} pause p50 {statistics.median(f['pause_s']):5.2f} s p95 {percentile(f['pause_s'], .95):5.2f} s"
              f" | checkpoint p50 {statistics.median(mib):6.1f} MiB p95 {percentile(mib, .95):6.1f} MiB"
              f" | resume p50 {statistics.median(f['resume_s']):5.2f} s p95 {percentile(f['resume_s'], .95):5.2f} s"
              f" | first call after pause p50 {statistics.median(f['wake_call_s']):5.2f} s"
              f" p95 {percentile(f['wake_call_s'], .95):5.2f} s"
              f" | fork p50 {statistics.median(f['fork_s']):5.2f} s p95 {percentile(f['fork_s'], .95):5.2f} s", flush=True)
    print(f"loadavg after: {Path('/proc/loadavg').read_text().strip()}")


if __name__ == "__main__":
    main()
