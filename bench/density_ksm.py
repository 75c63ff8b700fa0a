"""Density with and without KSM (issue #11, lever 7), A/B in one run: N idle pandas sessions, host memory each.

    sudo .venv/bin/python bench/density_ksm.py [--n 100] [--settle 300] [--pages 1000 --sleep 20] [--order off,private,on]

Per phase (KSM off: SANDLOT_KSM unset; on: SANDLOT_KSM=1, which marks the sandboxes mergeable and turns ksmd on
with Sandlot's budget, or --pages/--sleep): one sandbox first (its zygote starts, outside the figure), then N
live sessions that imported pandas, no warm pool (SANDLOT_POOL_MIN=0: only the N sessions count). With KSM on,
the bench then waits for ksmd to converge (pages shared grow < 1% over a full scan, at most --settle seconds).
Reported per session: host MemAvailable Δ (includes ksmd's own bookkeeping), PSS and USS of this process's tree;
ksmd's CPU (while merging, and idle-steady over 10 s after), pages shared and KSM's profit; every session must
answer 1+1. ksmd's knobs are written down first and put back at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import workloads as wl  # noqa: E402

from sandlot._host import ksm  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
TRACE = False


def ksmd_cpu_seconds() -> float:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(f"/proc/{entry}/comm").read_text().strip() == "ksmd":
                    fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime
            except OSError:
                continue
    return 0.0


RMAP_ITEM_BYTES = 64  # sizeof(struct ksm_rmap_item) on 64-bit: ksmd's bookkeeping per page it has scanned


def tree_kernel_extras(root: int) -> tuple:
    """(ksmd's rmap items, page-table bytes) of ``root`` and its descendants: memory the kernel holds for
    them that PSS does not show (MemAvailable does, with everything else the host does meanwhile)."""
    rmap = pte = 0
    for pid in wl.descendants(root):
        try:
            for line in Path(f"/proc/{pid}/ksm_stat").read_text().splitlines():
                if line.startswith("ksm_rmap_items"):
                    rmap += int(line.split()[1])
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmPTE:"):
                    pte += int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            continue
    return rmap, pte


def _rollup(pid: int) -> tuple:
    pss = uss = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key == "Pss":
            pss += int(rest.split()[0]) * 1024
        elif key in ("Private_Clean", "Private_Dirty"):
            uss += int(rest.split()[0]) * 1024
    return pss, uss


def per_role(sandbox_ids: list) -> dict:
    """Mean PSS and USS of a sandbox's agent (pid 1: the process whose parent is outside the sandbox) and of
    its session (the rest): what lever 5 (one process per sandbox) could save is about the agent's share."""
    members: dict = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cgroup = Path(f"/proc/{entry}/cgroup").read_text()
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            for sid in sandbox_ids:
                if f"/{sid}" in cgroup:
                    members.setdefault(sid, {})[int(entry)] = ppid
    sums = {"agent": [0, 0, 0], "session": [0, 0, 0]}
    for procs in members.values():
        for pid, ppid in procs.items():
            try:
                pss, uss = _rollup(pid)
            except (OSError, ValueError):
                continue
            role = sums["session" if ppid in procs else "agent"]
            role[0] += pss
            role[1] += uss
            role[2] += 1
    n = max(1, len(members))
    return {f"{role}_{kind}_mb": round(v[i] / n / 2**20, 2) for role, v in sums.items()
            for i, kind in ((0, "pss"), (1, "uss"))}


# Phase "private" (an experiment, no Sandlot change): instead of marking whole processes (PR_SET_MEMORY_MERGE,
# whose ksmd bookkeeping covers every page a fork maps), each session marks only the 64 KB runs that hold a page
# private to it (present, anonymous, exclusively mapped). The session cannot read its own /proc/self/pagemap
# (it is not dumpable), so the bench (root) reads it from the host and sends the session a cell that madvises.
def private_runs(pid: int, granule: int = 16) -> list:
    import array

    runs: list = []
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    try:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            p = line.split()
            if p[1][1] != "w" or p[1][3] != "p" or (len(p) > 5 and p[5].startswith("[v")):
                continue
            lo, hi = (int(x, 16) >> 12 for x in p[0].split("-"))
            entries = array.array("Q")
            entries.frombytes(os.pread(fd, (hi - lo) * 8, lo * 8))
            chunks = sorted({(lo + i) // granule for i, e in enumerate(entries) if (e >> 56) & 0xA1 == 0x81})
            for c in chunks:
                start, end = max(lo, c * granule), min(hi, (c + 1) * granule)
                if runs and runs[-1][1] == start:
                    runs[-1][1] = end
                else:
                    runs.append([start, end])
    finally:
        os.close(fd)
    return runs


MADVISE_CELL = """import ctypes as _c
_l = _c.CDLL(None); _l.madvise.argtypes = [_c.c_void_p, _c.c_size_t, _c.c_int]
_bad = sum(1 for _s, _e in {runs} if _l.madvise(_s << 12, (_e - _s) << 12, 12) != 0)  # MADV_MERGEABLE
del _c, _l
_bad"""


def mark_private(sandbox_ids: list, sessions: list) -> int:
    marked = 0
    for sid, sandbox in zip(sandbox_ids, sessions):
        procs = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if f"/{sid}" in Path(f"/proc/{entry}/cgroup").read_text():
                        procs[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
        session = next(pid for pid, ppid in procs.items() if ppid in procs)
        runs = private_runs(session)
        assert sandbox.run_code(MADVISE_CELL.format(runs=runs)).text == "0"
        marked += sum(e - s for s, e in runs)
    return marked


def converge(settle: float) -> dict:
    """Wait until merging levels off: a full scan after which pages_sharing grew < 1% (or ``settle`` s)."""
    start, cpu0 = time.monotonic(), ksmd_cpu_seconds()
    scans, sharing = ksm._read("full_scans"), ksm._read("pages_sharing") or 0
    while time.monotonic() - start < settle:
        time.sleep(2)
        now_scans = ksm._read("full_scans")
        if TRACE:
            print(f"    t={time.monotonic() - start:5.0f}s full_scans={now_scans} pages_sharing={ksm._read('pages_sharing')}"
                  f" pages_scanned={ksm._read('pages_scanned')} ksmd_cpu={ksmd_cpu_seconds() - cpu0:.1f}s", flush=True)
        if now_scans is not None and scans is not None and now_scans > scans:
            now_sharing = ksm._read("pages_sharing") or 0
            if now_scans - scans >= 1 and sharing and now_sharing <= sharing * 1.01 and time.monotonic() - start > 10:
                break
            scans, sharing = now_scans, now_sharing
    wall = time.monotonic() - start
    return {"converge_s": round(wall, 1), "ksmd_cpu_converge_s": round(ksmd_cpu_seconds() - cpu0, 2)}


def phase(label: str, n: int, settle: float) -> dict:
    import sandlot

    if label == "on":
        os.environ["SANDLOT_KSM"] = "1"
    else:
        os.environ.pop("SANDLOT_KSM", None)
    from sandlot._host import seccomp

    if not hasattr(seccomp, "_bench_original"):
        seccomp._bench_original = seccomp.compiled_filter
    # The experiment's cell madvises MADV_MERGEABLE, which the sandbox's filter refuses unless KSM was asked:
    # for that phase only, the filter that allows it (what SANDLOT_KSM=1 sandboxes get).
    seccomp.compiled_filter = ((lambda allow_merging=False: seccomp._bench_original(True)) if label == "private"
                               else seccomp._bench_original)
    if label == "private":
        ksm.engage()  # ksmd on with the same budget; nothing is marked by Sandlot itself
    with sandlot.Sandbox() as first:  # the phase's zygote starts here, before the baseline
        assert first.run_code("import pandas as pd; 1+1").text == "2"
    avail0, pss0, uss0 = wl._settled_memory()
    rmap0, pte0 = tree_kernel_extras(os.getpid())
    cpu0, t0 = ksmd_cpu_seconds(), time.monotonic()
    sessions, out = [], {"phase": label, "n": n}
    try:
        for _ in range(n):
            sandbox = sandlot.Sandbox()
            sessions.append(sandbox)
            ex = sandbox.run_code("import pandas as pd")
            assert ex.error is None, ex.error
        out["create_s"] = round(time.monotonic() - t0, 1)
        if label == "private":
            out["marked_pages_per_session"] = round(mark_private([s.sandbox_id for s in sessions], sessions) / n)
        if label in ("on", "private"):
            out.update(converge(settle))
        avail1, pss1, uss1 = wl._settled_memory()
        rmap1, pte1 = tree_kernel_extras(os.getpid())
        out["ksmd_cpu_phase_s"] = round(ksmd_cpu_seconds() - cpu0, 2)
        out["phase_s"] = round(time.monotonic() - t0, 1)
        c0 = ksmd_cpu_seconds()
        time.sleep(10)
        out["ksmd_cpu_steady_pct"] = round((ksmd_cpu_seconds() - c0) / 10 * 100, 1)
        out["answered"] = sum(1 for s in sessions if s.run_code("1+1").text == "2")
        out.update(per_role([s.sandbox_id for s in sessions]))
        st = ksm.status()
        out.update(pages_sharing=st.pages_sharing, general_profit_mb=round((st.general_profit or 0) / 2**20, 1),
                   ksmd=f"{'on' if st.running else 'off'} {st.pages_to_scan}/{st.sleep_millisecs}ms")
    finally:
        for sandbox in sessions:
            try:
                sandbox.kill()
            except Exception:  # noqa: BLE001
                pass
    mb = lambda delta: round(delta / n / 2**20, 2)  # noqa: E731
    out.update(mem_available_mb=mb(avail0 - avail1), pss_mb=mb(pss1 - pss0), uss_mb=mb(uss1 - uss0),
               ksm_rmap_mb=mb((rmap1 - rmap0) * RMAP_ITEM_BYTES), page_tables_mb=mb(pte1 - pte0))
    out["pss_rmap_pte_mb"] = round(out["pss_mb"] + out["ksm_rmap_mb"] + out["page_tables_mb"], 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="live idle pandas sessions per phase")
    ap.add_argument("--settle", type=float, default=300.0, help="at most this many seconds for ksmd to converge")
    ap.add_argument("--pages", type=int, default=ksm.PAGES_TO_SCAN, help="ksmd pages_to_scan while on")
    ap.add_argument("--sleep", type=int, default=ksm.SLEEP_MILLISECS, help="ksmd sleep_millisecs while on")
    ap.add_argument("--order", default="off,on", help="phases, in order")
    ap.add_argument("--trace", action="store_true", help="print ksmd's progress while it converges")
    args = ap.parse_args()
    global TRACE
    TRACE = args.trace
    found = {name: ksm._read(name) for name in ksm.KNOBS}
    print(f"ksmd as found: {found}", flush=True)
    ksm.PAGES_TO_SCAN, ksm.SLEEP_MILLISECS = args.pages, args.sleep
    os.environ["SANDLOT_POOL_MIN"] = "0"
    print(f"loadavg before: {Path('/proc/loadavg').read_text().strip()}", flush=True)
    try:
        for label in args.order.split(","):
            r = phase(label, args.n, args.settle)
            print(f"  KSM {label:3s}: {r}", flush=True)
            print(f"  loadavg: {Path('/proc/loadavg').read_text().strip()}", flush=True)
    finally:
        ksm.release()
        ksm._put_back(found)
        print(f"ksmd put back: {({name: ksm._read(name) for name in ksm.KNOBS})}")


if __name__ == "__main__":
    main()
