"""The stateful Python session: runs cells in one namespace, like a notebook kernel. Stdlib only.

Runs in its own process (a child of the agent) so that user code never holds the host channel.
Its stdout/stderr are pipes the agent reads; results and the end of each cell travel as frames on
a private socket. SIGINT is blocked except while user code runs, so an interrupt can never tear a
frame in half; a stale interrupt is discarded before the next cell starts.
"""

from __future__ import annotations

import ast
import base64
import io
import linecache
import os
import signal
import socket
import sys
import traceback
import types

from . import magics, protocol

_MIME_METHODS = (
    ("text/html", "_repr_html_"), ("text/markdown", "_repr_markdown_"), ("image/svg+xml", "_repr_svg_"),
    ("image/png", "_repr_png_"), ("image/jpeg", "_repr_jpeg_"), ("text/latex", "_repr_latex_"),
    ("application/json", "_repr_json_"), ("application/javascript", "_repr_javascript_"),
)
_MAX_REPR = 1024 * 1024
# The agent re-wraps each of our frames with a request id before it goes to the host, so ours must
# leave it room: a frame within a few bytes of MAX_HEADER used to crash the agent (pid 1), which
# killed the whole sandbox. Frames that do not fit are shrunk, never dropped or fatal.
_SEND_LIMIT = protocol.MAX_HEADER - 4096


