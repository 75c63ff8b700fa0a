"""Prometheus metrics, in a registry of the app's own (two apps in one process never collide)."""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send


_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class _PoolCollector:
    """Warm-pool sizes, read when scraped."""

    def __init__(self, pool_stats: Callable[[], dict[str, int]]) -> None:
        self.pool_stats = pool_stats

    def collect(self):
        ready = GaugeMetricFamily("sandlot_pool_ready", "Sandboxes booted and waiting in a warm pool",
                                  labels=["template"])
        for template, count in sorted(self.pool_stats().items()):
            ready.add_metric([template], count)
        yield ready


def limit_label(result: Any) -> Optional[str]:
    """The metrics label of a command's outcome: the limit that ended it (``CommandResult.limit``, data, never
    words of its message), "other" for a command that could not run, None for one that ran to its exit."""
    if result.error is None:
        return None
    return result.limit or "other"


class _NetworkCollector:
    """Network use of the live sandboxes (their brokers' counters), read when scraped."""

    def __init__(self, totals: Callable[[], dict[str, int]]) -> None:
        self.totals = totals

    def collect(self):
        totals = self.totals()
        moved = GaugeMetricFamily("sandlot_network_bytes", "Bytes the live sandboxes moved through their brokers",
                                  labels=["direction"])
        moved.add_metric(["out"], totals.get("bytes_out", 0))
        moved.add_metric(["in"], totals.get("bytes_in", 0))
        yield moved
        connections = GaugeMetricFamily("sandlot_network_connections", "Connections of the live sandboxes, by outcome",
                                        labels=["outcome"])
        for outcome in ("allowed", "denied", "revoked", "open"):
            connections.add_metric([outcome], totals.get(outcome, 0))
        yield connections


class Metrics:
    def __init__(self, live: Callable[[], int], pool_stats: Callable[[], dict[str, int]],
                 network_totals: Callable[[], dict[str, int]] = dict) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        Gauge("sandlot_sandboxes_live", "Sandboxes alive on this server", registry=r).set_function(live)
        r.register(_PoolCollector(pool_stats))
        r.register(_NetworkCollector(network_totals))
        self.created = Counter("sandlot_sandboxes_created", "Sandboxes created", ["template"], registry=r)
        self.ended = Counter("sandlot_sandboxes_ended", "Sandboxes ended, by cause", ["cause"], registry=r)
        self.executions = Counter("sandlot_executions", "Code runs and commands, by outcome",
                                  ["kind", "outcome"], registry=r)
        self.execution_seconds = Histogram("sandlot_execution_seconds", "Wall time of code runs and commands",
                                           ["kind"], buckets=_LATENCY, registry=r)
        self.create_seconds = Histogram("sandlot_create_seconds", "Time to create a sandbox",
                                        buckets=_LATENCY, registry=r)
        self.limit_kills = Counter("sandlot_limit_kills", "Calls or sandboxes stopped by a limit", ["limit"],
                                   registry=r)
        self.requests = Histogram("sandlot_http_request_seconds", "HTTP latency to the response headers",
                                  ["method", "route", "status"], buckets=_LATENCY, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def execution(self, kind: str, seconds: float, error_limit: "str | None", failed: bool) -> None:
        outcome = "limit" if error_limit else ("error" if failed else "ok")
        self.executions.labels(kind, outcome).inc()
        self.execution_seconds.labels(kind).observe(seconds)
        if error_limit:
            self.limit_kills.labels(error_limit).inc()


class RequestTimer:
    """ASGI middleware: latency per route template (never the raw path, whose ids would explode cardinality)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = scope.get("route")
                path = getattr(route, "path", None) or "unmatched"
                self.metrics.requests.labels(scope["method"], path, str(message["status"])).observe(
                    time.monotonic() - started)
            await send(message)

        await self.app(scope, receive, timed_send)
