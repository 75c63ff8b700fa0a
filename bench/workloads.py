"""The five workloads of issue 3, each over any peer with the interface in peers.py.

Latencies are wall-clock seconds from the client's side (time.perf_counter). Latency workloads take their
samples round robin across the peers (one sample of each in turn), so a machine that gets slower or faster
during the run shifts every peer alike.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import threading
import time
from typing import Callable, Optional

TRIVIAL = "print(1)"
PANDAS = 'import pandas as pd; pd.DataFrame({"a": [1, 2]}).a.sum()'
TRIVIAL_EXPECT, PANDAS_EXPECT = "1", "3"


@dataclasses.dataclass
class Result:
    status: str = "ok"  # ok | missing | n/a | error
    note: str = ""
    samples: list = dataclasses.field(default_factory=list)  # seconds
    extra: dict = dataclasses.field(default_factory=dict)

    def pct(self, q: float) -> Optional[float]:
        return percentile(self.samples, q)

    @property
    def p50(self) -> Optional[float]:
        return self.pct(50)

    @property
    def p95(self) -> Optional[float]:
        return self.pct(95)

    def to_json(self) -> dict:
        ms = lambda v: None if v is None else round(v * 1000, 4)  # noqa: E731
        return {"status": self.status, "note": self.note, "n": len(self.samples), "p50_ms": ms(self.p50),
                "p95_ms": ms(self.p95), "min_ms": ms(min(self.samples, default=None)),
                "max_ms": ms(max(self.samples, default=None)), **self.extra,
                "samples_ms": [ms(s) for s in self.samples]}


def percentile(samples: list, q: float) -> Optional[float]:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not samples:
        return None
    s = sorted(samples)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def check(out: str, expect: str) -> None:
    lines = out.strip().splitlines()
    if not lines or expect not in lines[-1]:
        raise RuntimeError(f"expected {expect!r}, got {out[-200:]!r}")


def round_robin(ops: dict, n: int, warmup: int, budget: float, idle: float = 0.0) -> dict:
    """Time ``n`` calls of each op, interleaved. An op that raises is dropped with status error; an op whose
    samples have taken more than ``budget`` seconds stops early (with at least 5 samples). ``idle``: seconds
    of sleep (untimed) before every call."""
    results = {name: Result() for name in ops}
    spent = {name: 0.0 for name in ops}
    live = dict(ops)
    for i in range(warmup + n):
        for name, op in list(live.items()):
            if idle:
                time.sleep(idle)
            t0 = time.perf_counter()
            try:
                op()
            except Exception as e:  # noqa: BLE001 - any failure is reported, not fatal
                results[name] = Result("error", f"{type(e).__name__}: {e}"[:300], results[name].samples)
                del live[name]
                continue
            elapsed = time.perf_counter() - t0
            if i >= warmup:
                results[name].samples.append(elapsed)
                spent[name] += elapsed
                if spent[name] > budget and len(results[name].samples) >= 5:
                    results[name].note = f"stopped after {len(results[name].samples)} samples ({budget:.0f} s budget)"
                    del live[name]
    return results


def fresh(peers: list, code: str, expect: str, n: int, budget: float) -> dict:
    """Workloads 1 and 2: fresh sandbox, run ``code``, result back, sandbox gone."""
    ops = {p.name: (lambda p=p: check(p.fresh(code), expect)) for p in peers}
    return round_robin(ops, n, warmup=2, budget=budget)


def warm(peers: list, n: int, budget: float, idle: float = 0.0) -> dict:
    """Workload 3: round trip of ``x += 1`` in a live session (after ``x = 0``); ``x`` is checked at the end.
    With ``idle`` (the idle workload), each call comes after that many seconds of sleep: what an agent sees
    between two LLM turns, when every process on the path has gone to sleep."""
    sessions, results = {}, {}
    try:
        for p in peers:
            try:
                sessions[p.name] = p.session()
                sessions[p.name].run("x = 0")
            except Exception as e:  # noqa: BLE001
                results[p.name] = Result("error", f"{type(e).__name__}: {e}"[:300])
        ops = {name: (lambda s=s: s.run("x += 1")) for name, s in sessions.items() if name not in results}
        warmup = 1 if idle else 5
        timed = round_robin(ops, n, warmup=warmup, budget=budget, idle=idle)
        for name, r in timed.items():
            if r.status == "ok":
                want = str(len(r.samples) + warmup)
                got = sessions[name].run("x").strip()
                if got != want:
                    r.status, r.note = "error", f"x is {got!r} after {want} increments"
        results.update(timed)
    finally:
        for s in sessions.values():
            try:
                s.close()
            except Exception:  # noqa: BLE001
                pass
    return results


def throughput(peer, threads: int, seconds: float, code: str = TRIVIAL, expect: str = TRIVIAL_EXPECT) -> Result:
    """Workload 4: fresh sandboxes running ``code`` per second from ``threads`` client threads, for ``seconds``."""
    latencies: list = []
    errors: list = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client() -> None:
        while time.perf_counter() < deadline and not errors:
            t0 = time.perf_counter()
            try:
                check(peer.fresh(code), expect)
            except Exception as e:  # noqa: BLE001
                errors.append(f"{type(e).__name__}: {e}"[:300])
                return
            with lock:
                latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    workers = [threading.Thread(target=client, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    rate = len(latencies) / elapsed
    result = Result("error" if errors else "ok", errors[0] if errors else "", latencies,
                    {"threads": threads, "completed": len(latencies), "seconds": round(elapsed, 3),
                     "per_second": round(rate, 2)})
    return result


# --- Workload 5: density.

PAUSE_STATE = "import pandas as pd\ndf = pd.DataFrame({'a': range(100_000)})\nf = open('/home/user/log', 'w')"


def pause_resume(n: int) -> Result:
    """gVisor tier: pause a live session (pandas and a 100k-row frame in it, a file open) and resume it.
    Samples are pause seconds; resume seconds and checkpoint sizes are in ``extra``."""
    import sandlot

    pauses, resumes, sizes = [], [], []
    try:
        with sandlot.Sandbox(isolation="gvisor") as sb:
            sb.run_code(PAUSE_STATE)
            for i in range(n):
                sb.run_code(f"f.write('{i} ')\nf.flush()")
                info = sb.pause()
                pauses.append(info.seconds)
                sizes.append(info.checkpoint_bytes)
                resumes.append(sb.resume().seconds)
                check(str(sb.run_code("int(df.a.sum())").text), str(sum(range(100_000))))
            check(sb.run_code("open('/home/user/log').read().split()[-1]").text, repr(str(n - 1)))
    except Exception as e:  # noqa: BLE001
        return Result("error", f"{type(e).__name__}: {e}"[:300], pauses)
    mb = [b / 1e6 for b in sizes]
    return Result("ok", "", pauses, {"resume_p50_ms": _ms(percentile(resumes, 50)),
                                     "resume_p95_ms": _ms(percentile(resumes, 95)),
                                     "checkpoint_mb_p50": round(percentile(mb, 50), 1),
                                     "resume_samples_ms": [_ms(r) for r in resumes]})


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def mem_total() -> int:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) * 1024


def descendants(root: int) -> list:
    """``root`` and every process below it, from /proc (a process that exits meanwhile is skipped)."""
    children: dict = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def tree_memory(root: int) -> tuple:
    """(PSS, USS) summed over ``root`` and all its descendants. PSS splits each shared page among its
    sharers; USS counts only pages private to one process (what one more session really adds)."""
    pss = uss = 0
    for pid in descendants(root):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    if key == "Pss":
                        pss += int(rest.split()[0]) * 1024
                    elif key in ("Private_Clean", "Private_Dirty"):
                        uss += int(rest.split()[0]) * 1024
        except OSError:
            pass
    return pss, uss


def _settled_memory() -> tuple:
    gc.collect()
    time.sleep(2.0)  # let killed sandboxes' teardown and the kernel's lazy frees finish
    return (mem_available(), *tree_memory(os.getpid()))


def density(n: int, floor: int, tick: Callable = lambda: None) -> Result:
    """Workload 5 (Sandlot only): ``n`` live idle sessions that imported pandas; host memory per session.

    Stops adding sessions if MemAvailable falls below ``floor`` bytes (the figure is then per session
    actually created). At the end every session must still answer ``1+1``."""
    import sandlot

    avail0, pss0, uss0 = _settled_memory()
    sessions, create, answer = [], [], []
    note = ""
    try:
        for i in range(n):
            if mem_available() < floor:
                note = f"stopped at {i} sessions: MemAvailable below the {floor / 2**30:.1f} GiB floor"
                break
            t0 = time.perf_counter()
            try:
                sandbox = sandlot.Sandbox()
                sessions.append(sandbox)
                out = sandbox.run_code("import pandas as pd")
                if out.error is not None:
                    raise RuntimeError(f"{out.error.name}: {out.error.value}")
            except Exception as e:  # noqa: BLE001
                note = f"session {i} failed: {type(e).__name__}: {e}"[:300]
                break
            create.append(time.perf_counter() - t0)
            tick()
        avail1, pss1, uss1 = _settled_memory()
        answered = 0
        for sandbox in sessions:
            t0 = time.perf_counter()
            try:
                if sandbox.run_code("1+1").text == "2":
                    answered += 1
                    answer.append(time.perf_counter() - t0)
            except Exception:  # noqa: BLE001
                pass
        live = len(sessions)
    finally:
        for sandbox in sessions:
            try:
                sandbox.kill()
            except Exception:  # noqa: BLE001
                pass
    per = lambda delta: round(delta / live / 2**20, 3) if live else None  # noqa: E731
    status = "ok" if live == n and answered == live else "partial" if live and answered == live else "error"
    return Result(status, note or ("" if answered == live else f"only {answered} of {live} answered 1+1"),
                  answer, {"requested": n, "live": live, "answered": answered,
                           "mem_available_mb_per_session": per(avail0 - avail1),
                           "pss_mb_per_session": per(pss1 - pss0), "uss_mb_per_session": per(uss1 - uss0),
                           "create_p50_ms": _ms(percentile(create, 50)),
                           "create_p95_ms": _ms(percentile(create, 95)),
                           "answer_p50_ms": _ms(percentile(answer, 50)),  # = p50_ms: the samples are the 1+1s
                           "answer_p95_ms": _ms(percentile(answer, 95))})


def _ms(v: Optional[float]) -> Optional[float]:
    return None if v is None else round(v * 1000, 3)