class Kernel:
    def __init__(self, ctl: socket.socket) -> None:
        self.ctl = ctl
        self.pid = os.getpid()
        self.count = 0
        self.namespace: dict = {"__name__": "__main__", "__builtins__": __builtins__}
        self.namespace["display"] = self.display
        # Notebook syntax (``!cmd``, ``%pip``, ``%%bash``...), rewritten into calls of this (magics.py).
        self.namespace[magics.NAME] = magics.Magics(self.namespace, self.display_data)
        self.namespace["input"] = magics.no_input
        self.buffer = protocol.FrameBuffer()
        self.pending: list = []

    # -- channel to the agent ---------------------------------------------------------------
    def send(self, header: dict) -> None:
        # display() calls this from user code, where SIGINT is unblocked: an interrupt landing
        # inside sendall would raise KeyboardInterrupt half way through a frame and garble the
        # stream for the agent. The frame goes out whole; the interrupt is taken right after.
        frame = _bounded_frame(header)
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            self.ctl.sendall(frame)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def recv(self) -> dict:
        # Several frames can arrive in one read (an owner's env, then its first cell): keep them all.
        while not self.pending:
            data = self.ctl.recv(1 << 16)
            if not data:
                os._exit(0)
            self.pending.extend(header for header, _ in self.buffer.feed(data))
        return self.pending.pop(0)

    # -- rich display -----------------------------------------------------------------------
    def formats(self, value) -> dict:
        data = {}
        try:
            text = repr(_plain_scalar(value))
        except Exception as exc:  # a broken __repr__ is the user's bug, not ours
            text = "<repr failed: %s>" % exc
        data["text/plain"] = text[:_MAX_REPR]
        figure = _as_figure_png(value)
        if figure is not None:
            data["image/png"] = figure
        for mime, method in _MIME_METHODS:
            fn = getattr(value, method, None)
            if fn is None or isinstance(value, type) or mime in data:
                continue
            try:
                out = fn()
            except Exception:
                continue
            if out is None:
                continue
            if isinstance(out, tuple):  # (data, metadata) form
                out = out[0]
            if isinstance(out, bytes):
                out = base64.b64encode(out).decode()
            data[mime] = out
        return data

    def display(self, *values, is_main: bool = False) -> None:
        for value in values:
            self.send({"t": "result", "data": self.formats(value), "main": is_main})

    def display_data(self, data: dict) -> None:
        self.send({"t": "result", "data": data, "main": False})

    # -- running cells ----------------------------------------------------------------------
    def run_cell(self, code: str) -> dict:
        self.count += 1
        filename = "<cell-%d>" % self.count
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        _discard_pending_interrupt()
        error = None
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        try:
            value = self._execute(code, filename)
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            self._end_if_forked(None)  # before display: a child's value is not the cell's result
            if value is not None:
                self.namespace["_"] = value
                self.display(value, is_main=True)
        except BaseException as exc:  # noqa: BLE001 - everything the user raises is a result
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            if isinstance(exc, SystemExit):
                # An exit, not a failure to show with a traceback: sys.exit() and sys.exit(0) end the cell
                # cleanly (as `python -c` exits 0); another code is reported as SystemExit with that value.
                error = None if exc.code in (None, 0) else {"name": "SystemExit", "value": str(exc.code), "traceback": ""}
            else:
                error = _format_error(exc)
        self._end_if_forked(error)
        _flush_streams()
        self.flush_figures()
        return {"t": "done", "error": error, "execution_count": self.count}

    def _end_if_forked(self, error) -> None:
        """User code forked and the child came back out of the cell instead of exiting. It holds a copy
        of our channel: left alive it would answer this cell a second time and then compete with us for
        the next ones (a fork bomb left dozens of such copies holding the pids limit). It ends here, as
        the end of a forked child should."""
        if os.getpid() == self.pid:
            return
        if error is not None and error["name"] != "SystemExit":
            sys.stderr.write(error["traceback"])
        _flush_streams()
        os._exit(1 if error is not None else 0)

    def _execute(self, code: str, filename: str):
        tree = ast.parse(magics.rewrite(code), filename, "exec")
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
        body = compile(tree, filename, "exec", flags=flags, dont_inherit=True)
        _await_if_needed(eval(body, self.namespace))
        if last is None:
            return None
        expr = compile(ast.Expression(last.value), filename, "eval", flags=flags, dont_inherit=True)
        return _await_if_needed(eval(expr, self.namespace))

    def flush_figures(self) -> None:
        """Figures left open at the end of a cell are shown, as a notebook's inline backend does."""
        if "matplotlib.pyplot" in sys.modules:
            from . import mpl_backend

            mpl_backend.show()

    def warm_up(self) -> None:
        """Walk the paths of a cell once before any user code, in a scratch namespace.

        A fork of the zygote shares its pages; the first cell would pay a copy-on-write fault for
        every page its code touches (about 10 ms here). Paying that at boot keeps it off the first call.
        """
        scratch = Kernel.__new__(Kernel)
        scratch.namespace = {"__name__": "__warmup__", "__builtins__": __builtins__}
        try:
            value = scratch._execute("y = [1, 2]\nlen(y)", "<warm-up>")
            protocol.encode({"t": "result", "data": self.formats(value), "main": True})
            try:
                raise ValueError("warm-up")
            except ValueError as exc:
                protocol.encode({"t": "done", "error": _format_error(exc)})
            self.flush_figures()
        except Exception:
            pass

    def serve(self) -> None:
        while True:
            try:
                msg = self.recv()
            except KeyboardInterrupt:
                continue
            if msg.get("t") == "env" and isinstance(msg.get("env"), dict):
                try:
                    os.environ.update({str(k): str(v) for k, v in msg["env"].items()})
                except (ValueError, OSError):
                    pass  # the agent validated it; never let a bad name end the session
            elif msg.get("t") == "reseed":
                _reseed()
            elif msg.get("t") == "exec" and isinstance(msg.get("code"), str):
                self.send(self.run_cell(msg["code"]))


def _reseed() -> None:
    """A fork of this session (a restored copy) draws other random numbers than its parent."""
    import random

    random.seed()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        try:
            numpy.random.seed()
        except Exception:
            pass


def _frame_or_none(header: dict):
    try:
        frame = protocol.encode(header)
    except (protocol.ProtocolError, ValueError, TypeError):
        return None
    return frame if len(frame) - protocol.PREFIX.size <= _SEND_LIMIT else None


def _cut(text, keep: int, tail: bool = False) -> str:
    text = text if isinstance(text, str) else str(text)
    if len(text) <= keep:
        return text
    note = "\n[... %d characters cut: too large for one frame ...]\n" % (len(text) - keep)
    return note + text[-keep:] if tail else text[:keep] + note


