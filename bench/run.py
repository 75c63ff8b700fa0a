"""Sandlot and its peers side by side, in one run: the benchmark of issue 3.

    .venv/bin/python bench/run.py --quick                 # a few minutes; density at N = 100
    .venv/bin/python bench/run.py                         # the full run; density at N = 1,000
    .venv/bin/python bench/run.py --install --quick       # first apt-get / pip install the missing peers
    .venv/bin/python bench/run.py --only fresh warm       # some workloads; peer names work too
    .venv/bin/python bench/run.py --quick --json bench.json

Workloads: fresh (1: fresh sandbox, print(1)), pandas (2: fresh sandbox, a pandas expression),
warm (3: x += 1 in a live session), idle (3b: the same call after 1 s of idle, as between two LLM turns),
throughput (4: fresh sandboxes per second from 2 and 8 client threads, per template: lean print(1) and
data-science pandas), humaneval (7: 164 generated HumanEval-shaped programs, a fresh sandbox each, 1 and 2
threads, against unsandboxed fork-per-program and python -S -c harnesses), cpu (8: CPU seconds of
everything a peer runs per fresh sandbox, counted by a cgroup the bench makes: see cpu.py),
density (5: N live idle sessions with pandas imported; host memory per session; all must answer 1+1),
pause (gVisor tier: pause and resume a live pandas session; times and checkpoint size).
Sandlot is driven through its public SDK only, so whatever the SDK does (zygote, warm pool) is measured:
fresh sandboxes through the one-shot sandlot.run_code(code) (Sandlot may choose the sandbox from the code),
and as "Sandlot, session path" through `with sandlot.Sandbox() as sb: sb.run_code(code)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import sys

from rich.console import Console
from rich.table import Table

# Measure the sandlot of this checkout (a worktree's, say), not whichever one the venv's editable install names.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(REPO, "sandlot")) and REPO not in sys.path:
    sys.path.insert(0, REPO)

import cpu as cpu_mod  # noqa: E402 - after the path above
import humaneval  # noqa: E402
import peers as peers_mod  # noqa: E402
import workloads as wl  # noqa: E402

WORKLOADS = ["fresh", "pandas", "warm", "idle", "throughput", "humaneval", "cpu", "density", "pause"]
PROFILES = {  # samples per latency workload, warm round trips, throughput seconds, density N, seconds/peer cap,
    # pause/resume cycles, idle calls, HumanEval rounds, fresh sandboxes per CPU measurement
    "quick": dict(n=20, warm_n=200, seconds=3.0, density=100, budget=20.0, pauses=3, idle_n=10, rounds=1, cpu_n=30),
    "full": dict(n=100, warm_n=1000, seconds=10.0, density=1000, budget=90.0, pauses=10, idle_n=30, rounds=3,
                 cpu_n=100),
}
IDLE_SECONDS = 1.0
TEMPLATES = {"lean": (wl.TRIVIAL, wl.TRIVIAL_EXPECT), "data-science": (wl.PANDAS, wl.PANDAS_EXPECT)}
HUMANEVAL_PEERS = ("subprocess", "bwrap")  # command peers fast enough to run 164 programs twice
TARGETS = {"fresh": 0.005, "pandas": 0.010, "warm": 0.001, "throughput": 200.0, "density_mb": 5.0}

console = Console(width=None if sys.stdout.isatty() else 150)


def parse_args() -> argparse.Namespace:
    names = WORKLOADS + [p.name for p in peers_mod.ALL]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer samples, density at N = 100")
    ap.add_argument("--only", nargs="+", metavar="NAME", choices=names,
                    help=f"run only these workloads and/or peers (Sandlot always runs): {', '.join(names)}")
    ap.add_argument("--n", type=int, help="samples per peer for the fresh and pandas workloads")
    ap.add_argument("--warm-n", type=int, help="round trips per session for the warm workload")
    ap.add_argument("--seconds", type=float, help="seconds per throughput measurement")
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 8], help="client threads for throughput")
    ap.add_argument("--density", type=int, metavar="N", help="live sessions for the density workload")
    ap.add_argument("--idle-n", type=int, help="calls per session for the idle workload (1 s idle before each)")
    ap.add_argument("--rounds", type=int, help="rounds of the HumanEval-shaped batch per harness")
    ap.add_argument("--cpu-n", type=int, help="fresh sandboxes per CPU measurement")
    ap.add_argument("--install", action="store_true", help="apt-get / pip install the peers that are missing")
    ap.add_argument("--json", metavar="FILE", help="also write every result (with raw samples) as JSON")
    return ap.parse_args()


def fmt_s(v) -> str:
    if v is None:
        return "-"
    ms = v * 1000
    return f"{ms:.3f} ms" if ms < 1 else f"{ms:.2f} ms" if ms < 10 else f"{ms:.1f} ms" if ms < 1000 else f"{v:.2f} s"


def fmt_ratio(v, base) -> str:
    if v is None or not base:
        return "-"
    r = v / base
    return f"{r:.2f}×" if r < 10 else f"{r:.0f}×"


def status_cell(r: wl.Result) -> str:
    return {"ok": "[green]ok", "partial": "[yellow]partial", "n/a": "[dim]n/a", "missing": "[yellow]missing"}.get(
        r.status, "[red]error")


def latency_table(title: str, results: dict, order: list) -> Table:
    t = Table(title=title, title_justify="left")
    for col, just in [("peer", "left"), ("status", "left"), ("n", "right"), ("p50", "right"), ("p95", "right"),
                      ("peer ÷ Sandlot (p50)", "right"), ("note", "left")]:
        t.add_column(col, justify=just, overflow="fold")
    base = results.get("sandlot")
    for peer in order:
        r = results[peer.name]
        ratio = fmt_ratio(r.p50, base.p50 if base else None) if peer.name != "sandlot" else "1×"
        t.add_row(peer.label, status_cell(r), str(len(r.samples)) if r.samples else "",
                  fmt_s(r.p50), fmt_s(r.p95), ratio if r.samples else "", r.note)
    return t


def throughput_table(by_template: dict, order: list, threads: list) -> Table:
    t = Table(title="4. throughput: fresh sandboxes per second, client threads in parallel, per template "
              f"(lean: {wl.TRIVIAL}; data-science: {wl.PANDAS})", title_justify="left")
    for col, just in [("template", "left"), ("peer", "left"), ("threads", "right"), ("status", "left"),
                      ("per second", "right"), ("p50 latency", "right"), ("p95 latency", "right"),
                      ("peer ÷ Sandlot (rate)", "right"), ("note", "left")]:
        t.add_column(col, justify=just, overflow="fold")
    for template, results in by_template.items():
        for peer in order:
            for n in threads:
                r = results[peer.name][n]
                base = results.get("sandlot", {}).get(n)
                rate, brate = r.extra.get("per_second"), base.extra.get("per_second") if base else None
                ratio = "1×" if peer.name == "sandlot" else fmt_ratio(rate, brate)
                t.add_row(template, peer.label, str(n), status_cell(r), f"{rate:.1f}" if rate is not None else "-",
                          fmt_s(r.p50), fmt_s(r.p95), ratio if rate is not None else "", r.note)
        t.add_section()
    return t


def humaneval_table(results: dict, labels: dict) -> Table:
    count = next(iter(results.values())).extra.get("programs", humaneval.COUNT) if results else humaneval.COUNT
    t = Table(title=f"7. HumanEval shape: {count} generated programs with asserts, a fresh sandbox (or process) "
              "each; seconds for the whole batch (p50 of rounds)", title_justify="left")
    for col, just in [("harness", "left"), ("threads", "right"), ("status", "left"), ("rounds", "right"),
                      ("total", "right"), ("programs/s", "right"), ("Sandlot ÷ harness (time)", "right"),
                      ("note", "left")]:
        t.add_column(col, justify=just, overflow="fold")
    for (name, n), r in results.items():
        base = results.get(("sandlot", n))
        ratio = "1×" if name == "sandlot" else fmt_ratio(base.p50 if base else None, r.p50)
        rate = r.extra.get("per_second")
        t.add_row(labels[name], str(n), status_cell(r), str(len(r.samples)), fmt_s(r.p50),
                  f"{rate:.1f}" if rate is not None else "-", ratio if r.samples else "", r.note)
    return t


def cpu_table(by_template: dict, order: list) -> Table:
    t = Table(title="8. CPU per fresh sandbox: everything the peer runs (caller, helpers, zygotes, sandboxes), "
              "from a cgroup the bench makes (bench/cpu.py); (Δ − idle rate × window) / n, 2 client threads", title_justify="left")
    for col, just in [("template", "left"), ("peer", "left"), ("status", "left"), ("n", "right"),
                      ("CPU / sandbox", "right"), ("counted by", "left"), ("user (cgroup)", "right"),
                      ("system (cgroup)", "right"),
                      ("of which the caller", "right"), ("RUSAGE_CHILDREN", "right"), ("idle CPU", "right"),
                      ("peer ÷ Sandlot", "right"), ("note", "left")]:
        t.add_column(col, justify=just, overflow="fold")
    ms = lambda e, k: f"{e[k]:.1f} ms" if e.get(k) is not None else "-"  # noqa: E731
    for template, results in by_template.items():
        base = results.get("sandlot")
        bcpu = base.extra.get("cpu_ms_per_sandbox") if base else None
        for peer in order:
            r = results[peer.name]
            e = r.extra
            mine = e.get("cpu_ms_per_sandbox")
            ratio = "1×" if peer.name == "sandlot" else fmt_ratio(mine, bcpu)
            t.add_row(template, peer.label, status_cell(r), str(e.get("n", "")), ms(e, "cpu_ms_per_sandbox"),
                      e.get("method", ""), ms(e, "user_ms_per_sandbox"), ms(e, "sys_ms_per_sandbox"), ms(e, "caller_ms_per_sandbox"),
                      ms(e, "rusage_children_ms_per_sandbox"),
                      f"{e['idle_cpu_ms_per_s']:.1f} ms/s" if "idle_cpu_ms_per_s" in e else "-",
                      ratio if mine is not None else "", r.note)
        t.add_section()
    return t


def density_table(r: wl.Result) -> Table:
    e = r.extra
    t = Table(title=f"5. density: {e['requested']} live idle Sandlot sessions with pandas imported",
              title_justify="left")
    for col in ["status", "live", "answered 1+1", "host MemAvailable Δ / session", "PSS / session", "USS / session",
                "create p50 / p95", "1+1 p50 / p95", "note"]:
        t.add_column(col, overflow="fold")
    mb = lambda v: "-" if v is None else f"{v:.2f} MB"  # noqa: E731
    t.add_row(status_cell(r), str(e["live"]), str(e["answered"]), mb(e["mem_available_mb_per_session"]),
              mb(e["pss_mb_per_session"]), mb(e["uss_mb_per_session"]),
              f"{fmt_s(_sec(e['create_p50_ms']))} / {fmt_s(_sec(e['create_p95_ms']))}",
              f"{fmt_s(r.p50)} / {fmt_s(r.p95)}", r.note)
    return t


def pause_table(r: wl.Result) -> Table:
    e = r.extra
    t = Table(title="6. gVisor tier: pause (checkpoint to disk) and resume a live pandas session",
              title_justify="left")
    for col in ["status", "cycles", "pause p50 / p95", "resume p50 / p95", "checkpoint (p50)", "note"]:
        t.add_column(col, overflow="fold")
    t.add_row(status_cell(r), str(len(r.samples)), f"{fmt_s(r.p50)} / {fmt_s(r.p95)}",
              f"{fmt_s(_sec(e.get('resume_p50_ms')))} / {fmt_s(_sec(e.get('resume_p95_ms')))}",
              f"{e['checkpoint_mb_p50']} MB" if e.get("checkpoint_mb_p50") is not None else "-", r.note)
    return t


def _sec(ms):
    return None if ms is None else ms / 1000


def targets_table(res: dict) -> Table:
    t = Table(title="Sandlot against the targets of issue 3 (this machine)", title_justify="left")
    for col in ["workload", "target", "measured", "met"]:
        t.add_column(col)
    rows = []
    for key, label in [("fresh", "1. fresh print(1)"), ("pandas", "2. fresh pandas"), ("warm", "3. warm x += 1")]:
        if key in res and res[key]["sandlot"].p50 is not None:
            p50 = res[key]["sandlot"].p50
            rows.append((label, f"p50 <= {fmt_s(TARGETS[key])}", fmt_s(p50), p50 <= TARGETS[key]))
    for n, r in res.get("throughput", {}).get("lean", {}).get("sandlot", {}).items():
        rate = r.extra.get("per_second")
        if rate is not None:
            rows.append((f"4. throughput (lean), {n} threads", f">= {TARGETS['throughput']:.0f} /s",
                         f"{rate:.1f} /s", rate >= TARGETS["throughput"]))
    he = res.get("humaneval", {})
    for n in sorted({n for _, n in he}):
        mine, fork = he.get(("sandlot", n)), he.get(("fork", n))
        if mine and fork and mine.p50 and fork.p50 and mine.status == fork.status == "ok":
            rows.append((f"7. HumanEval shape, {n} thread{'s' if n > 1 else ''}", "<= the fork-per-program harness",
                         f"{mine.p50:.2f} s vs {fork.p50:.2f} s ({mine.p50 / fork.p50:.2f}×)", mine.p50 <= fork.p50))
    if "density" in res:
        e = res["density"].extra
        per = e["mem_available_mb_per_session"]
        ok = per is not None and per <= TARGETS["density_mb"] and e["answered"] == e["live"] == e["requested"] >= 1000
        rows.append((f"5. density, N = {e['requested']}", "N = 1,000, <= 5 MB each, all answer",
                     f"{e['live']} live, {e['answered']} answered, {per} MB each", ok))
    for label, target, measured, ok in rows:
        t.add_row(label, target, measured, "[green]yes" if ok else "[red]no")
    return t


def prepare(order: list, install: bool) -> dict:
    """Install (if asked), start each peer and run it once untimed (zygotes, compile caches...).
    Returns name -> Result("missing" or "error", why) for the peers that cannot run."""
    missing: dict = {}
    table = Table(title="Peers", title_justify="left")
    for col in ["peer", "status", "what runs", "version / why"]:
        table.add_column(col, overflow="fold")
    for peer in order:
        why = peer.missing()
        if why and install:
            with console.status(f"installing {peer.name} ..."):
                try:
                    peer.install()
                    why = peer.missing()
                except Exception as e:  # noqa: BLE001
                    why = f"install failed: {e}"
        if why:
            missing[peer.name] = wl.Result("missing", why)
        else:
            with console.status(f"starting {peer.name} ..."):
                try:
                    peer.start()
                    for attempt in range(2):  # a second chance: the first start may hit a transient failure
                        try:
                            wl.check(peer.fresh(wl.TRIVIAL), wl.TRIVIAL_EXPECT)
                            break
                        except Exception:  # noqa: BLE001
                            if attempt:
                                raise
                except Exception as e:  # noqa: BLE001
                    missing[peer.name] = wl.Result("error", f"does not work here: {type(e).__name__}: {e}"[:300])
        r = missing.get(peer.name)
        table.add_row(peer.label, status_cell(r) if r else "[green]ok", peer.detail, r.note if r else peer.version())
    console.print(_machine())
    console.print(table)
    return missing


def main() -> int:
    args = parse_args()
    prof = dict(PROFILES["quick" if args.quick else "full"])
    for key in ("n", "warm_n", "seconds", "density", "idle_n", "rounds", "cpu_n"):
        if getattr(args, key) is not None:
            prof[key] = getattr(args, key)
    only = set(args.only or [])
    workloads = [w for w in WORKLOADS if w in only] or WORKLOADS
    named = {p.name for p in peers_mod.ALL if p.name in only}
    order = [cls() for cls in peers_mod.ALL if not named or cls.name in named | {"sandlot"}]

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # a thousand sessions hold a few fds each
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    missing = prepare(order, args.install)
    usable = [p for p in order if p.name not in missing]
    if "sandlot" in missing:
        console.print("[red]Sandlot itself does not work here: the ratios have nothing to compare against.")

    def fill(results: dict, applies=lambda p: True, why: str = "") -> dict:
        """Rows for the peers that did not run: missing/error, or n/a (with why)."""
        for p in order:
            if p.name in missing:
                results[p.name] = dataclasses.replace(missing[p.name])
            elif not applies(p):
                results[p.name] = wl.Result("n/a", why(p) if callable(why) else why)
        return results

    def no_session(p) -> str:
        return "its sessions are Sandlot's (first row)" if p.name == "sandlot-session" else \
            "no live session (one process per run)"

    res: dict = {}
    if "fresh" in workloads:
        with console.status("1. fresh sandbox, print(1) ..."):
            res["fresh"] = fill(wl.fresh(usable, wl.TRIVIAL, wl.TRIVIAL_EXPECT, prof["n"], prof["budget"]))
        console.print(latency_table("1. fresh sandbox: print(1), result back, sandbox gone", res["fresh"], order))
    if "pandas" in workloads:
        has = lambda p: p.has_pandas  # noqa: E731
        with console.status("2. fresh sandbox, pandas ..."):
            got = wl.fresh([p for p in usable if has(p)], wl.PANDAS, wl.PANDAS_EXPECT, prof["n"], prof["budget"])
            res["pandas"] = fill(got, has, "no pandas in this peer")
        console.print(latency_table(f"2. fresh sandbox: {wl.PANDAS}", res["pandas"], order))
    if "warm" in workloads:
        has = lambda p: p.has_session  # noqa: E731
        with console.status("3. warm session, x += 1 ..."):
            got = wl.warm([p for p in usable if has(p)], prof["warm_n"], prof["budget"])
            res["warm"] = fill(got, has, no_session)
        console.print(latency_table("3. warm session round trip: x += 1 (after x = 0)", res["warm"], order))
    if "idle" in workloads:
        has = lambda p: p.has_session  # noqa: E731
        with console.status(f"3b. x += 1 after {IDLE_SECONDS:.0f} s idle, {prof['idle_n']} calls per peer ..."):
            got = wl.warm([p for p in usable if has(p)], prof["idle_n"], prof["budget"] * 3, idle=IDLE_SECONDS)
            res["idle"] = fill(got, has, no_session)
        console.print(latency_table(f"3b. warm call after {IDLE_SECONDS:.0f} s idle (an agent between two LLM turns): "
                                    "x += 1", res["idle"], order))
    if "throughput" in workloads:
        res["throughput"] = {}
        for template, (code, expect) in TEMPLATES.items():
            by_peer = res["throughput"][template] = {}
            for p in order:
                by_peer[p.name] = {}
                for n in args.threads:
                    if p.name in missing:
                        by_peer[p.name][n] = dataclasses.replace(missing[p.name])
                    elif code == wl.PANDAS and not p.has_pandas:
                        by_peer[p.name][n] = wl.Result("n/a", "no pandas in this peer")
                    else:
                        with console.status(f"4. throughput ({template}): {p.name}, {n} threads, "
                                            f"{prof['seconds']:.0f} s ..."):
                            by_peer[p.name][n] = wl.throughput(p, n, prof["seconds"], code, expect)
        console.print(throughput_table(res["throughput"], order, args.threads))
    if "humaneval" in workloads and "sandlot" not in missing:
        codes = humaneval.programs()
        harnesses = {"sandlot": humaneval.sandlot_harness, "fork": humaneval.fork_harness}
        labels = {"sandlot": "Sandlot: sandlot.run_code(program)",
                  "fork": "fork per program (os.fork of the bench, exec; no isolation)"}
        for p in usable:
            if p.name in HUMANEVAL_PEERS:
                harnesses[p.name] = humaneval.command_harness(p)
                labels[p.name] = f"{p.label}: {p.detail.split(';')[-1].strip()} per program"
        with console.status(f"7. HumanEval shape: {len(codes)} programs × {len(harnesses)} harnesses × "
                            f"{prof['rounds']} round(s) ..."):
            res["humaneval"] = humaneval.workload(harnesses, codes, [1, 2], prof["rounds"])
        console.print(humaneval_table(res["humaneval"], labels))
    if "cpu" in workloads:
        res["cpu"] = {}
        for template, (code, expect) in TEMPLATES.items():
            by_peer = res["cpu"][template] = {}
            for p in order:
                if p.name in missing:
                    by_peer[p.name] = dataclasses.replace(missing[p.name])
                elif code == wl.PANDAS and not p.has_pandas:
                    by_peer[p.name] = wl.Result("n/a", "no pandas in this peer")
                else:
                    with console.status(f"8. CPU per sandbox ({template}): {p.name}, {prof['cpu_n']} sandboxes ..."):
                        try:
                            by_peer[p.name] = wl.Result("ok", "", [], cpu_mod.measure(p.name, code, expect,
                                                                                      prof["cpu_n"]))
                        except Exception as e:  # noqa: BLE001
                            by_peer[p.name] = wl.Result("error", f"{type(e).__name__}: {e}"[:300])
        console.print(cpu_table(res["cpu"], order))
    if "density" in workloads and "sandlot" not in missing:
        floor = max(2 * 2**30, wl.mem_total() // 10)  # never push the host below this MemAvailable
        with console.status(f"5. density: starting {prof['density']} sessions ...") as status:
            count = [0]

            def tick() -> None:
                count[0] += 1
                status.update(f"5. density: {count[0]} / {prof['density']} sessions live ...")
            res["density"] = wl.density(prof["density"], floor, tick)
        console.print(density_table(res["density"]))
    if "pause" in workloads:
        if "sandlot-gvisor" in missing or not any(p.name == "sandlot-gvisor" for p in order):
            why = missing["sandlot-gvisor"].note if "sandlot-gvisor" in missing else "sandlot-gvisor not selected"
            res["pause"] = wl.Result("missing", why)
        else:
            with console.status(f"6. pause/resume: {prof['pauses']} cycles under gVisor ..."):
                res["pause"] = wl.pause_resume(prof["pauses"])
        console.print(pause_table(res["pause"]))

    for p in usable:
        try:
            p.stop()
        except Exception:  # noqa: BLE001
            pass
    console.print(targets_table(res))
    if args.json:
        write_json(args.json, res, order, missing, prof, args.quick)
        console.print(f"results written to {args.json}")
    return 0


def write_json(path: str, res: dict, order: list, missing: dict, prof: dict, quick: bool) -> None:
    def encode(workload: str, v):
        if workload in ("density", "pause"):
            return v.to_json()
        if workload == "throughput":
            return {template: {peer: {str(n): r.to_json() for n, r in by_n.items()} for peer, by_n in by_peer.items()}
                    for template, by_peer in v.items()}
        if workload == "cpu":
            return {template: {peer: r.to_json() for peer, r in by_peer.items()} for template, by_peer in v.items()}
        if workload == "humaneval":
            return {f"{name}/{n} threads": r.to_json() for (name, n), r in v.items()}
        return {peer: r.to_json() for peer, r in v.items()}

    out = {"machine": _machine_info(),  # loadavg_1m here is at the end of the run; the header shows the start
           "profile": "quick" if quick else "full", "settings": prof,
           "command": " ".join([os.path.relpath(sys.executable), "bench/run.py", *sys.argv[1:]]),
           "peers": {p.name: {"label": p.label, "detail": p.detail,
                              "status": missing[p.name].status if p.name in missing else "ok",
                              "why": missing[p.name].note if p.name in missing else "",
                              "version": "" if p.name in missing else p.version()} for p in order},
           "results": {w: encode(w, v) for w, v in res.items()}}
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


def _machine_info() -> dict:
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpus": os.cpu_count(),
            "mem_total_gib": round(wl.mem_total() / 2**30, 1), "kernel": platform.release(),
            "python": platform.python_version(), "loadavg_1m": round(os.getloadavg()[0], 2)}


def _machine() -> str:
    m = _machine_info()
    return f"[bold]Sandlot bench[/] {m['date']}: {m['cpus']} CPUs, {m['mem_total_gib']} GiB, " \
           f"Linux {m['kernel']}, CPython {m['python']}, 1-min load {m['loadavg_1m']}"


if __name__ == "__main__":
    sys.exit(main())
