"""The store's own errors."""

from __future__ import annotations

from ..._exceptions import SandlotError


class DatabaseInUse(SandlotError):
    """Another server process already serves this (SQLite) database."""


class DatabaseUnavailable(SandlotError):
    """The server's database cannot be reached or used (PostgreSQL down, a wrong URL, its driver missing).
    A request that meets it gets 503: the server is fine, retry once the database is back."""

    http_status = 503
