"""Boot of a zygote-forked sandbox, A/B (issue #11, lever 4): wall and CPU per sandbox of two checkouts.

    sudo .venv/bin/python bench/boot_fork.py --base /tmp/sandlot-base [--n 30] [--rounds 4]
    sudo .venv/bin/python bench/boot_fork.py --micro [--n 100]

``--base``: another checkout of Sandlot (``git archive COMMIT | tar -x -C DIR``), the "A" side; "B" is this
one. Each round runs one worker per side, in alternating order (so load drifts hit both alike). A worker has
no warm pool (``configure_pool("python", min_ready=0)``): every sandbox is a direct fork of the zygote. After
a warm-up (the zygote's start), it times N times ``Sandbox()`` (create), ``run_code("1")`` and ``kill()``.
CPU is everything the worker's cgroup (cpuacct, v1) was charged meanwhile: the host process, the keeper, the
zygote, and every sandbox (their cgroups are made below the worker's own). Prints medians per side, and the
load.

``--micro``: the fork path alone, in one process that imports the data-science preload as a zygote does:
interleaved, (A) fork, unshare the user namespace, maps written by the parent, unshare the other namespaces,
fork pid 1 (the outer process exits), against (B) pid 1 born in all of them at once (linux.fork_into), maps
written by the parent. Timed from the fork to pid 1's word that it runs (wall), and the CPU of the whole
tree (cpuacct) per fork, teardown included (each pid 1 exits at once).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPUACCT = Path("/sys/fs/cgroup/cpuacct")

WORKER = r"""
import json, os, sys, time
from pathlib import Path

cg = Path(sys.argv[2])
(cg / "cgroup.procs").write_text(str(os.getpid()))  # before anything starts: the zygote inherits it
import sandlot

def usage():
    return int((cg / "cpuacct.usage").read_text()), int((cg / "cpuacct.usage_user").read_text())

sandlot.configure_pool("python", min_ready=0)
for _ in range(3):  # the zygote starts on the first
    sb = sandlot.Sandbox(isolation="process"); sb.run_code("1"); sb.kill()
time.sleep(0.5)
n = int(sys.argv[1])
creates, totals = [], []
cpu0, user0 = usage()
for _ in range(n):
    t0 = time.perf_counter()
    sb = sandlot.Sandbox(isolation="process")
    t1 = time.perf_counter()
    sb.run_code("1")
    sb.kill()
    t2 = time.perf_counter()
    creates.append(t1 - t0)
    totals.append(t2 - t0)
time.sleep(0.5)  # the kills' teardown, in the background, is charged too
cpu1, user1 = usage()
print(json.dumps({"file": sandlot.__file__, "create": creates, "total": totals,
                  "cpu_ms": (cpu1 - cpu0) / 1e6 / n, "user_ms": (user1 - user0) / 1e6 / n}))
"""


def run_worker(tree: Path, n: int) -> dict:
    cg = CPUACCT / f"sandlot-bootfork-{os.getpid()}-{time.monotonic_ns()}"
    cg.mkdir()
    try:
        out = subprocess.run([sys.executable, "-c", WORKER, str(n), str(cg)], cwd=tree, env=dict(
            os.environ, PYTHONPATH=str(tree)), check=True, capture_output=True, text=True, timeout=600).stdout
        return json.loads(out.strip().splitlines()[-1])
    finally:
        for _ in range(50):  # the worker's keeper and zygote die with it, a moment later
            try:
                for sub in sorted(cg.rglob("*"), reverse=True):
                    if sub.is_dir():
                        sub.rmdir()
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.1)


MICRO = r"""
import json, os, sys, time
from pathlib import Path

cg = Path(sys.argv[2])
(cg / "cgroup.procs").write_text(str(os.getpid()))
sys.path.insert(0, sys.argv[3])
from _agent import linux
import numpy, pandas, matplotlib.pyplot, scipy, sklearn  # noqa: F401  (the zygote's image)

OTHERS = linux.CLONE_NEWNS | linux.CLONE_NEWNET | linux.CLONE_NEWIPC | linux.CLONE_NEWUTS | linux.CLONE_NEWPID
MAPS = b"0 0 1\n"

def write_maps(pid):
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/{pid}/{name}", "wb") as f:
            f.write(MAPS)

