"""``from IPython.display import display, HTML, Markdown, Image, ...`` in a session without IPython."""

from __future__ import annotations

import json as _json
import os


def display(*objs, raw: bool = False, **kwargs) -> None:
    """Each object becomes a rich result of the running call (as in a notebook)."""
    from _agent import display as current

    kernel = current.CURRENT
    for obj in objs:
        if kernel is None:
            print(repr(obj))
        elif raw and isinstance(obj, dict):
            kernel.display_data(obj)
        else:
            kernel.display(obj)


class _Data:
    mime = "text/plain"

    def __init__(self, data=None, url=None, filename=None, **kwargs) -> None:
        if filename is not None:
            with open(filename, "rb" if self._binary else "r") as f:
                data = f.read()
        elif data is not None and not self._binary and isinstance(data, str) and os.path.isfile(data) \
                and len(data) < 4096:
            with open(data) as f:
                data = f.read()
        self.data, self.url, self.metadata = data, url, kwargs

    _binary = False

    def __repr__(self) -> str:
        return "<IPython.core.display.%s object>" % type(self).__name__


class HTML(_Data):
    def _repr_html_(self):
        return self.data


class Markdown(_Data):
    def _repr_markdown_(self):
        return self.data


class Latex(_Data):
    def _repr_latex_(self):
        return self.data


class SVG(_Data):
    def _repr_svg_(self):
        return self.data


class Javascript(_Data):
    def _repr_javascript_(self):
        return self.data


class JSON(_Data):
    def _repr_json_(self):
        return self.data if not isinstance(self.data, str) else _json.loads(self.data)


class Image(_Data):
    _binary = True

    def __init__(self, data=None, url=None, filename=None, format=None, **kwargs) -> None:
        if isinstance(data, str) and os.path.isfile(data):
            data, filename = None, data
        super().__init__(data, url, filename, **kwargs)
        name = (filename or url or "").lower()
        self.format = format or ("jpeg" if name.endswith((".jpg", ".jpeg")) else "png")

    def _repr_png_(self):
        return self.data if self.format == "png" and isinstance(self.data, bytes) else None

    def _repr_jpeg_(self):
        return self.data if self.format == "jpeg" and isinstance(self.data, bytes) else None


def clear_output(wait: bool = False) -> None:
    """Nothing to clear: results are collected per call."""


__all__ = ["display", "HTML", "Markdown", "Latex", "SVG", "Javascript", "JSON", "Image", "clear_output"]
