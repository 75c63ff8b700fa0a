"""The Engine: everything local sandboxes share in one process, owned in one place, with one shutdown.

It holds one backend per tier (and with the process tier its zygotes), the warm pools (per event loop:
a pooled sandbox's channel belongs to a loop), and the cleanups of killed sandboxes. It makes
``LocalSandbox`` handles from a ``SandboxSpec``: claim a warm sandbox or boot one, configure it, hand it
over. ``LocalTransport`` puts an Engine under ``AsyncSandbox``; the server's registry and the MCP server
use the engine directly.

One process normally has one engine (``default_engine()``); ``shutdown()`` is the one sequence that
ends what an event loop leaves (its pools' waiting sandboxes, the cleanups still running), and
``close()`` stops the zygotes at exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from typing import Any, Mapping, Optional, Sequence

from ._backends.base import Backend, BackendSandbox
from ._backends.registry import ISOLATIONS, backend_class, default_isolation, supports, isolations_with
from ._exceptions import InvalidRequest, SandboxNotFound
from ._hints import wants_preload
from ._limits import Limits
from ._local import LocalSandbox
from ._net.policy import NetworkPolicy
from ._net.sandbox_network import CA_BUNDLE_PATH, SandboxNetwork
from ._models import Execution, SandboxInfo, VolumeInfo
from ._output import OutputHandler
from ._pool import Pools
from ._spec import SandboxSpec
from ._storage import grants
from ._storage.mounts import mounts_to_json, parse_mounts
from ._storage.volumes import LOCAL_SCOPE, VolumeStore
from ._templates import Template, get_template
from ._transport import ResultHandler, SandboxHandle, Transport


_OWN_ROOTS = object()  # Engine.create: the engine's own host_dir_roots


class Engine:
    def __init__(self, *, zygote: Optional[bool] = None, host_dir_roots: Optional[Sequence[str]] = None,
                 durable: bool = False) -> None:
        """``zygote=False`` boots every process-tier sandbox by exec (a one-shot CLI run: nothing to gain
        from preloading); None follows SANDLOT_ZYGOTE. ``host_dir_roots``: the directories inside which
        host directories may be granted (None: any that is not sensitive, for a local owner; empty: none).
        ``durable``: the sandboxes it hands out outlive this process until their lifetime ends (those a tier
        can keep: without a network or mounts), and a later engine takes them back with ``adopt()`` (a
        server's engine); otherwise each ends with its owner, as a script's sandboxes must."""
        self._zygote = zygote
        self._durable = durable
        self.host_dir_roots = None if host_dir_roots is None else tuple(host_dir_roots)
        self._backends: dict[str, Backend] = {}
        self._lock = threading.Lock()
        self.pools = Pools()

    @property
    def durable(self) -> bool:
        return self._durable

    @durable.setter
    def durable(self, value: bool) -> None:
        """For sandboxes made from now on (a server process sets it on its engine at start)."""
        with self._lock:
            self._durable = bool(value)
            for backend in self._backends.values():
                backend.durable = self._durable

    def set_zygote(self, enabled: bool) -> None:
        """Fork process-tier sandboxes from a preloaded zygote (True) or exec each one (False)."""
        with self._lock:
            self._zygote = enabled
            backend = self._backends.get("process")
        if backend is not None:
            backend.use_zygote = enabled  # type: ignore[attr-defined]

    # -- tiers -----------------------------------------------------------------------------------------
    def backend(self, isolation: str) -> Backend:
        """This engine's backend of a tier (made once; InvalidRequest for an unknown tier)."""
        cls = backend_class(isolation)
        with self._lock:
            backend = self._backends.get(isolation)
            if backend is None:
                backend = cls(zygote=self._zygote) if isolation == "process" else cls()
                backend.durable = self._durable
                self._backends[isolation] = backend
            return backend

    # -- making sandboxes ------------------------------------------------------------------------------
    def resolve(self, spec: SandboxSpec) -> tuple[SandboxSpec, Template]:
        """The spec as this host will run it: its tier chosen, an image template's default limits under
        the owner's, its default network where the owner gave none and its default mounts under the owner's
        (per target), and what the tier cannot do
        refused (InvalidRequest) before anything starts."""
        isolation = default_isolation(spec.isolation)
        backend_class(isolation)  # an unknown tier says so first
        template = get_template(spec.template)
        if spec.network is None and template.network is not None:  # the template's default (sandbox.yaml)
            spec = dataclasses.replace(spec, network=NetworkPolicy.build(template.network))
        if template.mounts:  # the template's default mounts (sandbox.yaml); the owner's win per target
            merged = dict(template.mounts)
            merged.update(mounts_to_json(spec.mounts))
            spec = dataclasses.replace(spec, mounts=parse_mounts(merged))
        if spec.on_idle == "pause" and not supports(isolation, "pause"):
            tiers = " or ".join(f"isolation={name!r}" for name in isolations_with("pause"))
            raise InvalidRequest(f"on_idle is 'kill', or 'pause' with {tiers} (checkpoint to disk)")
        for mount in spec.mounts:
            for prefix in template.prefixes:  # the interpreter's own tree, bound into every sandbox
                if prefix == mount.target or prefix.startswith(mount.target + "/") or mount.target.startswith(prefix + "/"):
                    raise InvalidRequest(f"mount target {mount.target!r} would cover or enter the sandbox's Python at "
                                         f"{prefix}: choose another path (such as /data or /home/user/project)")
        if spec.on_idle == "pause" and spec.mounts:
            raise InvalidRequest("on_idle='pause' cannot keep mounts: a sandbox with mounts= is killed when idle "
                                 "(its host directories and volumes are held for it only while it runs)")
        if spec.on_idle == "pause" and (spec.network is not None or spec.secrets is not None):
            raise InvalidRequest("on_idle='pause' cannot keep a network: a sandbox with network= or secrets= "
                                 "is killed when idle (its broker and host sockets do not survive a checkpoint)")
        if spec.network is not None or spec.secrets is not None:
            problem = backend_class(isolation).network_problem(spec.network, spec.secrets)
            if problem is not None:
                raise InvalidRequest(problem)
        limits = spec.limits
        if template.limits and spec.asked != frozenset(f.name for f in dataclasses.fields(Limits)):
            asked = {name: getattr(spec.limits, name) for name in spec.asked}
            limits = Limits.build(asked, base=Limits.build(template.default_limits()))
        return dataclasses.replace(spec, isolation=isolation, limits=limits), template

    def volumes(self, scope: str = LOCAL_SCOPE) -> VolumeStore:
        """The named volumes of ``scope`` ("local" for this host's SDK; a server uses one per tenant)."""
        return VolumeStore(scope)

    async def create(self, spec: SandboxSpec, *, scope: str = LOCAL_SCOPE,
                     host_dir_roots: "Sequence[str] | None | object" = _OWN_ROOTS,
                     outlive: bool = True, code: Optional[str] = None) -> LocalSandbox:
        """A started sandbox for ``spec``: a warm one claimed and configured, or a fresh boot; with a network
        policy or secrets, its namespace configured and served before anyone's code runs in it; with
        mounts, its host directories (within ``host_dir_roots``) and ``scope``'s volumes attached before
        any code runs (such a sandbox boots fresh: a warm one has pivoted into its root already).
        ``host_dir_roots`` overrides the engine's own for this sandbox (a server passes its operator's roots).
        ``outlive=False``: it ends with this process even when the engine is durable (a one-shot run).
        ``code``: what will run first, when known (a one-shot run): code that imports none of the template's
        preloaded modules gets the tier's lean variant of it (a performance hint only: see _hints)."""
        spec, template = self.resolve(spec)
        backend = self.backend(spec.isolation or "process")
        if code is not None:
            lean = backend.lean(template)
            if lean is not None and not wants_preload(code, template.preload):
                template = lean
        # A tier whose cluster enforces the policy (kubernetes: a NetworkPolicy) gets it at start; the others get
        # this host's broker, attached below.
        by_cluster = spec.network if backend.network_by_cluster else None
        network = None if backend.network_by_cluster else SandboxNetwork.plan(spec.network, spec.secrets)
        env = dict(spec.env, **(network.env() if network else {}))
        roots = self.host_dir_roots if host_dir_roots is _OWN_ROOTS else host_dir_roots
        # (No thread hop without mounts: a create claims its warm sandbox in its first step.)
        mounts = await grants.prepare_async(spec.mounts, self.volumes(scope), roots) if spec.mounts else None
        # A tier that gives a network only at boot (gVisor) never hands a warm, network-less one to it.
        fresh = mounts is not None or (network is not None and backend.network_at_boot) or by_cluster is not None
        proc = None if fresh else await self._claim(backend, template, spec, env)
        if proc is None:
            try:
                proc = await backend.start(template, spec.limits, env, awaited=True,
                                           network=network is not None or by_cluster is not None, mounts=mounts,
                                           **({"policy": by_cluster} if by_cluster is not None else {}))
            except BaseException:
                if mounts is not None:  # the sandbox never took them (or its cleanup released them already)
                    mounts.release()
                raise
        sandbox = LocalSandbox(spec, backend, proc, network)
        sandbox.outlives = outlive
        if network is not None:
            try:
                await network.attach(proc.netns_pid())
                bundle = network.ca_bundle()
                if bundle is not None:
                    await sandbox.files.write(CA_BUNDLE_PATH, bundle)
            except BaseException:
                await asyncio.shield(sandbox.kill())
                raise
        await sandbox.lease()
        return sandbox

    async def adopt(self, record: Mapping[str, Any], spec: SandboxSpec, expires_at: float) -> LocalSandbox:
        """A live sandbox an earlier process of this host left running (a durable one: its owner died or
        shut down), taken over by this engine with the spec it was made with and its deadline (unix time):
        SandboxNotFound when it has ended, InvalidRequest when its tier cannot take one back."""
        backend = self.backend(str(record.get("isolation") or spec.isolation or "process"))
        proc = await backend.adopt(record)
        # Its namespace kept its routes and filter; its broker and DNS responder were the old owner's: served anew.
        network = SandboxNetwork.plan(spec.network) if spec.network is not None and not spec.secrets \
            and not backend.network_by_cluster else None
        sandbox = LocalSandbox(dataclasses.replace(spec, isolation=backend.name), backend, proc, network)
        try:
            if network is not None:
                await network.attach(proc.netns_pid())
            sandbox.expire_at(expires_at)
            await sandbox.lease()
        except BaseException:
            await asyncio.shield(sandbox.kill())
            raise
        return sandbox

    async def _claim(self, backend: Backend, template: Template, spec: SandboxSpec,
                     env: dict[str, str]) -> Optional[BackendSandbox]:
        """A warm sandbox taken over for this spec, or None (no pool, an empty one, or limits it cannot take)."""
        pool = self.pools.pool_for(backend, template, spec.limits)
        proc = pool.take() if pool is not None else None
        if proc is None:
            return None
        try:
            await proc.apply_limits(spec.limits)  # cpu and memory; the rest were fixed at boot and agree
            if env:
                await proc.channel.send({"t": "configure", "id": 0, "env": env})
        except BaseException as exc:
            # Out of the pool and not handed to an owner: nobody else would ever kill it.
            with contextlib.suppress(Exception):
                await asyncio.shield(proc.kill("its create failed while configuring it"))
            if not isinstance(exc, OSError):
                raise
            return None  # limits this warm sandbox cannot take: a fresh one boots with them
        return proc

    async def take_back(self, sandbox_id: str, isolation: str) -> LocalSandbox:
        """A sandbox an earlier process of this host left paused, resumed under this engine (where its
        tier can: SandboxNotFound when it is gone or its lifetime ended while it slept, InvalidRequest when
        the tier cannot)."""
        sandbox = await self.adopt_paused(sandbox_id, isolation)
        try:
            await sandbox.resume()
        except SandboxNotFound:
            raise SandboxNotFound(f"sandbox {sandbox_id} is gone: {sandbox.end_reason}") from None
        return sandbox

    async def adopt_paused(self, sandbox_id: str, isolation: str, *, expires_at: Optional[float] = None,
                           on_idle: Optional[str] = None, metadata: Optional[Mapping[str, str]] = None
                           ) -> LocalSandbox:
        """A sandbox an earlier process left paused, held (still paused) by this engine: the next call
        wakes it, and it ends at its first deadline (``expires_at``, else the one kept beside its
        checkpoint), its checkpoint removed. One already past it ends at once (``end_reason`` says so)."""
        backend = self.backend(isolation)
        if not backend.capabilities.checkpoint:  # nothing of it is on disk: a live one is its owner's
            raise InvalidRequest(f"the {backend.name} tier cannot take a sandbox back from disk: a local owner's "
                                 "sandboxes end with it (a server's outlive it: connect with api_url=)")
        proc = await backend.adopt({"isolation": isolation, "id": sandbox_id})
        kept = dict(getattr(proc, "hibernation", None) or {})
        on_idle = on_idle or kept.get("on_idle") or "kill"
        spec = SandboxSpec.build(proc.template, isolation=isolation, limits=proc.limits, on_idle=on_idle,
                                 metadata=metadata)
        sandbox = LocalSandbox(spec, backend, proc)
        deadline = expires_at if expires_at is not None else kept.get("expires_at")
        if deadline is not None:
            sandbox.expire_at(deadline)
            if time.time() >= deadline:
                await sandbox.expire(f"its lifetime ended while paused ({proc.limits.lifetime:.0f} s)")
        return sandbox

    async def warm_up(self, template: str = "python", isolation: str = "process") -> None:
        """Start a template's warm pool (or its zygote) now, so the first create does not wait for the preload."""
        backend = self.backend(isolation)
        resolved = get_template(template)
        pool = self.pools.pool_for(backend, resolved, Limits())
        if pool is not None:
            pool.refill()
        else:
            await backend.prepare(resolved)

    # -- ending --------------------------------------------------------------------------------------
    async def shutdown(self) -> None:
        """What this event loop leaves, ended: its pools' waiting sandboxes killed, and every cleanup of a
        killed sandbox finished (no cgroup or mount left behind). Owned sandboxes are their owners' to end."""
        await self.pools.close()
        for backend in list(self._backends.values()):
            await backend.finish_cleanups()

    def close(self) -> None:
        """Stop the zygotes (at exit; live sandboxes end with their owners, not with this)."""
        for backend in list(self._backends.values()):
            backend.close()


_DEFAULT: Optional[Engine] = None
_DEFAULT_LOCK = threading.Lock()


def default_engine() -> Engine:
    """This process's engine, made when first asked for."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = Engine()
        return _DEFAULT


class LocalTransport(Transport):
    """Sandboxes of this process, made by an Engine."""

    def __init__(self, engine: Optional[Engine] = None) -> None:
        self.engine = engine or default_engine()

    def check(self, spec: SandboxSpec) -> None:
        self.engine.resolve(spec)  # an unknown template or tier, or what the tier cannot do

    async def create(self, spec: SandboxSpec) -> SandboxHandle:
        return await self.engine.create(spec)

    async def connect(self, sandbox_id: str, *, isolation: Optional[str] = None) -> SandboxHandle:
        if isolation is None:
            raise InvalidRequest("connect() to a local sandbox needs its isolation (a paused gVisor sandbox: "
                                 "isolation='gvisor'); live sandboxes of a server need api_url=")
        if isolation not in ISOLATIONS:
            backend_class(isolation)
        return await self.engine.take_back(sandbox_id, isolation)

    async def list(self, metadata: Mapping[str, str], status: str) -> "list[SandboxInfo]":
        raise InvalidRequest("list() needs a Sandlot server (api_url= or SANDLOT_API_URL): local sandboxes "
                             "belong to the process that made them")

    async def run_once(self, spec: SandboxSpec, code: str, *, timeout: Optional[float],
                       on_stdout: Optional[OutputHandler], on_stderr: Optional[OutputHandler],
                       on_result: Optional[ResultHandler]) -> Execution:
        sandbox = await self.engine.create(spec, outlive=False, code=code)
        try:
            return await sandbox.run_code(code, timeout=timeout, on_stdout=on_stdout, on_stderr=on_stderr,
                                          on_result=on_result)
        finally:
            await sandbox.kill()

    # -- volumes: this host's, in the "local" scope ---------------------------------------------------------
    async def create_volume(self, name: str, size: Any, inodes: Optional[int]) -> VolumeInfo:
        return await asyncio.to_thread(self.engine.volumes().create, name, size, inodes)

    async def list_volumes(self) -> "list[VolumeInfo]":
        return await asyncio.to_thread(self.engine.volumes().list)

    async def volume_info(self, name: str) -> VolumeInfo:
        return await asyncio.to_thread(self.engine.volumes().info, name)

    async def delete_volume(self, name: str) -> None:
        await asyncio.to_thread(self.engine.volumes().delete, name)
