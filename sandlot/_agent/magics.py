"""Notebook syntax in session cells: ``!cmd``, ``%magic`` lines and ``%%magic`` cells, as Jupyter runs them.

LLMs write cells for Jupyter. A cell that is plain Python is never touched (it parses: nothing to do). One
that does not parse is rewritten line by line: a line starting with ``!`` or ``%`` (after its indent, or
after ``name =``) becomes a call of the session's ``Magics``, and a first line ``%%name`` makes the whole
cell that magic. What Sandlot cannot do is a ``UsageError`` that says so, never a bare SyntaxError.
Stdlib only: this runs in the session process.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import timeit

NAME = "__sandlot_magic__"  # how rewritten cells reach the session's Magics
_LINE = re.compile(r"^(?P<indent>[ \t]*)(?:(?P<target>[A-Za-z_][\w.]*(?:\s*,\s*[A-Za-z_][\w.]*)*)\s*=\s*)?"
                   r"(?P<kind>!|%(?!%))(?P<rest>.*)$")
_EXPAND = re.compile(r"\{([^{}]+)\}|\$([A-Za-z_]\w*)")
_TIME_UNITS = ((1.0, "s"), (1e-3, "ms"), (1e-6, "\N{MICRO SIGN}s"), (1e-9, "ns"))


class UsageError(Exception):
    """A notebook magic Sandlot does not offer, or one used wrongly (as IPython names it)."""


def rewrite(code: str) -> str:
    """The cell as Python: unchanged when it parses; else its magics turned into calls (a cell that still
    does not parse is returned unchanged, so the user sees their own SyntaxError)."""
    try:
        ast.parse(code)
        return code
    except SyntaxError:
        pass
    lines = code.split("\n")
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is not None and lines[first].lstrip().startswith("%%"):
        head = lines[first].strip()[2:]
        name, _, args = head.partition(" ")
        body = "\n".join(lines[first + 1:])
        return f"{NAME}.cell({name!r}, {args.strip()!r}, {body!r})"
    inside = _continued_rows(code) or set()  # (a shell line can upset the tokenizer: then every line counts)
    out = []
    for row, line in enumerate(lines, 1):
        match = None if row in inside else _LINE.match(line)
        if match is None or not match.group("rest").strip():
            out.append(line)
            continue
        call = (f"{NAME}.system({match.group('rest').strip()!r}, capture={bool(match.group('target'))})"
                if match.group("kind") == "!" else f"{NAME}.line({match.group('rest').strip()!r})")
        target = match.group("target")
        out.append(match.group("indent") + (f"{target} = {call}" if target else call))
    rewritten = "\n".join(out)
    try:
        ast.parse(rewritten)
    except SyntaxError:
        return code
    return rewritten


def _continued_rows(code: str):
    """Rows (1-based) that do not start a logical line: inside a multi-line string or within brackets. A
    ``%`` or ``!`` there is Python's (a format string, an operator), never a magic. None: not tokenizable
    (an unbalanced quote in a shell line, say)."""
    import io
    import tokenize

    rows, depth, seen = set(), 0, set()
    try:
        for token in tokenize.generate_tokens(io.StringIO(code).readline):
            start, end = token.start[0], token.end[0]
            if start not in seen:
                seen.add(start)
                if depth > 0:
                    rows.add(start)
            if token.type == tokenize.STRING and end > start:
                rows.update(range(start + 1, end + 1))
            elif token.type == tokenize.OP and token.string in "([{":
                depth += 1
            elif token.type == tokenize.OP and token.string in ")]}":
                depth = max(0, depth - 1)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return None
    return rows


def _human_time(seconds: float) -> str:
    for scale, unit in _TIME_UNITS:
        if seconds >= scale or scale == 1e-9:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds:.3g} s"


class Magics:
    """What the rewritten calls do, in the session's namespace."""

    def __init__(self, namespace: dict, display_data) -> None:
        self.namespace = namespace
        self.display_data = display_data

    # -- shell ------------------------------------------------------------------------------------------
    def expand(self, command: str) -> str:
        """``{expr}`` and ``$name`` from the session's variables, as IPython expands them (an unknown
        ``$NAME`` is left for the shell: an environment variable)."""
        def one(match: "re.Match") -> str:
            if match.group(1) is not None:
                return str(eval(match.group(1), self.namespace))
            name = match.group(2)
            return str(self.namespace[name]) if name in self.namespace else match.group(0)
        return _EXPAND.sub(one, command)

    def system(self, command: str, capture: bool = False, shell: str = "/bin/sh", expand: bool = True):
        """``!cmd``: run in a shell, output streamed as the cell's (``x = !cmd``: its lines, as a list).
        The exit status is ``_exit_code``. A ``%%bash`` cell is the shell's as written (``expand=False``)."""
        if expand:
            command = self.expand(command)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        if capture:
            done = subprocess.run([shell, "-c", command], stdout=subprocess.PIPE, text=True, errors="replace")
            self.namespace["_exit_code"] = done.returncode
            return done.stdout.splitlines()
        done = subprocess.run([shell, "-c", command])
        self.namespace["_exit_code"] = done.returncode
        return None

    # -- %line magics -----------------------------------------------------------------------------------
    def line(self, text: str):
        name, _, args = text.partition(" ")
        handler = getattr(self, "_line_" + name, None)
        if handler is None:
            raise UsageError(f"%{name} is not available in a Sandlot session. Available: "
                             + ", ".join("%" + n[6:] for n in dir(self) if n.startswith("_line_"))
                             + "; cell magics: " + ", ".join("%%" + n[6:] for n in dir(self) if n.startswith("_cell_"))
                             + "; and !shell commands")
        return handler(args.strip())

    def _line_pip(self, args: str):
        """``%pip install x``: pip of the session's Python, into the user's home (importable at once)."""
        argv = shlex.split(self.expand(args))
        if argv[:1] == ["install"] and not _network():
            sys.stderr.write("%pip install: this sandbox has no network, so pip cannot reach a package index. "
                             "Create the sandbox with network={'allow': ['pypi.org', 'files.pythonhosted.org']} "
                             "(or a template that has the package) and try again.\n")
            self.namespace["_exit_code"] = 1
            return None
        placed = {"--target", "-t", "--prefix", "--root", "--user"}
        if argv[:1] == ["install"] and not any(a.split("=", 1)[0] in placed or (a.startswith("-t") and a != "-t")
                                               for a in argv):
            target = _user_packages()
            argv[1:1] = ["--target", target, "--upgrade"]
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        done = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *argv])
        self.namespace["_exit_code"] = done.returncode
        if done.returncode == 0:
            import importlib

            importlib.invalidate_caches()
        return None

    def _line_conda(self, args: str):
        raise UsageError("%conda: there is no conda in a Sandlot session; use %pip install (with a network)")

    def _line_matplotlib(self, args: str):
        """``%matplotlib inline``: already so (figures are results); any other backend has no screen here."""
        if args and args not in ("inline",):
            raise UsageError(f"%matplotlib {args}: only the inline backend exists in a sandbox (figures come back "
                             "as image results)")
        return None

    def _line_config(self, args: str):
        return None  # InlineBackend options and the like: accepted, nothing to configure here

    def _line_load_ext(self, args: str):
        if args.strip() != "autoreload":
            raise UsageError(f"%load_ext {args}: IPython extensions are not available in a Sandlot session")
        return None

    def _line_autoreload(self, args: str):
        return None  # each call already runs the code as sent; modules are not watched

    def _line_cd(self, args: str):
        os.chdir(os.path.expanduser(self.expand(args) or "~"))
        print(os.getcwd())
        return None

    def _line_pwd(self, args: str):
        return os.getcwd()

    def _line_env(self, args: str):
        if not args:
            return dict(os.environ)
        if "=" in args:
            key, _, value = args.partition("=")
            os.environ[key.strip()] = self.expand(value.strip())
            return None
        return os.environ.get(args)

    def _line_system(self, args: str):
        return self.system(args, capture=True)

    def _line_sx(self, args: str):
        return self.system(args, capture=True)

    def _line_time(self, args: str):
        return self._time(args)

    def _line_timeit(self, args: str):
        return self._timeit(args, "")

    def _line_run(self, args: str):
        argv = shlex.split(self.expand(args))
        if not argv:
            raise UsageError("%run needs a script: %run path/to/script.py [args]")
        with open(argv[0]) as f:
            source = f.read()
        saved = sys.argv
        sys.argv = argv
        try:
            exec(compile(source, argv[0], "exec"), self.namespace)
        finally:
            sys.argv = saved
        return None

    # -- %%cell magics ----------------------------------------------------------------------------------
    def cell(self, name: str, args: str, body: str):
        handler = getattr(self, "_cell_" + name, None)
        if handler is None:
            raise UsageError(f"%%{name} is not available in a Sandlot session. Cell magics: "
                             + ", ".join("%%" + n[6:] for n in dir(self) if n.startswith("_cell_")))
        return handler(args, body)

    def _cell_bash(self, args: str, body: str):
        return self.system(body, shell="/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh", expand=False)

    def _cell_sh(self, args: str, body: str):
        return self.system(body, expand=False)

    def _cell_writefile(self, args: str, body: str):
        argv = shlex.split(args)
        append = "-a" in argv or "--append" in argv
        paths = [a for a in argv if not a.startswith("-")]
        if len(paths) != 1:
            raise UsageError("%%writefile [-a] FILE")
        with open(os.path.expanduser(paths[0]), "a" if append else "w") as f:
            f.write(body + ("\n" if body and not body.endswith("\n") else ""))
        print(("Appended to " if append else "Writing ") + paths[0])
        return None

    def _cell_time(self, args: str, body: str):
        return self._time(body)

    def _cell_timeit(self, args: str, body: str):
        return self._timeit(args, body)

    def _cell_html(self, args: str, body: str):
        self.display_data({"text/html": body, "text/plain": "<IPython.core.display.HTML object>"})

    def _cell_markdown(self, args: str, body: str):
        self.display_data({"text/markdown": body, "text/plain": body})

    def _cell_capture(self, args: str, body: str):
        raise UsageError("%%capture is not available: stdout and stderr are already returned separately")

    # -- timing -----------------------------------------------------------------------------------------
    def _time(self, code: str):
        """Run once; print CPU and wall time as IPython does; an expression's value is the result."""
        tree = ast.parse(code)
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        before, wall = os.times(), time.perf_counter()
        exec(compile(tree, "<%time>", "exec"), self.namespace)
        value = eval(compile(ast.Expression(last.value), "<%time>", "eval"), self.namespace) if last else None
        after, wall = os.times(), time.perf_counter() - wall
        user, system = after.user - before.user, after.system - before.system
        print(f"CPU times: user {_human_time(user)}, sys: {_human_time(system)}, total: {_human_time(user + system)}\n"
              f"Wall time: {_human_time(wall)}")
        return value

    def _timeit(self, args: str, body: str):
        """``%timeit [-n N] [-r R] stmt`` / ``%%timeit [-n N] [-r R] [setup]`` + body."""
        argv = args.split()
        number = repeat = None
        rest = []
        i = 0
        while i < len(argv):
            if argv[i] in ("-n", "-r") and i + 1 < len(argv):
                if argv[i] == "-n":
                    number = int(argv[i + 1])
                else:
                    repeat = int(argv[i + 1])
                i += 2
            else:
                rest.append(argv[i])
                i += 1
        stmt, setup = (body, " ".join(rest) or "pass") if body else (" ".join(rest), "pass")
        if not stmt.strip():
            raise UsageError("%timeit needs a statement")
        timer = timeit.Timer(stmt, setup, globals=self.namespace)
        if number is None:
            number, _ = timer.autorange()
        repeat = repeat or 7
        runs = [t / number for t in timer.repeat(repeat=repeat, number=number)]
        mean = sum(runs) / len(runs)
        std = (sum((r - mean) ** 2 for r in runs) / len(runs)) ** 0.5
        print(f"{_human_time(mean)} \N{PLUS-MINUS SIGN} {_human_time(std)} per loop (mean \N{PLUS-MINUS SIGN} std. dev. "
              f"of {repeat} run{'s' if repeat != 1 else ''}, {number:,} loop{'s' if number != 1 else ''} each)")
        return None


def _network() -> bool:
    """Whether a package index could be reached at all (a sandbox without a network fails at once)."""
    try:
        socket.getaddrinfo("pypi.org", 443, type=socket.SOCK_STREAM)
        return True
    except OSError:
        return False


def _user_packages() -> str:
    """Where %pip installs (the user's home: the template's site-packages are read-only), on sys.path."""
    target = os.path.expanduser("~/.local/lib/python%d.%d/site-packages" % sys.version_info[:2])
    os.makedirs(target, exist_ok=True)
    if target not in sys.path:
        sys.path.insert(0, target)
    return target


def no_input(prompt: str = "") -> str:
    """``input()`` in a session: there is no one to type. Say so, and what to do instead."""
    raise UsageError("input() cannot read in a Sandlot session: code runs without an interactive stdin. Put the "
                     "data in the code or a file (files.write), or run a program that reads stdin with "
                     "commands.run(cmd, stdin=...)")
