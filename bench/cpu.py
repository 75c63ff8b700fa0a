"""CPU per fresh sandbox: CPU seconds of everything a peer runs, divided by the sandboxes it made.

"Everything" is the calling process and all it starts: for Sandlot the SDK's threads, its zygote keepers and
zygotes, the warm pool's refills and the sandboxes (which Sandlot moves into cgroups of their own); for a
command peer its bwrap/runsc/python processes. A cgroup counts all of them where nothing else can: the bench
makes one, starts a child process inside it (``python bench/cpu.py --child ...``) and the child runs the peer.
Sandlot makes its per-sandbox cgroups below its own, so they are children of ours:

- cgroup v1 (cpuacct): a charge goes to the cgroup and all its ancestors at once, so the parent's
  ``cpuacct.usage`` keeps the CPU of sandboxes whose cgroups are gone (checked on this host: a child's
  0.30 s of CPU stayed in the parent's counter after ``rmdir``);
- cgroup v2: ``cpu.stat`` usage_usec includes descendants, dead ones included (rstat flushes them up).

The child also reports its ``RUSAGE_CHILDREN`` delta: for command peers it should agree with the cgroup; for
Sandlot it misses nearly everything (sandboxes are the keepers' children, not reaped by the bench), which is
why the cgroup is the figure.

One peer escapes: ``runsc do`` moves its sandbox into cgroups of its own, so for it (``cpu_counted_by =
"rusage"`` in peers.py) the figure is the caller's own CPU plus its ``RUSAGE_CHILDREN`` (runsc waits for its
sandbox). Sandlot's gVisor tier runs runsc with --ignore-cgroups: the cgroup counts it.

Method: warm up, wait until the cgroup is quiet (a warm pool refilled: under 5% of a core for half a second),
measure the idle CPU rate for a second, run ``n`` fresh sandboxes from 2 client threads, wait until quiet
again (the pool is back where it started: sandboxes made = sandboxes used), and read the counter. The figure
is (Δcgroup − idle rate × window) / n.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

ROOT = Path("/sys/fs/cgroup")
QUIET = 0.05  # cores: below this for QUIET_FOR seconds, the peer's background work (pool refills) is done
QUIET_FOR = 0.5
QUIET_MAX = 60.0  # seconds: a peer that never goes quiet is measured anyway (its idle rate says so)
THREADS = 2


def _own(controller: str) -> str:
    """This process's path in one v1 hierarchy ('' = the v2 one)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hid, controllers, path = line.split(":", 2)
        if (controller == "" and hid == "0") or controller in controllers.split(","):
            return path.lstrip("/")
    return ""


def counter_home() -> tuple:
    """(kind, directory under which the bench may make its cgroup) or (None, why not)."""
    v1 = ROOT / "cpuacct"
    if (v1 / "cpuacct.usage").exists():
        base = v1 / _own("cpuacct")
        return ("v1", base) if os.access(base, os.W_OK) else (None, f"{base} is not writable")
    if (ROOT / "cgroup.controllers").exists():
        base = ROOT / _own("")
        return ("v2", base) if os.access(base, os.W_OK) else (None, f"{base} is not writable")
    return None, "no cpuacct (v1) or cgroup v2 hierarchy"


def read_cpu(kind: str, cgroup: Path) -> tuple:
    """(total, user, system) CPU seconds of ``cgroup`` and all its descendants, living or gone."""
    if kind == "v1":
        total = int((cgroup / "cpuacct.usage").read_text()) / 1e9
        try:
            user = int((cgroup / "cpuacct.usage_user").read_text()) / 1e9
            system = int((cgroup / "cpuacct.usage_sys").read_text()) / 1e9
        except OSError:
            user = system = float("nan")
        return total, user, system
    stat = dict(line.split() for line in (cgroup / "cpu.stat").read_text().splitlines())
    return int(stat["usage_usec"]) / 1e6, int(stat["user_usec"]) / 1e6, int(stat["system_usec"]) / 1e6


def _remove_tree(top: Path, wait: float = 10.0) -> Optional[str]:
    """rmdir ``top`` and every cgroup below it, deepest first; retried while exiting processes leave."""
    deadline = time.monotonic() + wait
    while True:
        dirs = sorted((p for p, _, _ in os.walk(top)), key=lambda p: p.count("/"), reverse=True)
        left = []
        for d in dirs:
            try:
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError as e:
                left.append(f"{d}: {e.strerror}")
        if not left:
            return None
        if time.monotonic() > deadline:
            return "; ".join(left)
        time.sleep(0.2)


