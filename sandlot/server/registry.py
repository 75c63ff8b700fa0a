"""The live sandboxes of this server: who owns which, ceilings and quotas at creation, and the reaper.

Sandboxes are made by the Engine (the one that owns this process's backends, zygotes and pools) from a
``SandboxSpec``; each live one is held as an ``AsyncSandbox`` over the engine's handle (so routes use the
SDK's validated calls) on the server's event loop; its own watchdog ends it at its idle timeout or lifetime. The reaper notices sandboxes that ended on their own (or crashed), records
why, and frees their quota; it also prunes old rows and the audit log. A tenant only ever reaches its own
sandboxes: anything else is "not found", worded the same whether the id belongs to another tenant or to nobody.

A tenant's memory and pids totals sum the limits of its sandboxes that hold them: running ones and
creations in flight. A paused sandbox (gVisor tier) waits on disk with no process and no memory, so it
does not count; waking it (resume, or any call) counts it again, and is refused (429) if it no longer fits.
What a paused sandbox holds is disk: its checkpoint, counted against the tenant's ``max_paused_bytes``.
Paused sandboxes are held again by the next server process (``startup``), still paused: the next call
wakes them, and their watchdog ends them (checkpoint removed) at their lifetime.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import dataclasses
import json
import logging
import time
from typing import Any, Iterator, Mapping, Optional

from .._backends.registry import backend_class
from .._engine import Engine, LocalTransport, default_engine
from .._local import LocalSandbox
from .._exceptions import InvalidRequest, QuotaExceeded, SandboxNotFound, SandlotError
from .._host import cgroups
from .._limits import Limits
from .._net.policy import NetworkPolicy
from .._models import PauseInfo
from .._sandbox import AsyncSandbox
from .._spec import SandboxSpec
from .._storage.mounts import mounts_to_json
from .._storage.volumes import sweep_mounts
from .._templates import get_template
from .background import CommandTable
from .metrics import Metrics
from .quotas import Usage, check_lifetime, check_live, check_paused_bytes, check_totals
from .settings import Settings, quotas_for
from .store import SandboxRow, Store, Tenant
from .volumes import TenantVolumes, tenant_scope

log = logging.getLogger("sandlot.server")
LOST_ON_RESTART = "the server stopped (restart or crash) while it ran; its processes were ended"
EXPIRED_GRACE = 60.0  # seconds past a row's lifetime before any replica records it ended (_end_expired)
NOT_TAKEN_BACK = "its server stopped (restart or crash) while it ran, and it could not be taken back: {}"
LOST_ON_SHUTDOWN = "the server shut down while it ran"
_HOUSEKEEPING_EVERY = 300.0  # seconds between pruning old rows and sweeping stale cgroups


@contextlib.contextmanager
def _reserved(table: dict[int, list[Limits]], tenant_id: int, limits: Limits) -> Iterator[None]:
    """``limits`` counts in ``table[tenant_id]`` while the block runs (a creation or resume in flight)."""
    entries = table.setdefault(tenant_id, [])
    entries.append(limits)
    try:
        yield
    finally:
        entries.remove(limits)
        if not entries and table.get(tenant_id) is entries:
            del table[tenant_id]


@dataclasses.dataclass
class LiveSandbox:
    sandbox: AsyncSandbox  # over the engine's LocalSandbox
    tenant: Tenant
    template: str
    created_at: float  # wall clock
    commands: CommandTable
    limits: Limits
    one_shot: bool = False

    @property
    def id(self) -> str:
        return self.sandbox.sandbox_id

    @property
    def local(self) -> LocalSandbox:
        """The engine's handle under the facade (what only the host can do: reach the sandbox's ports)."""
        return self.sandbox._live()  # type: ignore[return-value]


class _Hibernation:
    """The server's say in one sandbox's pauses and wakes (LocalSandbox.hooks): its tenant's quotas, and the
    database (its status survives a restart). Pauses and wakes by a request are audited by the registry with
    the request's key; those the server makes (an idle timeout, a call that found it paused) are audited here."""

    def __init__(self, registry: "Registry", live: LiveSandbox) -> None:
        self.registry, self.live = registry, live

    def check_pause(self, checkpoint_bytes: int) -> None:
        registry, tenant = self.registry, self.live.tenant
        others = registry.usage(tenant).paused_bytes - self.live.local.checkpoint_bytes  # it counts itself now
        check_paused_bytes(tenant.name, others, checkpoint_bytes, quotas_for(registry.settings, tenant))

    def paused(self, info: PauseInfo, idle: bool) -> None:
        store = self.registry.store
        store.set_paused(self.live.id, True, info.checkpoint_bytes)
        if idle:
            store.audit(self.live.tenant.name, "pause", self.live.id,
                        f"idle_timeout: {info.checkpoint_bytes} bytes in {info.seconds:.2f} s")

    async def wake(self, restore, explicit: bool) -> PauseInfo:
        registry, live = self.registry, self.live
        # It holds memory and pids again once awake: it must fit the tenant's totals (429 if not).
        check_totals(live.tenant.name, registry.usage(live.tenant), live.limits,
                     quotas_for(registry.settings, live.tenant))
        with _reserved(registry._resuming, live.tenant.id, live.limits):
            info = await restore()
        registry.store.set_paused(live.id, False)
        if not explicit:
            registry.store.audit(live.tenant.name, "resume", live.id, f"woken by a call in {info.seconds:.2f} s")
        return info


