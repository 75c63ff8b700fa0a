"""HumanEval-shaped programs, generated: 164 small pure-Python programs, each a function of a few lines and
3-8 asserts on it, as an agent's test-and-check loop runs them. No dataset is downloaded: each program comes
from one of a dozen patterns with its own constants (seeded, so every run gets the same 164).

The expected values in the asserts are computed here, by running the function in the bench process once, so
every program passes by construction; ``programs()`` checks that too. A harness that reports a failure for
one of them is wrong, or the sandbox broke it.
"""

from __future__ import annotations

import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

COUNT = 164
SEED = 11

# Each pattern: (source of ``f`` with a {k} constant, arguments for one assert, which kind of constant k is).


def _ints(rng: random.Random, lo: int = -20, hi: int = 50, n: "int | None" = None) -> list:
    return [rng.randint(lo, hi) for _ in range(rng.randint(0, 9) if n is None else n)]


def _word(rng: random.Random) -> str:
    return "".join(rng.choice("abcdeilnorstu ") for _ in range(rng.randint(0, 14)))


PATTERNS: list = [
    ("""def f(xs, t):
    for i in range(len(xs)):
        for j in range(i + 1, len(xs)):
            if abs(xs[i] - xs[j]) < t:
                return True
    return False""", lambda r: (_ints(r), r.randint(1, 9)), "k"),
    ("""def f(s):
    s = s.lower()
    return sum(1 for c in s if c in "{k}")""", lambda r: (_word(r),), "vowels"),
    ("""def f(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, (a + b) % {k}
    return a""", lambda r: (r.randint(0, 60),), "mod"),
    ("""def f(xs):
    out = []
    for x in xs:
        if x % {k} == 0 and x not in out:
            out.append(x)
    return sorted(out)""", lambda r: (_ints(r),), "small"),
    ("""def f(s):
    words = s.split()
    return " ".join(w[::-1] if len(w) > {k} else w for w in words)""", lambda r: (_word(r),), "len"),
    ("""def f(n):
    if n < 2:
        return False
    for d in range(2, int(n ** 0.5) + 1):
        if n % d == 0:
            return False
    return n % {k} != 0 or n == {k}""", lambda r: (r.randint(0, 400),), "prime"),
    ("""def f(xs):
    best = cur = 0
    for x in xs:
        cur = max(0, cur + x - {k})
        best = max(best, cur)
    return best""", lambda r: (_ints(r),), "small"),
    ("""def f(s):
    stack = []
    pairs = {{")": "(", "]": "["}}
    for c in s:
        if c in "([":
            stack.append(c)
        elif c in pairs:
            if not stack or stack.pop() != pairs[c]:
                return False
    return len(stack) == 0 and len(s) % {k} == 0""",
     lambda r: ("".join(r.choice("()[]") for _ in range(r.randint(0, 10))),), "one"),
    ("""def f(n):
    digits = [int(c) for c in str(abs(n))]
    return sum(d ** {k} for d in digits)""", lambda r: (r.randint(-99999, 99999),), "pow"),
    ("""def f(xs):
    counts = {{}}
    for x in xs:
        counts[x % {k}] = counts.get(x % {k}, 0) + 1
    return max(sorted(counts), key=counts.get) if counts else None""", lambda r: (_ints(r),), "small"),
    ("""def f(a, b):
    while b:
        a, b = b, a % b
    return abs(a) * {k}""", lambda r: (r.randint(0, 500), r.randint(0, 500)), "small"),
    ("""def f(s):
    out = []
    for c in s:
        if c.isalpha():
            out.append(chr((ord(c) - 97 + {k}) % 26 + 97))
        else:
            out.append(c)
    return "".join(out)""", lambda r: (_word(r).replace(" ", ""),), "shift"),
]

_CONSTANTS = {"k": lambda r: r.randint(1, 9), "vowels": lambda r: r.choice(["aeiou", "aeiouy", "aei", "ou"]),
              "mod": lambda r: r.choice([97, 1000, 10**9 + 7, 65536]), "small": lambda r: r.randint(1, 7),
              "len": lambda r: r.randint(1, 5), "prime": lambda r: r.choice([2, 3, 5, 7, 11]),
              "one": lambda r: 1, "pow": lambda r: r.randint(1, 4), "shift": lambda r: r.randint(1, 25)}


