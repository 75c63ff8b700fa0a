"""Reading cells for `sandlot shell`: a prompt_toolkit editor on a terminal, plain lines from a pipe.

Both decide when a cell is complete the way Python's own REPL does (codeop): an open bracket,
a trailing ``:`` or an indented block asks for more lines, and a blank line ends a block.
"""

from __future__ import annotations

import codeop
import os
import sys
import warnings
from pathlib import Path
from typing import Optional, Protocol

PROMPT, MORE = ">>> ", "... "


def needs_more(text: str) -> bool:
    """True while ``text`` is an unfinished cell (the REPL would show ``...``)."""
    if not text.strip():
        return False
    lines = text.split("\n")
    if len(lines) > 1 and not lines[-1].strip():
        return False  # a blank line ends a block, as in the REPL
    last = lines[-1]
    if last.rstrip().endswith(":") or (len(lines) > 1 and last[:1] in (" ", "\t")):
        return True  # inside a block: wait for the blank line so `else:` / more body can follow
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SyntaxWarnings are the sandbox's to report
        try:
            return codeop.compile_command(text, "<cell>", "exec") is None
        except (SyntaxError, ValueError, OverflowError):
            return False  # send it: the sandbox reports the error with its traceback


class CellReader(Protocol):
    def read_cell(self) -> str:
        """One complete cell. Raises EOFError at the end (Ctrl-D), KeyboardInterrupt on Ctrl-C."""


class PipeReader:
    """Lines from a non-terminal stdin (scripts, tests): no prompts, no editing."""

    def read_cell(self) -> str:
        lines: list[str] = []
        while True:
            line = sys.stdin.readline()
            if not line:
                if lines:
                    return "\n".join(lines)
                raise EOFError
            lines.append(line.rstrip("\n"))
            text = "\n".join(lines)
            if not needs_more(text):
                if text.strip():
                    return text.rstrip("\n")
                lines = []


def history_path() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "sandlot" / "shell_history"


class TerminalReader:
    """A multi-line editor with persistent history and Python highlighting.

    Enter runs the cell when it is complete and opens an indented new line when it is not;
    Esc then Enter runs the cell as it stands.
    """

    def __init__(self, history_file: Optional[Path] = None) -> None:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, InMemoryHistory
        from prompt_toolkit.key_binding import KeyBindings

        history_file = history_file or history_path()
        try:
            history_file.parent.mkdir(parents=True, exist_ok=True)
            history_file.touch(exist_ok=True)
            history = FileHistory(str(history_file))
        except OSError:
            history = InMemoryHistory()  # a read-only home must not stop the shell
        bindings = KeyBindings()

        @bindings.add("enter")
        def _enter(event) -> None:  # type: ignore[no-untyped-def]
            buffer = event.current_buffer
            text = buffer.document.text
            if buffer.document.is_cursor_at_the_end and needs_more(text):
                line = buffer.document.current_line
                indent = line[:len(line) - len(line.lstrip())]
                if line.rstrip().endswith(":"):
                    indent += "    "
                buffer.insert_text("\n" + indent)
            else:
                buffer.validate_and_handle()

        @bindings.add("escape", "enter")
        def _force(event) -> None:  # type: ignore[no-untyped-def]
            event.current_buffer.validate_and_handle()

        lexer = None
        try:
            from prompt_toolkit.lexers import PygmentsLexer
            from pygments.lexers.python import PythonLexer

            lexer = PygmentsLexer(PythonLexer)
        except ImportError:
            pass
        self.session: PromptSession = PromptSession(
            history=history, key_bindings=bindings, multiline=True, lexer=lexer,
            prompt_continuation=lambda width, line_number, wrap_count: MORE)

    def read_cell(self) -> str:
        while True:
            text = self.session.prompt(PROMPT)
            if text.strip():
                return text.rstrip()  # the indentation Enter left on the closing blank line


def make_reader() -> CellReader:
    if sys.stdin.isatty() and sys.stdout.isatty():
        return TerminalReader()
    return PipeReader()
