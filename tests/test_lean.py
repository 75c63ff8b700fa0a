"""One-shot runs of code that needs no preloaded module fork from a lean zygote: same root, same isolation,
nothing preloaded, a cheaper fork (issue 11). The choice reads the code's imports; it is a performance hint
and never a security decision, so a wrong guess costs only the time of an import."""

from __future__ import annotations

import json

import httpx
import pytest

import sandlot
from sandlot._hints import wants_preload
from sandlot._templates import python_template

from .conftest import needs_sandbox
from .serverproc import ServerProcess

HEAVY = python_template().preload
# (The module names are spelled in pieces: named whole, they would steer the hint to the preloaded zygote.)
PRELOADED = "import sys; print(sorted(m for m in ('num' 'py', 'pan' 'das', 'matplot' 'lib') if m in sys.modules))"


@pytest.mark.parametrize("code, heavy", [
    ("print(1)", False),
    ("import json, re\nfrom collections import Counter\nprint(Counter('ab'))", False),
    ("import pandas as pd", True),
    ("from numpy.linalg import norm", True),
    ("import os.path, sklearn.linear_model", True),
    ("def f():\n    import scipy\n", True),  # an import anywhere in the code counts
    ("from . import x", False),  # relative: not one of the template's modules
    ("%matplotlib inline\nprint(1)", True),  # notebook syntax: not plain Python, so no guess
    ("!pip list", True),
    ("print(1", False),  # a syntax error is reported by the session, from the lean sandbox
    ("# uses numpy later\nprint(1)", True),  # named anywhere: the preloaded one (only ever slower)
    ("__import__('numpy')", True),  # dynamic imports cannot be read: preloaded
    ("import importlib; importlib.import_module('json')", True),
    ("exec('import pandas')", True),
    ("x = 1\n" * 20_000, False),  # long code is searched, never parsed
])
def test_the_hint_reads_imports(code, heavy):
    assert wants_preload(code, HEAVY) is heavy



def facts(code_prefix: str = "") -> dict:
    """What a sandbox's code sees of its own isolation, from a one-shot run (``code_prefix`` steers the hint)."""
    probe = code_prefix + r"""
import json, os, socket, sys
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
print(json.dumps({
    "ids": [os.getuid(), os.geteuid(), os.getgid()], "host": socket.gethostname(), "pid1": os.getpid() > 1,
    "root": sorted(os.listdir("/")), "net": sorted(os.listdir("/sys/class/net")) if os.path.isdir("/sys/class/net") else None,
    "seccomp": status["Seccomp"].strip(), "nnp": status["NoNewPrivs"].strip(), "caps": status["CapEff"].strip(),
    "home": os.getcwd(), "writable_usr": os.access("/usr", os.W_OK), "heavy": "pan" "das" in sys.modules,
}))
"""
    execution = sandlot.run_code(probe)
    assert execution.error is None, execution.error
    return json.loads(execution.logs.stdout[-1])


@needs_sandbox
def test_plain_code_runs_lean_and_heavy_code_preloaded():
    assert sandlot.run_code(PRELOADED).logs.stdout == ["[]\n"]
    heavy = sandlot.run_code("import pandas\n" + PRELOADED)
    assert heavy.logs.stdout == ["['matplotlib', 'numpy', 'pandas']\n"]  # the preloaded zygote's sandbox


@needs_sandbox
def test_a_lean_sandbox_is_isolated_exactly_like_a_preloaded_one():
    lean, full = facts(), facts("import numpy\n")
    assert lean.pop("heavy") is False and full.pop("heavy") is True
    assert lean == full
    assert lean["ids"] == [1000, 1000, 1000] and lean["seccomp"] == "2" and lean["nnp"] == "1"
    assert int(lean["caps"], 16) == 0 and not lean["writable_usr"]


@needs_sandbox
def test_a_wrong_guess_costs_only_the_import():
    # The hint cannot see this import: the lean sandbox imports numpy itself when the code asks.
    code = "import builtins, sys\nnp = getattr(builtins, '__imp' + 'ort__')('num' 'py')\nprint(int(np.arange(5).sum()), 'pan' 'das' in sys.modules)"
    assert sandlot.run_code(code).logs.stdout == ["10 False\n"]


@needs_sandbox
def test_sessions_keep_the_preloaded_sandbox():
    with sandlot.Sandbox() as sb:  # its code is not known when it is made: the preloaded zygote's
        assert sb.run_code(PRELOADED).logs.stdout == ["['matplotlib', 'numpy', 'pandas']\n"]


@needs_sandbox
def test_one_shot_runs_through_a_server_are_chosen_the_same_way(tmp_path):
    server = ServerProcess(tmp_path / "sandlot.db").start()
    try:
        key = server.key("tenant-a")
        headers = {"Authorization": f"Bearer {key}"}
        for code, seen in ((PRELOADED, "[]"), ("import numpy\n" + PRELOADED, "['matplotlib', 'numpy', 'pandas']")):
            r = httpx.post(server.url + "/v1/run", json={"code": code}, headers=headers, timeout=120)
            assert r.status_code == 200, r.text
            assert r.json()["logs"]["stdout"] == [seen + "\n"]
    finally:
        server.stop()


@needs_sandbox
def test_every_preloaded_module_is_imported_in_the_zygote():
    from sandlot._engine import default_engine

    sandlot.run_code("import pandas")
    sandlot.run_code("1")
    backend = default_engine().backend("process")
    # The matplotlib backend used to fail to import there (the package's host path is not in the root).
    assert backend.zygote("python").preload_failed == {}
    assert backend.zygote("python/lean").preload_failed == {}


@pytest.mark.parametrize("code", [
    "1+" * 30_000 + "1",  # a 30,000-deep tree: the AST's construction recurses past the interpreter's limit
    "-" * 30_000 + "1",  # past the parser's own stack
    "f(" * 5_000 + ")" * 5_000,
])
def test_the_hint_never_fails_a_run_on_code_it_cannot_read(code):
    # The hint reads text, never parses it: the session reports what is wrong with such code.
    assert wants_preload(code, HEAVY) is False


@needs_sandbox
def test_a_one_shot_run_of_code_too_deep_to_parse_reports_it_as_the_codes_error():
    execution = sandlot.run_code("1+" * 30_000 + "1")
    assert execution.error is not None  # the session's own verdict on the code, not an exception of the hint