def measure(peer_name: str, code: str, expect: str, n: int, timeout: float = 600.0) -> dict:
    """Run ``n`` fresh sandboxes of ``peer_name`` in a child process inside a cgroup of our own; its report."""
    kind, base = counter_home()
    if kind is None:
        raise RuntimeError(f"no cgroup to count CPU in: {base}")
    cgroup = base / f"sandlot-bench-cpu-{os.getpid()}-{time.monotonic_ns()}"
    cgroup.mkdir()
    try:
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", kind, str(cgroup), peer_name,
                               code, expect, str(n)], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        if done.returncode != 0 or not done.stdout.strip():
            raise RuntimeError(f"exit {done.returncode}: {done.stderr.strip()[-300:]}")
        report = json.loads(done.stdout.strip().splitlines()[-1])
        if "error" in report:
            raise RuntimeError(report["error"])
        # The child has exited: what its sandboxes and helpers did on their way out is in the counter now.
        time.sleep(0.5)
        report["cpu_after_exit_s"] = read_cpu(kind, cgroup)[0] - report["cpu_at_start_s"]
        return report
    finally:
        left = _remove_tree(cgroup)
        if left:
            print(f"warning: cgroups left behind: {left}", file=sys.stderr)


def _settle(kind: str, cgroup: Path) -> None:
    """Wait until ``cgroup`` uses less than QUIET of a core over QUIET_FOR seconds (at most QUIET_MAX)."""
    deadline = time.monotonic() + QUIET_MAX
    while time.monotonic() < deadline:
        c0, t0 = read_cpu(kind, cgroup)[0], time.perf_counter()
        time.sleep(QUIET_FOR)
        if (read_cpu(kind, cgroup)[0] - c0) / (time.perf_counter() - t0) < QUIET:
            return


def _child(kind: str, cgroup: str, peer_name: str, code: str, expect: str, n: int) -> dict:
    top = Path(cgroup)
    (top / "cgroup.procs").write_text(str(os.getpid()))  # before anything starts: all we start is counted
    start_cpu = read_cpu(kind, top)[0]
    import peers
    import workloads as wl

    peer = next(cls() for cls in peers.ALL if cls.name == peer_name)
    peer.start()
    try:
        for _ in range(3):
            wl.check(peer.fresh(code), expect)
        _settle(kind, top)
        idle0, t_idle = read_cpu(kind, top)[0], time.perf_counter()
        time.sleep(1.0)
        idle_rate = (read_cpu(kind, top)[0] - idle0) / (time.perf_counter() - t_idle)

        c0, t0 = read_cpu(kind, top), time.perf_counter()
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        s0 = resource.getrusage(resource.RUSAGE_SELF)
        with ThreadPoolExecutor(THREADS) as pool:
            for out in pool.map(lambda _: peer.fresh(code), range(n)):
                wl.check(out, expect)
        busy = time.perf_counter() - t0
        _settle(kind, top)
        c1, t1 = read_cpu(kind, top), time.perf_counter()
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        s1 = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        peer.stop()
    window = t1 - t0
    rusage = lambda a, b: (b.ru_utime - a.ru_utime) + (b.ru_stime - a.ru_stime)  # noqa: E731
    if peer.cpu_counted_by == "rusage":
        cpu, method = rusage(s0, s1) + rusage(r0, r1), "caller + RUSAGE_CHILDREN"
    else:
        cpu, method = c1[0] - c0[0] - idle_rate * window, f"cgroup ({kind})"
    return {"n": n, "threads": THREADS, "kind": kind, "method": method, "cpu_at_start_s": start_cpu,
            "cpu_ms_per_sandbox": 1000 * cpu / n, "cgroup_ms_per_sandbox": 1000 * (c1[0] - c0[0]) / n,
            "user_ms_per_sandbox": 1000 * (c1[1] - c0[1]) / n, "sys_ms_per_sandbox": 1000 * (c1[2] - c0[2]) / n,
            "idle_cpu_ms_per_s": 1000 * idle_rate, "busy_s": busy, "window_s": window,
            "per_second": n / busy, "caller_ms_per_sandbox": 1000 * rusage(s0, s1) / n,
            "rusage_children_ms_per_sandbox": 1000 * rusage(r0, r1) / n}


if __name__ == "__main__":
    if len(sys.argv) == 8 and sys.argv[1] == "--child":
        kind, cgroup, peer_name, code, expect, n = sys.argv[2:]
        here = os.path.dirname(os.path.abspath(__file__))
        sys.path[:0] = [here, os.path.dirname(here)]  # bench's modules; the sandlot of this checkout, as run.py
        try:
            report = _child(kind, cgroup, peer_name, code, expect, int(n))
        except Exception as e:  # noqa: BLE001 - reported to the parent, which shows it in the table
            report = {"error": f"{type(e).__name__}: {e}"[:300]}
        sys.stdout.flush()
        print(json.dumps(report))
        sys.stdout.flush()
    else:
        sys.exit("usage: cpu.py --child KIND CGROUP PEER CODE EXPECT N (the bench runs this; see bench/run.py)")