def outer_then_pid1():
    go_r, go_w = os.pipe(); up_r, up_w = os.pipe(); ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        linux.unshare(linux.CLONE_NEWUSER)
        os.write(up_w, b"u"); os.read(go_r, 1)
        linux.unshare(OTHERS | linux.CLONE_NEWCGROUP)
        if os.fork() == 0:
            os.write(ready_w, b"r"); os._exit(0)
        os._exit(0)
    os.read(up_r, 1); write_maps(pid); os.write(go_w, b"g")
    os.read(ready_r, 1)
    ready = time.perf_counter()
    for fd in (go_r, go_w, up_r, up_w, ready_r, ready_w):
        os.close(fd)
    os.waitpid(pid, 0)
    return ready

def born_pid1():
    go_r, go_w = os.pipe(); ready_r, ready_w = os.pipe()
    pid = linux.fork_into(linux.CLONE_NEWUSER | OTHERS)
    if pid == 0:
        os.read(go_r, 1)
        linux.unshare(linux.CLONE_NEWCGROUP)
        os.write(ready_w, b"r"); os._exit(0)
    write_maps(pid); os.write(go_w, b"g")
    os.read(ready_r, 1)
    ready = time.perf_counter()
    for fd in (go_r, go_w, ready_r, ready_w):
        os.close(fd)
    os.waitpid(pid, 0)
    return ready

def usage():
    return int((cg / "cpuacct.usage").read_text())

got = {"A": [], "B": [], "A_cpu": [], "B_cpu": []}
for i in range(int(sys.argv[1])):
    for side, fn in (("A", outer_then_pid1), ("B", born_pid1)) if i % 2 == 0 else (("B", born_pid1), ("A", outer_then_pid1)):
        c0 = usage(); t0 = time.perf_counter()
        t1 = fn()
        time.sleep(0.02)  # teardown of what exited, charged to the group
        got[side].append(t1 - t0); got[side + "_cpu"].append((usage() - c0) / 1e9)
print(json.dumps(got))
"""


def micro(n: int) -> None:
    cg = CPUACCT / f"sandlot-bootfork-micro-{os.getpid()}"
    cg.mkdir()
    try:
        print("load before:", os.getloadavg())
        out = subprocess.run([sys.executable, "-c", MICRO, str(n), str(cg), str(ROOT / "sandlot")], check=True,
                             stdout=subprocess.PIPE, text=True, timeout=600).stdout
        got = json.loads(out.strip().splitlines()[-1])
        for side, what in (("A", "fork, unshare, fork pid 1 (outer exits)"), ("B", "pid 1 born in its namespaces")):
            print(f"{side} {what}: to pid 1 running p50 {statistics.median(got[side]) * 1e3:.2f} ms, "
                  f"CPU p50 {statistics.median(got[side + '_cpu']) * 1e3:.2f} ms (n={len(got[side])})")
        print("load after:", os.getloadavg())
    finally:
        time.sleep(0.2)
        cg.rmdir()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--micro", action="store_true")
    ap.add_argument("--base", type=Path)
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    if args.micro:
        micro(args.n)
        return
    if args.base is None:
        ap.error("--base is required (or --micro)")
    sides = {"A": args.base.resolve(), "B": ROOT}
    got = {"A": [], "B": []}
    print("load before:", os.getloadavg())
    for r in range(args.rounds):
        for side in (("A", "B") if r % 2 == 0 else ("B", "A")):
            res = run_worker(sides[side], args.n)
            assert res["file"].startswith(str(sides[side])), res["file"]
            got[side].append(res)
            print(f"round {r} {side}: create p50 {statistics.median(res['create']) * 1e3:.1f} ms, "
                  f"create+run+kill p50 {statistics.median(res['total']) * 1e3:.1f} ms, "
                  f"CPU {res['cpu_ms']:.1f} ms/sandbox (user {res['user_ms']:.1f})", flush=True)
    for side in ("A", "B"):
        creates = [x for res in got[side] for x in res["create"]]
        totals = [x for res in got[side] for x in res["total"]]
        cpu = statistics.median(res["cpu_ms"] for res in got[side])
        user = statistics.median(res["user_ms"] for res in got[side])
        print(f"{side} ({sides[side]}): create p50 {statistics.median(creates) * 1e3:.1f} ms, "
              f"create+run+kill p50 {statistics.median(totals) * 1e3:.1f} ms, "
              f"CPU per sandbox {cpu:.1f} ms (user {user:.1f}), n={len(totals)}")
    print("load after:", os.getloadavg())


if __name__ == "__main__":
    main()
