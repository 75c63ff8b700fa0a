"""Showing an Execution to a person: streamed output, results as text, images saved to files.

Output is written as it arrives (the SDK's callbacks), so a long loop shows progress live;
results and errors are printed once the call ends.
"""

from __future__ import annotations

import base64
import itertools
import os
import sys
import threading
from pathlib import Path
from typing import Callable, Optional

from rich.markup import escape

from .._models import Execution, ExecutionError, Result
from ._common import err
from ._terminal import SGR_RESET, TerminalText, for_stream, is_terminal

_IMAGE_FORMATS = (("png", "png"), ("jpeg", "jpg"), ("svg", "svg"))


class LiveOutput:
    """Callbacks for run_code that copy the sandbox's stdout/stderr to ours as chunks arrive.

    A stream that is a terminal gets the text with its escape sequences shown, not obeyed
    (``_terminal``); a pipe or file gets it unchanged. ``end()`` once the sandbox's output is over.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._lock = threading.Lock()  # callbacks run on the SDK's loop thread
        self.wrote_newline = True
        # Per terminal stream, the escape a chunk may have split (isatty is asked at each write).
        self._terminal: dict[int, TerminalText] = {}

    def _write(self, stream, text: str) -> None:
        if not self.enabled or not text:
            return
        with self._lock:
            if is_terminal(stream):
                text = self._terminal.setdefault(id(stream), TerminalText()).feed(text)
                if not text:
                    return
            stream.write(text)
            stream.flush()
            self.wrote_newline = text.endswith("\n")

    def end(self) -> None:
        """Write what a terminal stream still holds (a split escape) and reset colours the sandbox set."""
        with self._lock:
            for stream in (sys.stdout, sys.stderr):
                held = self._terminal.pop(id(stream), None)
                rest = held.end() if held else ""
                if rest:
                    stream.write(rest)
                    stream.flush()
                    text = rest.removesuffix(SGR_RESET)
                    if text:
                        self.wrote_newline = text.endswith("\n")

    def on_stdout(self, text: str) -> None:
        self._write(sys.stdout, text)

    def on_stderr(self, text: str) -> None:
        self._write(sys.stderr, text)

    def callbacks(self) -> dict[str, Callable[[str], None]]:
        return {"on_stdout": self.on_stdout, "on_stderr": self.on_stderr}


class ImagesNotSaved(Exception):
    """--save-images DIR cannot hold the images (not a directory, not writable, disk full): a usage error."""


class ImageSaver:
    """Writes image results to DIR as image-1.png, image-2.png... (numbers continue across calls)."""

    def __init__(self, directory: Optional[str]) -> None:
        self.directory = Path(directory) if directory else None
        self._numbers = itertools.count(1)

    def check(self) -> None:
        """Raise ImagesNotSaved now if DIR could not be made or written (DIR itself is made at the first image)."""
        if self.directory is None:
            return
        nearest = self.directory.absolute()
        while not nearest.exists() and nearest != nearest.parent:
            nearest = nearest.parent
        if not nearest.is_dir():
            raise ImagesNotSaved(f"--save-images {self.directory}: {nearest} is not a directory")
        if not os.access(nearest, os.W_OK | os.X_OK):
            raise ImagesNotSaved(f"--save-images {self.directory}: {nearest} is not writable by this user; "
                                 "give a directory you can write")

    def save(self, result: Result) -> list[str]:
        if self.directory is None:
            return []
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            saved = []
            for field, ext in _IMAGE_FORMATS:
                data = getattr(result, field)
                if data is None:
                    continue
                path = self._free_path(ext)
                raw = data.encode() if field == "svg" else base64.b64decode(data)
                path.write_bytes(raw)
                saved.append(str(path))
                break  # one file per image: the first format is the richest the figure offered
            return saved
        except OSError as exc:
            raise ImagesNotSaved(f"--save-images {self.directory}: cannot save an image there: "
                                 f"{exc.strerror or exc}") from None

    def _free_path(self, ext: str) -> Path:
        assert self.directory is not None
        while True:
            path = self.directory / f"image-{next(self._numbers)}.{ext}"
            if not path.exists():
                return path


def has_image(result: Result) -> bool:
    return any(getattr(result, field) is not None for field, _ in _IMAGE_FORMATS)


def show_results(execution: Execution, saver: ImageSaver, live: LiveOutput) -> list[str]:
    """Print each result's text (images are saved or mentioned instead); return saved image paths."""
    live.end()
    saved: list[str] = []
    for result in execution.results:
        if has_image(result):
            paths = saver.save(result)
            saved += paths
            if paths:
                err.print(f"[dim]image saved to {escape(paths[0])}[/]")
            else:
                kind = next(f for f, _ in _IMAGE_FORMATS if getattr(result, f) is not None)
                err.print(f"[dim]<image/{kind} result: pass --save-images DIR to keep it>[/]")
            continue
        text = result.text
        if text is None:
            formats = ", ".join(result.formats()) or "no"
            err.print(f"[dim]<result with {formats} data>[/]")
            continue
        if not live.wrote_newline:
            sys.stdout.write("\n")
        sys.stdout.write(for_stream(sys.stdout, text) + "\n")
        sys.stdout.flush()
        live.wrote_newline = True
    return saved


def show_error(error: ExecutionError, exits: bool = False) -> None:
    """The error's traceback on stderr. ``exits``: it is sys.exit(value), which, as Python does, prints
    nothing for an integer and the value itself for anything else (``sys.exit("bye")``)."""
    if not error:
        return
    if exits:
        if not error.value.lstrip("-").isdigit():
            err.print(for_stream(sys.stderr, error.value), markup=False, highlight=False)
        return
    text = error.traceback.rstrip("\n") if error.traceback.strip() else f"{error.name}: {error.value}"
    if error.limit and error.value not in text:
        text += f"\n{error.name}: {error.value}"
    # The traceback's text is the sandbox's (an exception message can carry escapes).
    err.print(for_stream(sys.stderr, text), style="red", markup=False, highlight=False)


def execution_dict(execution: Execution, sandbox_id: Optional[str], images: list[str]) -> dict:
    """The --json form of one call: everything a script needs, images as files and as base64."""
    error = execution.error
    return {
        "ok": error is None,
        "sandbox_id": sandbox_id,
        "stdout": "".join(execution.logs.stdout),
        "stderr": "".join(execution.logs.stderr),
        "text": execution.text,
        "results": [_result_dict(r) for r in execution.results],
        "error": None if error is None else {"name": error.name, "value": error.value,
                                             "traceback": error.traceback, "limit": error.limit},
        "execution_count": execution.execution_count,
        "usage": {"cpu_seconds": execution.usage.cpu_seconds, "peak_memory": execution.usage.peak_memory,
                  "wall_seconds": execution.usage.wall_seconds},
        "truncated": execution.truncated,
        "images": [os.path.abspath(p) for p in images],
    }


def _result_dict(result: Result) -> dict:
    data = {name: getattr(result, name) for name in result.formats()}
    data["is_main_result"] = result.is_main_result
    if result.extra:
        data["extra"] = result.extra
    return data