def _bounded_frame(header: dict) -> bytes:
    """Encode ``header``; if it is too large (a huge repr, figure or exception message), shrink it:
    results keep only a cut text/plain, errors keep the start of the message and the end of the
    traceback. Raising here instead would end the session and lose its variables."""
    frame = _frame_or_none(header)
    keep = 64 * 1024
    while frame is None:
        if header.get("t") == "result":
            data = header.get("data") if isinstance(header.get("data"), dict) else {}
            smaller = dict(header, data={"text/plain": _cut(data.get("text/plain", ""), keep)})
        elif header.get("t") == "done" and isinstance(header.get("error"), dict):
            err = header["error"]
            smaller = dict(header, error={"name": _cut(err.get("name"), 200), "value": _cut(err.get("value"), keep),
                                          "traceback": _cut(err.get("traceback"), keep, tail=True)})
        else:
            smaller = {"t": str(header.get("t"))}
        frame = _frame_or_none(smaller)
        keep //= 2
    return frame


def _plain_scalar(value):
    """numpy 2 reprs its scalars as ``np.int64(6)``; show ``6``, as every notebook did before."""
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        try:
            return value.item()
        except Exception:
            return value
    return value


def _await_if_needed(value):
    if isinstance(value, types.CoroutineType):
        import asyncio

        return asyncio.new_event_loop().run_until_complete(value)
    return value


def _as_figure_png(value):
    if type(value).__module__.startswith("matplotlib.figure"):
        from . import mpl_backend

        return mpl_backend.figure_png(value)
    return None


def _discard_pending_interrupt() -> None:
    while signal.SIGINT in signal.sigpending():
        signal.sigtimedwait({signal.SIGINT}, 0)


def _flush_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


# Sandlot's own code (the agent package, by the host path it was imported from before the pivot, or by its
# path inside the sandbox): never a frame of a user's traceback.
_OWN_CODE = (os.path.dirname(os.path.abspath(__file__)) + os.sep, "/opt/sandlot/")


def _format_error(exc: BaseException) -> dict:
    if isinstance(exc, magics.UsageError):  # a notebook magic we do not offer: the message says it all
        return {"name": "UsageError", "value": str(exc), "traceback": "UsageError: %s\n" % exc}
    tb = exc.__traceback__
    # Hide the kernel's own frames: the traceback starts at the first line the user wrote.
    while tb is not None and not tb.tb_frame.f_code.co_filename.startswith("<cell-"):
        tb = tb.tb_next
    report = traceback.TracebackException(type(exc), exc, tb)
    _drop_own_frames(report, set())
    return {"name": type(exc).__name__, "value": str(exc), "traceback": "".join(report.format())}


def _drop_own_frames(report: traceback.TracebackException, seen: set) -> None:
    """Frames of Sandlot's own code (the magics, the display stand-ins) left out of a report and the
    exceptions chained to it; the user's and their libraries' frames stay."""
    if id(report) in seen:
        return
    seen.add(id(report))
    report.stack = traceback.StackSummary.from_list(
        [frame for frame in report.stack if not frame.filename.startswith(_OWN_CODE)])
    for chained in (report.__cause__, report.__context__):
        if chained is not None:
            _drop_own_frames(chained, seen)


def main(ctl_fd: int) -> None:
    if not any(p.endswith("-packages") for p in sys.path):
        import site

        site.main()  # the boot ran with -S; the session gets the template's site-packages
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
    # Line-buffered: each printed line leaves at once (streaming callbacks), as one chunk.
    sys.stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)), line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.BufferedWriter(io.FileIO(2, "w", closefd=False)), line_buffering=True)
    # IPython.display for notebook code, if the template has no IPython of its own (that one would win).
    # (The package's path, not __file__: the module was imported before the pivot, from the host's path.)
    sys.path.append(os.path.join(sys.modules[__package__].__path__[0], "compat"))
    kernel = Kernel(socket.socket(fileno=ctl_fd))
    kernel.warm_up()
    from . import display

    display.CURRENT = kernel
    kernel.serve()