def _program(i: int) -> str:
    rng = random.Random(SEED * 1000 + i)
    template, args_of, const = PATTERNS[i % len(PATTERNS)]
    k = _CONSTANTS[const](rng)
    source = template.format(k=k)
    space: dict = {}
    exec(source, space)  # noqa: S102 - our own generated code, to compute the expected values
    f = space["f"]
    asserts = []
    for _ in range(rng.randint(3, 8)):
        args = args_of(rng)
        asserts.append(f"assert f({', '.join(repr(a) for a in args)}) == {f(*args)!r}")
    return source + "\n\n\n" + "\n".join(asserts) + "\n"


def programs(count: int = COUNT) -> list[str]:
    """The ``count`` programs, the same every run; each is checked to pass here."""
    out = [_program(i) for i in range(count)]
    for i, code in enumerate(out):
        try:
            exec(compile(code, f"<humaneval-{i}>", "exec"), {"__name__": "__main__"})  # noqa: S102
        except AssertionError:
            raise RuntimeError(f"generated program {i} fails its own asserts:\n{code}") from None
    return out


FAILING = "def f(x):\n    return x + 1\n\n\nassert f(1) == 3\n"  # every harness must report this one as failed


# --- Harnesses: each runs one program and raises if it did not pass.

def sandlot_harness(code: str) -> None:
    """A fresh sandbox through the one-shot API, as an agent's checker would call it."""
    import sandlot

    execution = sandlot.run_code(code)
    if execution.error is not None:
        raise RuntimeError(f"{execution.error.name}: {execution.error.value}"[:200])


def fork_harness(code: str) -> None:
    """No isolation: fork the bench process, exec the program in the child; its exit status says pass/fail.
    The cheapest way to run a program in a process of its own (the interpreter is already up)."""
    compiled = compile(code, "<program>", "exec")
    pid = os.fork()
    if pid == 0:  # the child: run, and leave without touching the parent's buffers, locks or atexit
        status = 1
        try:
            exec(compiled, {"__name__": "__main__"})  # noqa: S102
            status = 0
        except BaseException:  # noqa: BLE001 - any failure is a failed program
            pass
        os._exit(status)
    _, wait_status = os.waitpid(pid, 0)
    code_ = os.waitstatus_to_exitcode(wait_status)
    if code_ != 0:
        raise RuntimeError(f"exit status {code_}")


def command_harness(peer) -> Callable[[str], None]:
    """A command peer (peers.py) per program: ``python -S -c`` bare, or inside bubblewrap; a non-zero exit
    raises."""
    def run(code: str) -> None:
        peer.fresh(code)
    return run


def batch(harness: Callable[[str], None], codes: list, threads: int) -> tuple:
    """Run every program through ``harness`` from ``threads`` client threads: (seconds, [failures])."""
    def one(i: int) -> Optional[str]:
        try:
            harness(codes[i])
            return None
        except Exception as e:  # noqa: BLE001
            return f"program {i}: {type(e).__name__}: {e}"[:300]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        failures = [f for f in pool.map(one, range(len(codes))) if f]
    return time.perf_counter() - t0, failures


def reports_failure(harness: Callable[[str], None]) -> bool:
    """Does ``harness`` see a failing assert? (A harness that cannot fail proves nothing.)"""
    try:
        harness(FAILING)
    except Exception:  # noqa: BLE001
        return True
    return False


def workload(harnesses: dict, codes: list, threads: list, rounds: int) -> dict:
    """Every harness over all ``codes``, with each client thread count, ``rounds`` times, interleaved
    (round by round, harness by harness) so a machine that changes speed shifts them all alike.
    Returns {(harness name, threads): Result}, samples = seconds per batch; any failed program is an error."""
    from workloads import Result

    results = {}
    for name, harness in harnesses.items():
        ok = reports_failure(harness)
        for n in threads:
            results[name, n] = Result() if ok else Result("error", "harness does not report a failing assert")
    for _ in range(rounds):
        for n in threads:
            for name, harness in harnesses.items():
                r = results[name, n]
                if r.status != "ok":
                    continue
                seconds, failures = batch(harness, codes, n)
                r.samples.append(seconds)
                if failures:
                    r.status, r.note = "error", f"{len(failures)} of {len(codes)} failed; first: {failures[0]}"
    for (name, n), r in results.items():
        r.extra = {"programs": len(codes), "threads": n, "rounds": len(r.samples),
                   "per_second": round(len(codes) / r.p50, 2) if r.samples else None}
    return results
