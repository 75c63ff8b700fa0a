"""Sandbox output on the operator's terminal: shown, never obeyed.

Code in a sandbox decides every byte it prints. Copied verbatim to a terminal, escape sequences would
act on the operator's machine: OSC 52 writes the clipboard, OSC 8 plants links, OSC 0/2 change the title,
CSI moves the cursor or clears the screen (hiding what ran), DCS and device-status requests make the
terminal *type* answers into the CLI's input. So, on a terminal only, every control character is
printed as a visible escape (``\\x1b]52;...``) while newlines, tabs, carriage returns (progress bars)
and all printable text, UTF-8 included, pass unchanged.

Plain SGR sequences (``ESC [ digits ; : m``: colours, bold, underline) pass too: test runners, ls,
rich and tracebacks use them, they only style the text that follows, and the CLI resets them when the
sandbox's output ends so they cannot restyle Sandlot's own messages. Everything else from ESC on
(other CSI, OSC, DCS, APC, PM, SOS, charset switches) is shown, not sent.

Pipes and files (``> out.txt``, ``--json``, ``cp ... -`` into a file) get the bytes unchanged.
"""

from __future__ import annotations

import codecs
import re
from typing import IO, Optional

SGR_RESET = "\x1b[0m"
_KEPT_CONTROLS = "\n\t\r"
# C0 controls (but the kept ones), DEL and C1 controls: each shown as \xNN.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\x80-\x9f]")
_SGR = re.compile(r"\x1b\[[0-9;:]{0,64}m")
# A chunk may end in the middle of an SGR sequence; hold that tail back until the next chunk.
_PARTIAL_SGR = re.compile(r"\x1b(\[[0-9;:]{0,64})?\Z")


def is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def _show_control(match: "re.Match[str]") -> str:
    return "\\x%02x" % ord(match.group())


def neutralise(text: str) -> str:
    """``text`` with every control character visible, except newline, tab, CR and SGR colour sequences."""
    out = []
    position = 0
    for sgr in _SGR.finditer(text):
        out.append(_CONTROL.sub(_show_control, text[position:sgr.start()]))
        out.append(sgr.group())
        position = sgr.end()
    out.append(_CONTROL.sub(_show_control, text[position:]))
    return "".join(out)


def has_sgr(text: str) -> bool:
    return _SGR.search(text) is not None


class TerminalText:
    """One output stream of the sandbox as a terminal should get it: chunk by chunk, escapes shown.

    ``feed`` returns what to write now (an SGR split across chunks is completed first); ``end``
    returns what is left plus a reset if any colour passed, so the styles stop with the sandbox's text.
    """

    def __init__(self) -> None:
        self._held = ""
        self.styled = False

    def feed(self, text: str) -> str:
        text = self._held + text
        tail = _PARTIAL_SGR.search(text)
        self._held = tail.group() if tail else ""
        if tail:
            text = text[:tail.start()]
        shown = neutralise(text)
        self.styled = self.styled or has_sgr(shown)
        return shown

    def end(self) -> str:
        shown = neutralise(self._held)
        self._held = ""
        if self.styled:
            self.styled = False
            return shown + SGR_RESET
        return shown


class TerminalBytes:
    """Raw bytes (a file sent to stdout by `cp`) for a terminal: decoded as UTF-8 where they are,
    undecodable bytes shown as \\xNN, then neutralised like text."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="backslashreplace")
        self._text = TerminalText()

    def feed(self, data: bytes) -> str:
        return self._text.feed(self._decoder.decode(data))

    def end(self) -> str:
        return self._text.feed(self._decoder.decode(b"", final=True)) + self._text.end()


def for_stream(stream: IO[str], text: Optional[str]) -> Optional[str]:
    """A whole message (a result, an error) as ``stream`` should get it: neutralised on a terminal."""
    if text is None or not is_terminal(stream):
        return text
    shown = neutralise(text)
    return shown + SGR_RESET if has_sgr(shown) else shown