class Registry:
    def __init__(self, store: Store, settings: Settings, metrics: Metrics, engine: Optional[Engine] = None) -> None:
        self.engine = engine or default_engine()
        self.transport = LocalTransport(self.engine)
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.live: dict[str, LiveSandbox] = {}
        self._creating: dict[int, list[Limits]] = {}  # tenant id -> creations in flight (they count against quotas)
        self._resuming: dict[int, list[Limits]] = {}  # tenant id -> resumes in flight (they count against totals)
        self._tasks: set[asyncio.Task] = set()
        self._reaper: Optional[asyncio.Task] = None
        self._taking: dict[str, asyncio.Lock] = {}  # sandbox id -> a takeover from another server in flight
        self.volumes = TenantVolumes(self.engine, store, settings)  # each tenant's named volumes

    # -- counts --------------------------------------------------------------------------------------
    def live_count(self, tenant: Optional[Tenant] = None) -> int:
        if tenant is None:
            return len(self.live) + sum(len(c) for c in self._creating.values())
        return self.usage(tenant).live

    def usage(self, tenant: Tenant) -> Usage:
        """What the tenant holds now: live sandboxes, and the memory and pids limits of those not paused. On a
        database that replicas share, what every server's rows hold (this process's one-shot runs, which have no
        row, and its creates in flight on top); else with the sandboxes of a tier any server reaches that no
        process holds now (their running rows, taken back on demand)."""
        if self.store.shared:
            rows = self.store.counts(tenant)
            one_shots = [s.limits for s in self.live.values() if s.tenant.id == tenant.id and s.one_shot]
            pending = one_shots + self._creating.get(tenant.id, []) + self._resuming.get(tenant.id, [])
            return Usage(live=rows.live + len(one_shots) + len(self._creating.get(tenant.id, ())),
                         memory=rows.memory + sum(limits.memory for limits in pending),
                         pids=rows.pids + sum(limits.pids for limits in pending), paused_bytes=rows.paused_bytes)
        mine = [s for s in self.live.values() if s.tenant.id == tenant.id]
        elsewhere = self._held_elsewhere(tenant)
        holding = ([s.limits for s in mine if not s.sandbox.is_paused] + self._creating.get(tenant.id, [])
                   + self._resuming.get(tenant.id, []) + elsewhere)
        paused_bytes = sum(s.local.checkpoint_bytes for s in mine if s.sandbox.is_paused)
        return Usage(live=len(mine) + len(self._creating.get(tenant.id, ())) + len(elsewhere),
                     memory=sum(limits.memory for limits in holding), pids=sum(limits.pids for limits in holding),
                     paused_bytes=paused_bytes)

    def _held_elsewhere(self, tenant: Tenant) -> "list[Limits]":
        """The limits of the tenant's running sandboxes on a tier any replica reaches that this one does not hold
        (another replica's, or no server's since one died: their pods run on their lease until their lifetime)."""
        if not any(self._anywhere(isolation) for isolation in self.settings.isolations):
            return []
        now = time.time()
        return [Limits.build(row.limits) for row in self.store.sandboxes(tenant, status="running", limit=1_000_000)
                if row.id not in self.live and self._anywhere(row.isolation)
                and (row.expires_at is None or row.expires_at > now)]

    # -- create --------------------------------------------------------------------------------------
    def _limits(self, tenant: Tenant, limits: Optional[Mapping[str, Any]], timeout: Optional[float]) -> Limits:
        quotas = quotas_for(self.settings, tenant)
        ceilings = self.settings.ceilings
        requested = dict(limits or {})
        if timeout is not None:
            requested["lifetime"] = timeout
        built = Limits.build(requested)
        ceilings.check(requested, built)  # what the tenant asked for: 400 over a ceiling...
        built = ceilings.lower_defaults(built, requested)  # ...what it did not ask for: lowered to fit
        if requested.get("lifetime") is None:  # the default lifetime, shortened to what the tenant may have
            built = dataclasses.replace(built, lifetime=min(built.lifetime, quotas.max_lifetime))
        check_lifetime(tenant.name, built.lifetime, quotas)
        return built

    def check_call_timeout(self, seconds: Optional[float]) -> None:
        """A call's own timeout (code, commands) may not pass the server's ``timeout`` ceiling."""
        self.settings.ceilings.check_call_timeout(seconds)

    async def create(self, tenant: Tenant, *, template: str = "python", timeout: Optional[float] = None,
                     limits: Optional[Mapping[str, Any]] = None, env: Optional[Mapping[str, str]] = None,
                     metadata: Optional[Mapping[str, str]] = None, isolation: Optional[str] = None,
                     one_shot: bool = False, network: Any = None, secrets: Any = None,
                     mounts: Any = None, on_idle: str = "kill", code: Optional[str] = None) -> LiveSandbox:
        isolation = isolation or self.settings.isolations[0]  # the operator's first tier is the default
        if isolation not in self.settings.isolations:
            raise InvalidRequest(f"isolation {isolation[:32]!r} is not enabled on this server; "
                                 f"enabled: {list(self.settings.isolations)}")
        built = self._limits(tenant, limits, timeout)
        quotas = quotas_for(self.settings, tenant)
        check_live(tenant.name, self.live_count(tenant), quotas)
        check_totals(tenant.name, self.usage(tenant), built, quotas)
        if self.live_count() >= self.settings.max_live_total:
            raise QuotaExceeded(f"this server is at capacity ({self.settings.max_live_total} live sandboxes); "
                                "retry later", retry_after=5.0)
        if (network is not None or secrets) and not self.settings.allow_network:
            raise InvalidRequest("this server gives sandboxes no network: its operator enables it with "
                                 "`sandlot serve --allow-network`")
        if network is None and not self.settings.allow_network and get_template(template).network is not None:
            # the engine would apply the template's default (sandbox.yaml `network:`) past the check above
            raise InvalidRequest(f"template {template!r} gives its sandboxes a network, and this server gives "
                                 "sandboxes none: its operator enables it with `sandlot serve --allow-network`")
        spec = SandboxSpec.build(template, isolation=isolation, limits=built, env=env, metadata=metadata,
                                 network=network, secrets=secrets, mounts=mounts, on_idle=on_idle)
        self._check_special(spec.network)
        self._check_network_ceiling(spec.network, spec.secrets)
        # What will be granted: the owner's mounts over the template's defaults (sandbox.yaml), as the engine
        # resolves them; the engine checks host directories against the operator's roots when it opens them.
        granted = self.engine.resolve(spec)[0].mounts
        started = time.monotonic()
        # Reserved before the first await: concurrent creations see each other in the checks above.
        with _reserved(self._creating, tenant.id, built):
            local = await self.engine.create(spec, scope=tenant_scope(tenant),
                                             host_dir_roots=self.settings.host_dir_roots, outlive=not one_shot,
                                             code=code)
            sandbox = AsyncSandbox._of(local, spec, self.transport)
        self.metrics.create_seconds.observe(time.monotonic() - started)
        self.metrics.created.labels(template).inc()
        now = time.time()
        live = LiveSandbox(sandbox, tenant, template, now, CommandTable(self.settings.max_background_commands),
                          built, one_shot)
        self.live[live.id] = live
        if not one_shot:
            local.hooks = _Hibernation(self, live)
            self.store.add_sandbox(live.id, tenant, template, dict(metadata or {}), built.to_dict(), now,
                                   now + built.lifetime, sandbox.isolation, spec.on_idle)
            detail = {"template": template, "metadata": dict(metadata or {})}
            if spec.network is not None or spec.secrets is not None:  # secrets by name and host, never value
                detail.update(network=spec.network.to_json() if spec.network else None,
                              secrets=spec.secrets.to_json() if spec.secrets else None)
            if granted:  # host directories by path and mode, volumes by name: what this sandbox may reach
                detail["mounts"] = mounts_to_json(granted)
            self.store.audit(tenant.name, "create", live.id, json.dumps(detail), tenant.key_id)
            self._keep_handle(live)
        elif granted:  # a one-shot run's grants are on the record too
            self.store.audit(tenant.name, "run_once_mounts", live.id, json.dumps(mounts_to_json(granted)),
                             tenant.key_id)
        return live

    def _keep_handle(self, live: LiveSandbox) -> None:
        """Record what the next server process takes a durable sandbox back from (its environment stays out:
        the sandbox holds it; the database holds no values the owner gave it)."""
        if live.local.durable:
            kept = dataclasses.replace(live.local.current_spec(), env={})
            self.store.set_handle(live.id, {"record": live.local.backend_sandbox.describe(), "spec": kept.to_json(),
                                            "host": socket.gethostname()})

    # -- fork -----------------------------------------------------------------------------------------
    async def fork(self, tenant: Tenant, sandbox_id: str) -> LiveSandbox:
        """A copy of the tenant's live (or paused) sandbox as a new sandbox of the same tenant: it counts toward
        the quotas as a create with the parent's limits does (429 over them), gets its own row (the parent's
        template, limits and metadata) and an audit row "fork" naming the parent."""
        parent = await self.find(tenant, sandbox_id)
        limits = parent.limits
        quotas = quotas_for(self.settings, tenant)
        check_live(tenant.name, self.live_count(tenant), quotas)
        check_totals(tenant.name, self.usage(tenant), limits, quotas)
        if self.live_count() >= self.settings.max_live_total:
            raise QuotaExceeded(f"this server is at capacity ({self.settings.max_live_total} live sandboxes); "
                                "retry later", retry_after=5.0)
        started = time.monotonic()
        with _reserved(self._creating, tenant.id, limits):  # counted from the first await, as a create is
            sandbox = await parent.sandbox.fork()
        self.metrics.create_seconds.observe(time.monotonic() - started)
        self.metrics.created.labels(parent.template).inc()
        now = time.time()
        live = LiveSandbox(sandbox, tenant, parent.template, now, CommandTable(self.settings.max_background_commands),
                           limits)
        self.live[live.id] = live
        metadata = dict(parent.sandbox.metadata)
        self.store.add_sandbox(live.id, tenant, parent.template, metadata, limits.to_dict(), now,
                               now + sandbox.limits.lifetime, sandbox.isolation)
        self.store.audit(tenant.name, "fork", live.id, json.dumps({"parent": sandbox_id, "template": parent.template,
                                                                   "metadata": metadata}), tenant.key_id)
        self._keep_handle(live)
        return live

    # -- lookup --------------------------------------------------------------------------------------
    async def find(self, tenant: Tenant, sandbox_id: str) -> LiveSandbox:
        """The tenant's live sandbox (``get``), or one that another server holds or held, taken over now where its
        tier reaches it from here (a cluster's pod: replicas share the database). SandboxNotFound otherwise."""
        try:
            return self.get(tenant, sandbox_id)
        except SandboxNotFound:
            row = self.store.sandbox(tenant, sandbox_id)
            if row is None or row.status != "running" or not self._anywhere(row.isolation):
                raise
        lock = self._taking.setdefault(sandbox_id, asyncio.Lock())
        try:
            async with lock:  # two calls for it at once take it over once
                if sandbox_id in self.live:
                    return self.get(tenant, sandbox_id)
                handle = self.store.handle(sandbox_id)
                if handle is None:
                    raise SandboxNotFound(f"sandbox {sandbox_id} is still being made, or its server died making it")
                try:
                    return await self._take_back(row, handle)
                except (SandlotError, LookupError, OSError) as exc:
                    self._ended_unheld(row, exc)
                    raise SandboxNotFound(f"sandbox {sandbox_id} is gone: {exc}") from None
        finally:
            if not lock.locked() and not lock._waiters:  # type: ignore[attr-defined]
                self._taking.pop(sandbox_id, None)

    def _anywhere(self, isolation: str) -> bool:
        """Whether this server reaches sandboxes of ``isolation`` wherever they were made (and enables the tier)."""
        try:
            return isolation in self.settings.isolations and backend_class(isolation).reachable_anywhere
        except SandlotError:
            return False

    def get(self, tenant: Tenant, sandbox_id: str) -> LiveSandbox:
        """The tenant's live sandbox, or SandboxNotFound saying what became of it."""
        live = self.live.get(sandbox_id)
        if live is not None and live.tenant.id == tenant.id and not live.one_shot:
            if live.sandbox.is_running or live.sandbox.is_paused:  # a paused one wakes when used
                return live
            self._finish(live)
        row = self.store.sandbox(tenant, sandbox_id)
        if row is None:
            raise SandboxNotFound(f"no sandbox {sandbox_id[:80]!r}")
        if row.status == "paused":  # held by no process: its tier is not enabled on this server now
            raise InvalidRequest(f"sandbox {sandbox_id} is paused on the {row.isolation} tier, which this server "
                                 f"does not enable now (enabled: {list(self.settings.isolations)})")
        raise SandboxNotFound(f"sandbox {sandbox_id} is {row.status}: {row.end_reason}")

    def row(self, tenant: Tenant, sandbox_id: str) -> SandboxRow:
        self.collect()
        row = self.store.sandbox(tenant, sandbox_id)
        if row is None:
            raise SandboxNotFound(f"no sandbox {sandbox_id[:80]!r}")
        return row

    # -- pause and resume (gVisor tier) ------------------------------------------------------------
    async def pause(self, tenant: Tenant, sandbox_id: str) -> PauseInfo:
        """Checkpoint it to disk (the hooks check the tenant's paused bytes and record it)."""
        live = await self.find(tenant, sandbox_id)
        was_paused = live.sandbox.is_paused
        info = await live.sandbox.pause()
        if not was_paused:
            self.store.audit(tenant.name, "pause", sandbox_id, f"{info.checkpoint_bytes} bytes", tenant.key_id)
        return info

    async def resume(self, tenant: Tenant, sandbox_id: str) -> PauseInfo:
        """Wake it (the hooks check the tenant's memory and pids totals and record it)."""
        live = await self.find(tenant, sandbox_id)
        if not live.sandbox.is_paused:
            raise InvalidRequest(f"sandbox {sandbox_id} is not paused")
        info = await live.sandbox.resume()
        self.store.audit(tenant.name, "resume", sandbox_id, None, tenant.key_id)
        return info

    async def _hold_paused(self) -> None:
        """At startup: the paused sandboxes an earlier server process left on disk, held again (still paused:
        the next call wakes them). One whose lifetime ended meanwhile ends now (its watchdog), checkpoint
        removed; one whose checkpoint is gone is recorded as ended."""
        for row, tenant in self.store.paused_sandboxes():
            if row.isolation not in self.settings.isolations:
                continue  # left on disk for a server that enables its tier
            try:
                local = await self.engine.adopt_paused(row.id, row.isolation, expires_at=row.expires_at,
                                                       on_idle=row.on_idle, metadata=row.metadata)
            except SandlotError as exc:
                if self.store.shared:
                    continue  # maybe on another replica's disk: its server holds it
                reason = f"its checkpoint could not be taken back: {exc}"
                self.store.end_sandbox(row.id, "ended", reason)
                self.store.audit(tenant.name, "end", row.id, reason)
                continue
            limits = Limits.build(row.limits)
            spec = SandboxSpec.build(row.template, isolation=row.isolation, limits=limits, metadata=row.metadata,
                                     on_idle=row.on_idle)
            live = LiveSandbox(AsyncSandbox._of(local, spec, self.transport), tenant, row.template, row.created_at,
                              CommandTable(self.settings.max_background_commands), limits)
            local.checkpoint_bytes = row.checkpoint_bytes
            local.hooks = _Hibernation(self, live)
            self.live[row.id] = live

    # -- network ---------------------------------------------------------------------------------
    def _check_network_ceiling(self, policy: Any, secrets: Any = None) -> None:
        """Each allow rule (and each secret's host, granted on :443) within the operator's ceiling, if any."""
        ceiling = self.settings.network_ceiling
        if not ceiling or (policy is None and not secrets):
            return
        from .._net.policy import Rule

        bounds = [Rule.parse(text) for text in ceiling]
        asked = [rule.text for rule in (policy.allow if policy is not None else ())]
        asked += [f"{host}:443" for host in (secrets.hosts if secrets else ())]
        for text in asked:
            if not any(Rule.parse(text).within(bound) for bound in bounds):
                raise InvalidRequest(f"network rule {text!r} is beyond what this server grants: its operator "
                                     f"allows rules within {list(ceiling)}")

    def network_totals(self) -> dict[str, int]:
        """The live sandboxes' broker counters, summed (for /metrics)."""
        totals: dict[str, int] = {}
        for live in list(self.live.values()):
            network = live.local.network
            for key, value in (network.stats() if network is not None else {}).items():
                if isinstance(value, int):
                    totals[key] = totals.get(key, 0) + value
        return totals

    async def update_network(self, tenant: Tenant, sandbox_id: str, allow: Optional[list],
                             deny: Optional[list]) -> Any:
        if not self.settings.allow_network:
            raise InvalidRequest("this server gives sandboxes no network: its operator enables it with "
                                 "`sandlot serve --allow-network`")
        live = await self.find(tenant, sandbox_id)
        if allow is not None:  # (None keeps the rules in force, checked when they were given)
            asked = NetworkPolicy.build({"allow": allow})
            self._check_special(asked)
            self._check_network_ceiling(asked)
        policy = await live.sandbox.network.update(allow=allow, deny=deny)
        self.store.audit(tenant.name, "network", sandbox_id, json.dumps(policy), tenant.key_id)
        if not live.one_shot:
            self._keep_handle(live)  # the next server serves the rules in force
        return policy

    def _check_special(self, policy: Any) -> None:
        """A tenant's rules may not open the operator's own network unless the operator said so."""
        if policy is None or self.settings.allow_private_network:
            return
        from .._net.policy import host_addresses

        opened = policy.special_rules(host_addresses())
        if opened:
            raise InvalidRequest(f"network rule(s) {opened} would open private, link-local, metadata, loopback "
                                 "or this host's own addresses, which this server does not give: its operator "
                                 "enables them with `sandlot serve --allow-private-network`")

    # -- ending ----------------------------------------------------------------------------------
    async def kill(self, tenant: Tenant, sandbox_id: str) -> SandboxRow:
        """End the tenant's sandbox. Killing one that already ended is not an error (like the SDK's kill)."""
        live = self.live.get(sandbox_id)
        if live is None:  # held by another replica, or by none since its server stopped: taken over to end it
            with contextlib.suppress(SandboxNotFound, InvalidRequest):
                live = await self.find(tenant, sandbox_id)
        if live is not None and live.tenant.id == tenant.id and not live.one_shot:
            await live.sandbox.kill()
            self._finish(live, "killed by its owner", cause="owner")
            self.store.audit(tenant.name, "kill", sandbox_id, None, tenant.key_id)
        return self.row(tenant, sandbox_id)

    def _finish(self, live: LiveSandbox, reason: Optional[str] = None, status: str = "ended",
                cause: Optional[str] = None) -> None:
        """Record that a sandbox ended and free its place. Idempotent.

        ``cause`` labels the metric: "owner", "one_shot", "shutdown", or (ended on its own) the limit
        that ended it ("lifetime", "idle_timeout", "timeout", "memory"...) or "crash"."""
        if self.live.pop(live.id, None) is None:
            return
        if live.local.moved_away:  # another replica holds it now: its row and its end are that replica's
            log.info("sandbox %s was taken over by another server", live.id)
            return
        sandbox = live.sandbox
        reason = reason or sandbox.end_reason or "it ended"
        limit = sandbox.end_limit
        if not live.one_shot:
            self.store.end_sandbox(live.id, status, reason)
            if cause is None:  # it ended on its own, not by a request: the audit log says so too
                self.store.audit(live.tenant.name, "end", live.id, reason)
        self.metrics.ended.labels(cause or limit or "crash").inc()
        if cause is None and limit in ("lifetime", "idle_timeout"):
            self.metrics.limit_kills.labels(limit).inc()
        self._spawn(sandbox.kill())  # idempotent; makes sure a crashed sandbox is cleaned up too

    async def end_one_shot(self, live: LiveSandbox) -> None:
        await live.sandbox.kill()
        self._finish(live, "one-shot run finished", cause="one_shot")

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def collect(self) -> None:
        """Record every sandbox that ended on its own since last time."""
        for live in list(self.live.values()):
            if not live.sandbox.is_running and not live.sandbox.is_paused:
                self._finish(live)

    async def set_timeout(self, tenant: Tenant, sandbox_id: str, seconds: float) -> SandboxRow:
        live = await self.find(tenant, sandbox_id)
        now = time.time()
        self.settings.ceilings.check_lifetime(now - live.created_at + seconds)
        check_lifetime(tenant.name, now - live.created_at + seconds, quotas_for(self.settings, tenant))
        await live.sandbox.set_timeout(seconds)
        self.store.set_expiry(sandbox_id, now + seconds)
        self.store.audit(tenant.name, "set_timeout", sandbox_id, f"{seconds:g}", tenant.key_id)
        return self.row(tenant, sandbox_id)

    # -- server lifecycle ----------------------------------------------------------------------------
    async def startup(self) -> None:
        """Sandboxes the database still calls running belonged to a previous server process. The durable ones
        outlived it (a restart, an upgrade, a crash): each is taken back, with its state, its deadline and its
        place in its tenant's quotas. The others died with it: say so to their owners and clear what is left."""
        adopted, gone = await self._take_back_running()
        if self.store.shared:
            # Replicas share the database: other servers' rows are theirs. This host's sandboxes that could not
            # be taken back were recorded above; the rest end at their lifetime (the reaper: _end_expired).
            lost = []
        else:
            # A tier reachable from any server (a cluster's) is taken over on demand (find), by whichever server
            # is asked: never marked lost here.
            anywhere = {row.id for row, _ in self.store.running_handles() if self._anywhere(row.isolation)}
            lost = self.store.mark_running_lost(LOST_ON_RESTART, keep=set(self.live) | anywhere)
        for sandbox_id, tenant in lost:
            self.store.audit(tenant, "lost", sandbox_id, LOST_ON_RESTART)
        if lost or gone:
            removed = await asyncio.to_thread(cgroups.remove_named, {i for i, _ in lost} | gone)
            log.warning("%d sandbox(es) of a previous server process marked lost; %d leftover cgroup(s) removed",
                        len(lost), removed)
        if adopted:
            log.warning("%d sandbox(es) of a previous server process taken back", adopted)
        await self._hold_paused()
        await self._sweep_tiers()
        # Volumes a dead process (a crashed server) left mounted on the host: detached, so they are free again
        # (their locks died with it) and nothing of a tenant's files stays attached under the data dir.
        swept = await asyncio.to_thread(sweep_mounts)
        if swept:
            log.warning("%d volume mount(s) left by a dead process detached", swept)
        self._reaper = asyncio.get_running_loop().create_task(self._reap())
        self._spawn(self._warm_up())

    async def _take_back_running(self) -> tuple[int, set[str]]:
        """Re-adopt every running row that has a handle (rows left without one are marked lost next).
        -> (how many were taken back, the ids of those that could not be: ended now)."""
        adopted, gone = 0, set()
        for row, handle in self.store.running_handles():
            if handle is None or row.isolation not in self.settings.isolations or self._anywhere(row.isolation):
                continue
            if self.store.shared and handle.get("host") != socket.gethostname():
                continue  # another host's sandbox (a replica's): its own server holds it
            try:
                await self._take_back(row, handle)
            except (SandlotError, LookupError, OSError) as exc:
                self._ended_unheld(row, exc)
                gone.add(row.id)
                continue
            adopted += 1
        return adopted, gone

    async def _take_back(self, row: SandboxRow, handle: Mapping[str, Any]) -> LiveSandbox:
        """The sandbox of a running row, taken over by this server from the record its last server kept."""
        started = time.monotonic()
        tenant = self.store.tenant(row.tenant)
        spec = SandboxSpec.from_json(handle.get("spec") or {"template": row.template})
        spec = dataclasses.replace(spec, limits=Limits.build(row.limits))  # as they were in force
        self._network_still_granted(spec)
        local = await self.engine.adopt(handle.get("record") or {}, spec, row.expires_at or time.time())
        sandbox = AsyncSandbox._of(local, spec, self.transport)
        live = LiveSandbox(sandbox, tenant, row.template, row.created_at,
                           CommandTable(self.settings.max_background_commands), local.limits)
        self.live[live.id] = live
        self._keep_handle(live)
        self.store.audit(row.tenant, "readopt", row.id, json.dumps({"seconds": round(time.monotonic() - started, 4)}))
        return live

    def _ended_unheld(self, row: SandboxRow, exc: BaseException) -> None:
        """A running row whose sandbox could not be taken back: ended (past its lifetime) or lost, recorded."""
        if row.expires_at is not None and row.expires_at <= time.time():
            status, reason = "ended", "its lifetime ended while no server held it"
        else:
            status, reason = "lost", NOT_TAKEN_BACK.format(exc)
        self.store.end_sandbox(row.id, status, reason)
        self.store.audit(row.tenant, "end" if status == "ended" else "lost", row.id, reason)

    async def _sweep_tiers(self) -> None:
        """What a tier still runs for sandboxes no row calls running (a server that died between making one and
        recording it), ended: the kubernetes tier's claims found by their label."""
        keep = {row.id for row, _ in self.store.running_handles()} | set(self.live)  # one-shot runs have no row
        for isolation in self.settings.isolations:
            try:
                ended = await self.engine.backend(isolation).sweep_orphans(keep)
            except Exception as exc:  # noqa: BLE001 - a cluster out of reach now shows on the first create
                log.warning("could not look for what the %s tier left behind: %s", isolation, exc)
                continue
            if ended:
                log.warning("%d sandbox(es) of the %s tier that no server recorded ended", ended, isolation)

    def _network_still_granted(self, spec: SandboxSpec) -> None:
        """A sandbox taken back gets its network from this server only as this server's operator allows one
        now (they may have restarted it without --allow-network, or with a narrower ceiling, to cut tenants
        off): InvalidRequest otherwise, and it is not taken back (it ends, reported lost)."""
        if spec.network is None and not spec.secrets:
            return
        if not self.settings.allow_network:
            raise InvalidRequest("it has a network, and this server gives sandboxes none now (no --allow-network)")
        self._check_special(spec.network)
        self._check_network_ceiling(spec.network, spec.secrets)

    async def _warm_up(self) -> None:
        """Start the default template's zygote and warm pool now, so the first client does not wait for
        the preload (numpy, pandas... several seconds) and gets a sandbox in milliseconds."""
        if "process" not in self.settings.isolations:
            return  # a server of other tiers only (a cluster's: its warm pools are the cluster's) has no zygote
        try:
            await self.engine.warm_up("python", "process")
        except Exception as exc:  # noqa: BLE001 - a host problem shows on the first create, with its reason
            log.warning("warm-up failed: %s", exc)

    async def _reap(self) -> None:
        last_housekeeping = last_audit_prune = float("-inf")
        settings = self.settings
        # Often enough that no row outlives its retention by more than a tenth of it (a short retention is
        # pruned every reaper pass), at most every _HOUSEKEEPING_EVERY.
        audit_every = min(_HOUSEKEEPING_EVERY, settings.audit_retention / 10)
        while True:
            await asyncio.sleep(settings.reap_interval)
            try:
                self.collect()
                if time.monotonic() - last_audit_prune >= audit_every:
                    last_audit_prune = time.monotonic()
                    await asyncio.to_thread(self.store.prune_audit, time.time() - settings.audit_retention,
                                            settings.audit_max_rows)
                if time.monotonic() - last_housekeeping > _HOUSEKEEPING_EVERY:
                    last_housekeeping = time.monotonic()
                    self.store.prune(time.time() - settings.retention)
                    if self.store.shared:
                        self._end_expired()
                    await self._sweep_tiers()  # what a create that died half way left in a cluster
                    await asyncio.to_thread(cgroups.sweep_stale)  # e.g. warm-pool leftovers of a crashed server
            except Exception:  # noqa: BLE001 - the reaper must outlive any one bad pass
                log.exception("reaper pass failed")

    def _end_expired(self) -> None:
        """On a database replicas share: rows still 'running' well past their lifetime that no server ended (their
        server died, or none held them since), recorded as ended. A live sandbox's own server ends it at its
        deadline; the grace keeps this pass from racing that."""
        now = time.time()
        for row, _ in self.store.running_handles():
            if row.id not in self.live and row.expires_at is not None and row.expires_at + EXPIRED_GRACE < now:
                reason = "its lifetime ended while no server held it"
                self.store.end_sandbox(row.id, "ended", reason)
                self.store.audit(row.tenant, "end", row.id, reason)

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        self.collect()  # those that ended on their own are recorded as such, not left "running"
        # Paused sandboxes stay on disk (and "paused" in the database): a later server resumes them. Durable
        # ones run on, "running" in the database: the next server takes them back (startup).
        held = [s for s in self.live.values() if not s.sandbox.is_paused and not (s.local.durable and not s.one_shot)]
        await asyncio.gather(*(s.sandbox.kill() for s in held), return_exceptions=True)
        for live in held:
            self._finish(live, LOST_ON_SHUTDOWN, status="lost", cause="shutdown")
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.engine.shutdown()
