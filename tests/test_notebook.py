"""Notebook syntax in a session, as LLM-written cells use it: shell escapes, %magics, %%cell magics,
IPython.display, and the clear answers where a sandbox cannot do what Jupyter would (input(), %pip
without a network, an unknown magic). Both tiers (the `tier` fixture); one module sandbox per tier."""

from __future__ import annotations

import time

import pytest

from .conftest import needs_sandbox

pytestmark = [needs_sandbox, pytest.mark.usefixtures("tier")]


def _out(ex) -> str:
    return "".join(ex.logs.stdout)


def _err(ex) -> str:
    return "".join(ex.logs.stderr)


def test_plain_python_is_never_rewritten(shared_sandbox):
    # '%' and '!' inside ordinary Python (operators, strings, f-strings) are Python's.
    ex = shared_sandbox.run_code("print('100%!')\nx = 7 % 4\ny = f'{x}!'\nnot_ = x != 3\n(x, y, not_)")
    assert ex.error is None and _out(ex) == "100%!\n" and ex.text == "(3, '3!', False)"
    # A real syntax error is reported against the user's own code.
    ex = shared_sandbox.run_code("def broken(:\n    pass")
    assert ex.error.name == "SyntaxError" and "broken" in ex.error.traceback


def test_shell_escapes(shared_sandbox):
    ex = shared_sandbox.run_code("!echo hello; id -u; exit 3")
    assert ex.error is None and _out(ex) == "hello\n1000\n"
    assert shared_sandbox.run_code("_exit_code").text == "3"
    ex = shared_sandbox.run_code("names = !printf 'a\\nb\\n'\nnames")
    assert ex.text == "['a', 'b']"
    # {expr} and $name from the session's variables; an unknown $NAME is the shell's (environment)
    ex = shared_sandbox.run_code("n = 21\n!echo {n * 2} $n $HOME")
    assert _out(ex) == "42 21 /home/user\n"
    ex = shared_sandbox.run_code("for i in range(2):\n    !echo round {i}")
    assert _out(ex) == "round 0\nround 1\n"


def test_cell_magics(shared_sandbox):
    ex = shared_sandbox.run_code("%%bash\nfor i in 1 2; do echo line$i; done\necho oops >&2")
    assert (_out(ex), _err(ex)) == ("line1\nline2\n", "oops\n")
    ex = shared_sandbox.run_code("%%writefile greet.py\nimport sys\nprint('hi', sys.argv[1:])")
    assert _out(ex) == "Writing greet.py\n"
    assert _out(shared_sandbox.run_code("%run greet.py a b")) == "hi ['a', 'b']\n"
    ex = shared_sandbox.run_code("%%html\n<b>bold</b>")
    assert ex.results and ex.results[0].html == "<b>bold</b>" and _out(ex) == ""


def test_timing_magics(shared_sandbox):
    ex = shared_sandbox.run_code("%timeit -n 50 -r 3 sum(range(100))")
    assert ex.error is None and "per loop (mean ± std. dev. of 3 runs, 50 loops each)" in _out(ex)
    ex = shared_sandbox.run_code("%time total = sum(range(10))\ntotal")
    assert "Wall time:" in _out(ex) and ex.text == "45"
    ex = shared_sandbox.run_code("%%time\nsum(range(5))")
    assert "CPU times: user" in _out(ex) and ex.text == "10"


def test_matplotlib_inline_and_configuration_lines_are_accepted(shared_sandbox):
    ex = shared_sandbox.run_code("%matplotlib inline\n%config InlineBackend.figure_format = 'retina'\n"
                                 "%load_ext autoreload\n%autoreload 2\n6 * 7")
    assert ex.error is None and ex.text == "42"
    ex = shared_sandbox.run_code("%matplotlib qt")
    assert ex.error.name == "UsageError" and "inline" in ex.error.value


def test_what_a_sandbox_cannot_do_is_said_clearly(shared_sandbox):
    ex = shared_sandbox.run_code("%load_data x")
    assert ex.error.name == "UsageError" and "%load_data is not available" in ex.error.value
    assert "%pip" in ex.error.value and "%%bash" in ex.error.value  # says what there is
    assert ex.error.traceback == f"UsageError: {ex.error.value}\n"
    ex = shared_sandbox.run_code("answer = input('name? ')")
    assert ex.error.name == "UsageError" and "stdin" in ex.error.value and "commands.run" in ex.error.value
    # %pip install without a network: answered at once, on stderr, not after pip's retries
    start = time.monotonic()
    ex = shared_sandbox.run_code("%pip install requests")
    assert time.monotonic() - start < 10
    assert ex.error is None and "no network" in _err(ex) and "network=" in _err(ex)
    assert shared_sandbox.run_code("_exit_code").text == "1"
    assert _out(shared_sandbox.run_code("%pip --version")).startswith("pip ")


def test_ipython_display_gives_results(shared_sandbox):
    ex = shared_sandbox.run_code("from IPython.display import display, HTML, Markdown, JSON\n"
                                 "display(HTML('<i>x</i>'), Markdown('# T'))\ndisplay(JSON({'a': 1}))")
    assert ex.error is None and _out(ex) == ""
    assert [r.html for r in ex.results[:1]] == ["<i>x</i>"]
    assert ex.results[1].markdown == "# T" and ex.results[2].json == {"a": 1}


def test_tracebacks_show_no_sandlot_frames(shared_sandbox):
    ex = shared_sandbox.run_code("%cd /no/such/dir")
    assert ex.error.name == "FileNotFoundError"
    assert "%cd /no/such/dir" in ex.error.traceback  # the user's own line, as they wrote it
    assert "magics.py" not in ex.error.traceback and "_agent" not in ex.error.traceback
    ex = shared_sandbox.run_code("import json\njson.loads('{bad')")
    assert "json/decoder.py" in ex.error.traceback and "_agent" not in ex.error.traceback  # library frames stay


def test_magic_like_lines_inside_strings_and_brackets_stay_python(shared_sandbox):
    ex = shared_sandbox.run_code('!echo start\ntext = """a\n%d items\n!not a command\n"""\nn = (7\n% 4)\n(text, n)')
    assert _out(ex) == "start\n"
    assert ex.text == repr(("a\n%d items\n!not a command\n", 3))
