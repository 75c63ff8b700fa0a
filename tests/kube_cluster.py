"""A Kubernetes cluster with kubernetes-sigs/agent-sandbox, played by the test process (no real cluster).

- The API server: ``tests.kube_api.KubeAPI`` (kmock's KubernetesEmulator on 127.0.0.1, real HTTP) serving
  SandboxTemplates, SandboxWarmPools and SandboxClaims (extensions.agents.x-k8s.io/v1beta1), Sandboxes
  (agents.x-k8s.io/v1beta1) and core Pods; a kubeconfig (YAML, bearer token) points at it.
- The agent-sandbox controller and the kubelet: asyncio tasks following the store. A new SandboxClaim whose
  ``spec.warmPoolRef`` names a SandboxWarmPool whose ``spec.sandboxTemplateRef`` names a SandboxTemplate
  gets a *real local Sandlot sandbox* (process tier) running the pod template's first container
  (``command`` + ``args``, ``env`` values, ``workingDir``; ``resources.limits`` cpu, memory and
  ephemeral-storage as the sandbox's limits) as a background command; its pod IP is a loopback address
  127.0.0.N (N >= 10, going round the range as a CNI's allocator does) whose port (the readiness probe's
  tcpSocket port, else the first containerPort, else 8888) is forwarded into the sandbox through
  ``get_url``. The readiness probe connects there every 20 ms until something inside answers;
  every other TCP port something in the sandbox listens on at every address (0.0.0.0 or ::, as a pod's address
  reaches) is forwarded the same way from 127.0.0.N:P while it listens (looked up every 20 ms in the sandbox's
  /proc/net/tcp{,6}): a port nothing listens on has no listener at the address, so its connections are refused
  as a pod's are, and a server bound to 127.0.0.1 inside is not reached, as in a pod;
  then the claim's status is written: ``conditions: [{type: Ready, status: "True", reason:
  SandboxReady}]``, ``sandbox: {name, podIPs: ["127.0.0.N"]}``. Sandbox and Pod objects are written too.
- Lifetime: a deleted claim kills its sandbox and closes its address; ``lifecycle.shutdownTime`` is
  honoured (policy Delete / DeleteForeground deletes the claim, Retain kills the pod and marks the claim
  ClaimExpired); a container that exits makes the pod Failed (Ready False, reason PodFailed, podIPs []).

Usage (pytest-asyncio, asyncio_mode auto)::

    async with KubeCluster() as cluster:            # or: cluster = await KubeCluster().start(); ... close()
        await cluster.apply_template("python")     # SandboxTemplate + SandboxWarmPool "sandlot-python"
        api = await cluster.api_client()           # kubernetes_asyncio ApiClient from cluster.kubeconfig
        ...                                        # the code under test creates claims through the API
        claim = await cluster.wait_ready("sandlot-sb-0123456789ab")

Knobs: ``never_ready(pool_or_template)``, ``await kill_pod(claim)``, ``gone_on_next_watch()``,
``claims()``, ``claim(name)``, ``running_pods()``, ``pods``; ``cluster.api`` is the store
(``api.objects(kind)``; ``list(cluster.api)``: kmock's log of every HTTP request;
``watch_requests(plural)``). Sync tests (a subprocess
server, the sync SDK) use ``with KubeClusterThread() as cluster:``, the same API on a loop of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import inspect
import os
import secrets
import shlex
import socket
import tempfile
import threading
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Optional

import aiohttp.test_utils
import kmock
import yaml

import sandlot

from .kube_api import PODS, SANDBOX_CLAIMS, SANDBOX_TEMPLATES, SANDBOX_WARMPOOLS, SANDBOXES, Event, KubeAPI, \
    now_rfc3339

# What sandlot's get_url listener answers when nothing listens inside the sandbox; a pod's address
# would refuse the connection instead, so the forwarder resets it.
NOTHING_LISTENS = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
FIRST_POD_HOST = 10
_next_host = FIRST_POD_HOST  # the next pod address to try, process-wide


def _condition(status: str, reason: str, message: str) -> dict:
    return {"type": "Ready", "status": status, "reason": reason, "message": message,
            "lastTransitionTime": now_rfc3339(), "observedGeneration": 1}


def parse_time(text: str) -> datetime.datetime:
    """An RFC 3339 time of the API ("2026-12-02T23:00:00Z")."""
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


_parse_time = parse_time


# -- pod resources ---------------------------------------------------------------------------------------------

_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def quantity(text: Any) -> float:
    """A Kubernetes quantity: "500m" -> 0.5, "512Mi" -> 536870912, "2" -> 2."""
    value = str(text).strip()
    if value.endswith("m"):
        return float(value[:-1]) / 1000
    for suffix, factor in _SUFFIXES.items():
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * factor
    return float(value)


def pod_limits(container: dict) -> dict:
    """The container's resources.limits as the sandbox's limits (cgroups enforce both, as on a node)."""
    wanted = (container.get("resources") or {}).get("limits") or {}
    limits: dict[str, Any] = {}
    if "cpu" in wanted:
        limits["cpu"] = quantity(wanted["cpu"])
    if "memory" in wanted:
        limits["memory"] = int(quantity(wanted["memory"]))
    if "ephemeral-storage" in wanted:
        limits["disk"] = int(quantity(wanted["ephemeral-storage"]))
    return limits


# -- pod addresses -------------------------------------------------------------------------------------------


class PodAddress:
    """A listener on 127.0.0.N:port carrying each connection to a sandbox's get_url listener."""

    def __init__(self, upstream_url: str) -> None:
        parts = urllib.parse.urlsplit(upstream_url)
        self._upstream = (parts.hostname, parts.port)
        self._server: Optional[asyncio.AbstractServer] = None
        self._conns: dict[asyncio.Task, list[asyncio.StreamWriter]] = {}  # open connections, both their ends
        self.ip = ""

    async def listen(self, ip: str, port: int) -> bool:
        """Listen at ip:port (again, after ``stop_listening``); False when another socket holds it."""
        try:
            self._server = await asyncio.start_server(self._serve, ip, port, reuse_address=True)
        except OSError:
            return False
        self.ip = ip
        return True

    def stop_listening(self) -> None:
        """New connections are refused; open ones go on (a server that stops listening keeps its connections)."""
        if self._server is not None:
            self._server.close()
            self._server = None

    async def open(self, port: int, taken: set[str]) -> str:
        global _next_host
        for _ in range(FIRST_POD_HOST, 255):
            # Round the range, as a CNI's address allocator does: an address freed a moment ago is not
            # handed out again at once (a client still retrying it would reach another pod).
            n, _next_host = _next_host, FIRST_POD_HOST if _next_host >= 254 else _next_host + 1
            ip = f"127.0.0.{n}"
            if ip in taken:
                continue
            if await self.listen(ip, port):
                return ip
            # else another cluster (another test process) holds this address
        raise RuntimeError("no free pod address in 127.0.0.10-254")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns[task] = [writer]
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(*self._upstream)
            except OSError:
                writer.transport.abort()
                return
            self._conns[task].append(up_writer)
            try:
                await asyncio.gather(self._pump(reader, up_writer), self._pump_back(up_reader, writer))
            finally:
                up_writer.close()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            self._conns.pop(task, None)

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                if writer.can_write_eof():
                    writer.write_eof()

    @classmethod
    async def _pump_back(cls, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The sandbox's side; its listener's 502 (nothing listens inside) becomes a reset, as a pod's
        address answers a port nothing listens on."""
        head = b""
        while len(head) < len(NOTHING_LISTENS) and NOTHING_LISTENS.startswith(head):
            chunk = await reader.read(len(NOTHING_LISTENS) - len(head))
            if not chunk:
                break
            head += chunk
        if head == NOTHING_LISTENS and not await reader.read(1):
            writer.transport.abort()
            return
        if head:
            writer.write(head)
            await writer.drain()
        await cls._pump(reader, writer)

    async def close(self) -> None:
        """Stop listening and cut every connection (both ends reset, as when a pod goes). The connections'
        tasks end on their own: cancelling a start_server task logs a spurious error on Python 3.11."""
        if self._server is not None:
            self._server.close()
        for writers in list(self._conns.values()):
            for w in writers:
                w.transport.abort()
        if self._conns:
            _, stuck = await asyncio.wait(list(self._conns), timeout=5)
            for task in stuck:
                task.cancel()
        if self._server is not None:
            await self._server.wait_closed()


def listening_ports(pid: int) -> set[int]:
    """The TCP ports something listens on at every address (0.0.0.0 or ::) in the network namespace of host process
    ``pid``: what a pod's address reaches (one bound to 127.0.0.1 inside is the pod's own)."""
    found = set()
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                rows = f.read().splitlines()[1:]
        except OSError:  # the sandbox is gone
            continue
        for row in rows:
            fields = row.split()  # sl local_address rem_address st ...; st 0A: LISTEN
            if len(fields) > 3 and fields[3] == "0A":
                address, _, port = fields[1].rpartition(":")
                if set(address) == {"0"}:
                    found.add(int(port, 16))
    return found


async def tcp_probe(ip: str, port: int, settle: float = 0.1) -> bool:
    """The kubelet's tcpSocket probe: the connection is accepted and not reset at once (the forwarder
    resets it when nothing listens inside)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), 1.0)
    except (OSError, asyncio.TimeoutError):
        return False
    try:
        try:
            data = await asyncio.wait_for(reader.read(1), settle)
            return bool(data)  # the server spoke first: it listens
        except asyncio.TimeoutError:
            return True  # connected inside, and the server waits for us
        except (ConnectionError, OSError):
            return False
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


# -- the emulated controller + kubelet -------------------------------------------------------------------------


@dataclass
class Pod:
    """The pod of one claim: a sandbox, its command, its address."""

    claim: str
    namespace: str
    name: str
    pool: str = ""
    template: str = ""
    sandbox: Optional[sandlot.AsyncSandbox] = None
    command: Any = None
    address: Optional[PodAddress] = None
    ip: str = ""
    ports: dict[int, PodAddress] = field(default_factory=dict)  # the code's own servers' ports, forwarded at ip
    port_forwarder: Optional[asyncio.Task] = None
    phase: str = "Pending"  # Pending, Running (ready), Failed, Deleted
    ready: bool = False
    task: Optional[asyncio.Task] = None
    watcher: Optional[asyncio.Task] = None
    gone: asyncio.Event = field(default_factory=asyncio.Event)  # the claim is deleted or the cluster closes

    @property
    def running(self) -> bool:
        return self.sandbox is not None and self.sandbox.is_running


class KubeCluster:
    """An agent-sandbox cluster for tests (module doc). ``async with KubeCluster() as cluster``."""

    def __init__(self, *, namespace: str = "default", sandbox_template: str = "python",
                 probe_interval: float = 0.02, expiry_interval: float = 0.1, prewarm: bool = True) -> None:
        self.namespace = namespace
        self.sandbox_template = sandbox_template  # the Sandlot template the pods' sandboxes boot from
        self.probe_interval = probe_interval
        self.expiry_interval = expiry_interval
        self.prewarm = prewarm
        self.api = KubeAPI()
        self.pods: dict[tuple[str, str], Pod] = {}  # (namespace, claim name) -> its pod, while the claim lives
        self.started_sandboxes = 0
        # aiohttp's test server directly, not kmock.Server: that one also patches aiohttp's resolver for the
        # whole process (class-wide, undone only in LIFO order), which two clusters or threads would trip on.
        self._server: Optional[aiohttp.test_utils.RawTestServer] = None
        self._never_ready: set[str] = set()
        self._loops: list[asyncio.Task] = []  # the controller's loops, cancelled at close
        self._tasks: set[asyncio.Task] = set()  # pods starting, status writes, teardowns: awaited at close
        self._tmp = tempfile.TemporaryDirectory(prefix="kubeemu-")
        self.kubeconfig = os.path.join(self._tmp.name, "kubeconfig.yaml")
        self._clients: list[Any] = []
        self._closed = False

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> "KubeCluster":
        await self.api.__aenter__()
        self._server = aiohttp.test_utils.RawTestServer(self.api, host="127.0.0.1", port=0)
        await self._server.start_server()
        self._write_kubeconfig()
        if self.prewarm:  # the first sandbox of a process boots the template; do it before any claim
            async with sandlot.AsyncSandbox(self.sandbox_template, isolation="process", api_url="") as sb:
                await sb.run_code("1")
        queue = self.api.subscribe()
        loop = asyncio.get_running_loop()
        self._loops = [loop.create_task(self._control(queue)), loop.create_task(self._expire())]
        return self

    async def __aenter__(self) -> "KubeCluster":
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        """Kill every sandbox and address this cluster started, end the watches, stop the server."""
        if self._closed:
            return
        self._closed = True
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        pods, self.pods = list(self.pods.values()), {}
        await asyncio.gather(*(self._teardown(pod, "cluster closed") for pod in pods), return_exceptions=True)
        # Pods being torn down and status writes finish (never cancelled: a sandbox half made would leak).
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self.started_sandboxes:  # the killed sandboxes' reaping (processes, cgroups) is over on return
            from sandlot._engine import default_engine

            await default_engine().backend("process").finish_cleanups()
        for client in self._clients:
            with contextlib.suppress(Exception):
                await client.close()
        await self.api.close()
        if self._server is not None:
            await self._server.close()
        await self.api.__aexit__(None, None, None)
        self._tmp.cleanup()

    @property
    def url(self) -> str:
        assert self._server is not None
        return str(self._server.make_url("")).rstrip("/")

    def _write_kubeconfig(self) -> None:
        config = {
            "apiVersion": "v1", "kind": "Config", "preferences": {},
            "clusters": [{"name": "kubeemu", "cluster": {"server": self.url}}],
            "users": [{"name": "kubeemu", "user": {"token": self.api.token}}],
            "contexts": [{"name": "kubeemu", "context": {"cluster": "kubeemu", "user": "kubeemu",
                                                          "namespace": self.namespace}}],
            "current-context": "kubeemu",
        }
        with open(self.kubeconfig, "w") as f:
            yaml.safe_dump(config, f)

    async def api_client(self) -> Any:
        """A kubernetes_asyncio ApiClient loaded from this cluster's kubeconfig (closed by ``close()``)."""
        from kubernetes_asyncio import client, config

        configuration = client.Configuration()
        await config.load_kube_config(config_file=self.kubeconfig, client_configuration=configuration)
        api = client.ApiClient(configuration)
        self._clients.append(api)
        return api

    # -- setup helpers ------------------------------------------------------------------------------

    async def apply(self, *objects: dict) -> list[dict]:
        """Create objects of the served kinds (by their ``kind``) in their namespace (default: the cluster's)."""
        by_kind = {k.kind: k for k in (SANDBOX_TEMPLATES, SANDBOX_WARMPOOLS, SANDBOX_CLAIMS, SANDBOXES, PODS)}
        made = []
        for obj in objects:
            kind = by_kind[obj["kind"]]
            made.append(await self.api.create(kind, obj.get("metadata", {}).get("namespace") or self.namespace, obj))
        return made

    async def apply_template(self, template: str, *, command: Optional[list[str]] = None,
                             args: Optional[list[str]] = None, replicas: int = 1, port: int = 8888,
                             resources: Optional[dict] = None) -> str:
        """A SandboxTemplate and a SandboxWarmPool named ``sandlot-<template>`` in the contract's shape; the
        container runs ``command`` + ``args`` (default: the contract's pod agent). Gives the pool's name."""
        name = f"sandlot-{template}"
        container = {
            "name": "agent", "image": "sandlot-agent:test",
            "command": command if command is not None else ["python3", "-I", "-S", "-B", "/opt/sandlot/_agent/pod.py"],
            "args": args if args is not None else ["--port", str(port)],
            "ports": [{"containerPort": port, "name": "agent"}],
            "readinessProbe": {"tcpSocket": {"port": port}, "periodSeconds": 1},
        }
        if resources is not None:
            container["resources"] = resources
        await self.apply(
            {"apiVersion": "extensions.agents.x-k8s.io/v1beta1", "kind": "SandboxTemplate",
             "metadata": {"name": name},
             "spec": {"podTemplate": {"metadata": {"labels": {"app.kubernetes.io/name": "sandlot-sandbox",
                                                               "sandlot.dev/template": template}},
                                      "spec": {"runtimeClassName": "gvisor", "restartPolicy": "Never",
                                               "automountServiceAccountToken": False,
                                               "containers": [container]}}}},
            {"apiVersion": "extensions.agents.x-k8s.io/v1beta1", "kind": "SandboxWarmPool",
             "metadata": {"name": name},
             "spec": {"replicas": replicas, "sandboxTemplateRef": {"name": name}}},
        )
        return name

    # -- knobs --------------------------------------------------------------------------------------

    def never_ready(self, pool_or_template: str) -> None:
        """Pods of this SandboxWarmPool or SandboxTemplate start but never pass their readiness probe."""
        self._never_ready.add(pool_or_template)

    def gone_on_next_watch(self) -> None:
        """The API server compacts: open watches end, and a watch from any resourceVersion handed out so far
        gets an ERROR event with a 410 Status (kubernetes_asyncio raises ApiException(status=410))."""
        self.api.expire_watches()

    async def kill_pod(self, claim_name: str, namespace: Optional[str] = None) -> None:
        """The pod dies: its sandbox is killed, the claim becomes Ready False (PodFailed) with no podIPs."""
        pod = self.pods[(namespace or self.namespace, claim_name)]
        await self._fail(pod, "the pod was killed")

    def claims(self, namespace: Optional[str] = None) -> list[dict]:
        return self.api.objects(SANDBOX_CLAIMS, namespace)

    def claim(self, name: str, namespace: Optional[str] = None) -> Optional[dict]:
        return self.api.get(SANDBOX_CLAIMS, namespace or self.namespace, name)

    def watch_requests(self, plural: str = "sandboxclaims") -> list[dict]:
        """The watch requests made so far for a resource, oldest first: their query parameters
        (resourceVersion, labelSelector, ...). kmock's own ``action.WATCH`` view misses them: it takes only
        ``watch=true``, and kubernetes_asyncio sends ``watch=True``."""
        return [dict(r.params) for r in self.api
                if r.resource is not None and r.resource.plural == plural and r.name is None
                and r.params.get("watch") in ("1", "t", "T", "true", "TRUE", "True")]

    def running_pods(self) -> int:
        """How many sandboxes this cluster has running now."""
        return sum(1 for pod in self.pods.values() if pod.running)

    async def wait_ready(self, name: str, namespace: Optional[str] = None, timeout: float = 30.0) -> dict:
        """The claim, once its Ready condition is True."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            claim = self.claim(name, namespace)
            conditions = (claim or {}).get("status", {}).get("conditions") or []
            if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
                assert claim is not None
                return claim
            if loop.time() > deadline:
                raise TimeoutError(f"claim {name} not ready after {timeout}s: {claim}")
            await asyncio.sleep(0.01)

    # -- the controller -----------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _control(self, queue: asyncio.Queue) -> None:
        for claim in self.api.objects(SANDBOX_CLAIMS):
            self._reconcile(claim)
        while (event := await queue.get()) is not None:
            event: Event
            if event.kind == SANDBOX_CLAIMS:
                if event.type == "DELETED":
                    meta = event.obj["metadata"]
                    pod = self.pods.pop((meta["namespace"], meta["name"]), None)
                    if pod is not None:
                        self._spawn(self._teardown(pod, "claim deleted"))
                else:
                    self._reconcile(event.obj)
            elif event.kind in (SANDBOX_WARMPOOLS, SANDBOX_TEMPLATES) and event.type == "ADDED":
                for claim in self.api.objects(SANDBOX_CLAIMS, event.obj["metadata"]["namespace"]):
                    self._reconcile(claim)  # claims that waited for their pool or template

    def _reconcile(self, claim: dict) -> None:
        meta = claim["metadata"]
        key = (meta["namespace"], meta["name"])
        if key in self.pods or meta.get("deletionTimestamp"):
            return
        pool_name = (claim.get("spec", {}).get("warmPoolRef") or {}).get("name", "")
        pool = self.api.get(SANDBOX_WARMPOOLS, meta["namespace"], pool_name)
        template_name = ((pool or {}).get("spec", {}).get("sandboxTemplateRef") or {}).get("name", "")
        template = self.api.get(SANDBOX_TEMPLATES, meta["namespace"], template_name) if pool else None
        if pool is None or template is None:
            reason, missing = ("WarmPoolNotFound", f"SandboxWarmPool {pool_name!r}") if pool is None else \
                ("TemplateNotFound", f"SandboxTemplate {template_name!r}")
            conditions = claim.get("status", {}).get("conditions") or []
            if not any(c.get("reason") == reason for c in conditions):
                self._spawn(self._write_claim(meta["namespace"], meta["name"], False, reason,
                                              f"{missing} not found", "", []))
            return
        # A warm pool's sandboxes are named after the pool; the claim adopts one (its name is in the status).
        pod = Pod(claim=meta["name"], namespace=meta["namespace"], name=f"{pool_name[:57]}-{secrets.token_hex(3)[:5]}",
                  pool=pool_name, template=template_name)
        self.pods[key] = pod
        pod.task = self._spawn(self._run_pod(pod, template))

    async def _write_claim(self, namespace: str, claim: str, ready: bool, reason: str, message: str,
                           sandbox_name: str, ips: list[str]) -> None:
        current = self.api.get(SANDBOX_CLAIMS, namespace, claim)
        if current is None:
            return
        status = dict(current.get("status") or {})
        status["conditions"] = [_condition("True" if ready else "False", reason, message)]
        status["sandbox"] = {"name": sandbox_name, "podIPs": ips} if sandbox_name else {}
        with contextlib.suppress(kmock.KubernetesError):  # deleted meanwhile
            await self.api.write_status(SANDBOX_CLAIMS, namespace, claim, status)

    async def _write_pod(self, pod: Pod) -> None:
        status = {"phase": "Running" if pod.phase == "Running" else pod.phase, "podIP": pod.ip,
                  "podIPs": [{"ip": pod.ip}] if pod.ip else [],
                  "conditions": [{"type": "Ready", "status": "True" if pod.ready else "False"}]}
        with contextlib.suppress(kmock.KubernetesError):
            await self.api.write_status(PODS, pod.namespace, pod.name, status)
        with contextlib.suppress(kmock.KubernetesError):
            await self.api.write_status(SANDBOXES, pod.namespace, pod.name, {
                "conditions": [_condition("True" if pod.ready else "False",
                                          "SandboxReady" if pod.ready else "SandboxNotReady", pod.phase)],
                "podIPs": [pod.ip] if pod.ip else []})

    async def _run_pod(self, pod: Pod, template: dict) -> None:
        try:
            await self._start_pod(pod, template)
        except Exception as exc:  # the kubelet could not start it: the pod fails, the claim says why
            if not pod.gone.is_set():
                await self._fail(pod, f"the pod failed to start: {exc!r}")
            elif pod.sandbox is not None:
                await self._stop(pod)

    async def _start_pod(self, pod: Pod, template: dict) -> None:
        pod_template = template.get("spec", {}).get("podTemplate") or {}
        spec = pod_template.get("spec") or {}
        container = (spec.get("containers") or [{}])[0]
        port = ((container.get("readinessProbe") or {}).get("tcpSocket") or {}).get("port") or \
            ((container.get("ports") or [{}])[0]).get("containerPort") or 8888
        labels = dict((pod_template.get("metadata") or {}).get("labels") or {})
        await self._write_claim(pod.namespace, pod.claim, False, "SandboxNotReady", "the pod is starting",
                                pod.name, [])
        claim_uid = (self.api.get(SANDBOX_CLAIMS, pod.namespace, pod.claim) or {}).get("metadata", {}).get("uid", "")
        with contextlib.suppress(kmock.KubernetesError):
            made = await self.api.create(SANDBOXES, pod.namespace, {
                "metadata": {"name": pod.name, "labels": labels, "ownerReferences": [
                    {"apiVersion": SANDBOX_CLAIMS.api_version, "kind": SANDBOX_CLAIMS.kind, "name": pod.claim,
                     "uid": claim_uid, "controller": True}]},
                "spec": {"podTemplate": pod_template}})
            await self.api.create(PODS, pod.namespace, {
                "metadata": {"name": pod.name, "labels": labels, "ownerReferences": [
                    {"apiVersion": SANDBOXES.api_version, "kind": SANDBOXES.kind, "name": pod.name,
                     "uid": made["metadata"]["uid"], "controller": True}]},
                "spec": spec})
        if pod.gone.is_set():
            return
        env = {e["name"]: str(e.get("value", "")) for e in container.get("env") or [] if "name" in e}
        argv = list(container.get("command") or []) + list(container.get("args") or [])
        limits = pod_limits(container)
        try:
            sandbox = await sandlot.AsyncSandbox.create(self.sandbox_template, isolation="process", api_url="",
                                                        limits=limits or None)
        except sandlot.SandlotError as exc:  # e.g. limits a sandbox refuses: the pod cannot start
            pod.phase = "Failed"
            await self._write_pod(pod)
            await self._write_claim(pod.namespace, pod.claim, False, "PodFailed", f"the pod cannot start: {exc}",
                                    pod.name, [])
            return
        pod.sandbox = sandbox
        self.started_sandboxes += 1
        if pod.gone.is_set():  # deleted while it booted: the teardown may have run already
            await sandbox.kill()
            return
        pod.command = await sandbox.commands.run("exec " + shlex.join(argv), background=True, env=env or None,
                                                 cwd=container.get("workingDir"))
        pod.address = PodAddress(await sandbox.get_url(port))
        pod.ip = await pod.address.open(port, {p.ip for p in self.pods.values() if p is not pod and p.ip})
        pod.watcher = self._spawn(self._watch_container(pod))
        pod.port_forwarder = self._spawn(self._forward_ports(pod, port))
        await self._write_pod(pod)
        if pod.pool in self._never_ready or pod.template in self._never_ready:
            return  # it runs, but its probe never passes
        while not pod.gone.is_set() and pod.phase == "Pending":
            if await tcp_probe(pod.ip, port):
                break
            await asyncio.sleep(self.probe_interval)
        if pod.gone.is_set() or pod.phase != "Pending":
            return
        pod.phase, pod.ready = "Running", True
        await self._write_pod(pod)
        await self._write_claim(pod.namespace, pod.claim, True, "SandboxReady", "the sandbox is ready",
                                pod.name, [pod.ip])

    async def _forward_ports(self, pod: Pod, holder_port: int) -> None:
        """The ports the pod's code listens on at every address are open at the pod's address while they listen (a
        connection to one that does not is refused: no listener there). The sandbox's netns pid is the engine's own
        (the test process made the sandbox)."""
        netns_pid = pod.sandbox._handle._proc.netns_pid()
        while not pod.gone.is_set() and pod.phase in ("Pending", "Running"):
            inside = listening_ports(netns_pid) - {holder_port}
            for port in sorted(inside):
                address = pod.ports.get(port)
                if address is None:
                    try:
                        address = pod.ports[port] = PodAddress(await pod.sandbox.get_url(port))
                    except sandlot.SandlotError:
                        return  # the sandbox ended
                if address._server is None:
                    await address.listen(pod.ip, port)  # (held by another socket of this host: tried again)
            for port, address in pod.ports.items():
                if port not in inside:
                    address.stop_listening()
            await asyncio.sleep(self.probe_interval)

    async def _watch_container(self, pod: Pod) -> None:
        """restartPolicy Never: a container that exits fails its pod."""
        code = None
        with contextlib.suppress(Exception):
            code = (await pod.command.wait()).exit_code
        if not pod.gone.is_set() and pod.phase in ("Pending", "Running"):
            await self._fail(pod, f"the container exited with code {code}", "Succeeded" if code == 0 else "Failed")

    async def _fail(self, pod: Pod, message: str, phase: str = "Failed") -> None:
        """The pod ends (killed, or its container exited: restartPolicy Never); the claim is not Ready."""
        if pod.phase in ("Failed", "Succeeded", "Deleted"):
            return
        pod.phase, pod.ready = phase, False
        await self._stop(pod)
        await self._write_pod(pod)
        await self._write_claim(pod.namespace, pod.claim, False, "PodFailed", message, pod.name, [])

    async def _stop(self, pod: Pod) -> None:
        if pod.port_forwarder is not None and pod.port_forwarder is not asyncio.current_task():
            pod.port_forwarder.cancel()
            with contextlib.suppress(BaseException):
                await pod.port_forwarder
        for address in pod.ports.values():
            await address.close()
        if pod.address is not None:
            await pod.address.close()
            # Let get_url's listener see the resets before the kill closes it: it cancels the connections
            # still open, which Python 3.11 logs as an error of the loop.
            await asyncio.sleep(0.01)
        if pod.sandbox is not None:
            with contextlib.suppress(Exception):
                await pod.sandbox.kill()

    async def _teardown(self, pod: Pod, why: str) -> None:
        pod.gone.set()
        pod.phase, pod.ready = "Deleted", False
        if pod.task is not None and pod.task is not asyncio.current_task():
            # Not cancelled: a sandbox half made would be left behind; the task sees `gone` and returns.
            with contextlib.suppress(BaseException):
                await asyncio.shield(pod.task)
        if pod.watcher is not None:
            pod.watcher.cancel()
            with contextlib.suppress(BaseException):
                await pod.watcher
        await self._stop(pod)
        with contextlib.suppress(kmock.KubernetesError):
            await self.api.delete(PODS, pod.namespace, pod.name)
        with contextlib.suppress(kmock.KubernetesError):
            await self.api.delete(SANDBOXES, pod.namespace, pod.name)

    async def _expire(self) -> None:
        """The claim controller's shutdownTime: Delete (and DeleteForeground) delete the claim; Retain
        keeps it, kills the pod and says ClaimExpired."""
        while True:
            now = datetime.datetime.now(datetime.timezone.utc)
            for claim in self.api.objects(SANDBOX_CLAIMS):
                lifecycle = claim.get("spec", {}).get("lifecycle") or {}
                when = lifecycle.get("shutdownTime")
                meta = claim["metadata"]
                try:
                    expired = bool(when) and parse_time(when) <= now
                except ValueError:
                    expired = False
                if not expired or meta.get("deletionTimestamp"):
                    continue
                if lifecycle.get("shutdownPolicy", "Retain") in ("Delete", "DeleteForeground"):
                    with contextlib.suppress(kmock.KubernetesError):
                        await self.api.delete(SANDBOX_CLAIMS, meta["namespace"], meta["name"])
                else:
                    conditions = claim.get("status", {}).get("conditions") or []
                    if not any(c.get("reason") == "ClaimExpired" for c in conditions):
                        pod = self.pods.get((meta["namespace"], meta["name"]))
                        if pod is not None:
                            pod.phase, pod.ready = "Failed", False
                            await self._stop(pod)
                        await self._write_claim(meta["namespace"], meta["name"], False, "ClaimExpired",
                                                "the claim reached its shutdownTime", "", [])
            await asyncio.sleep(self.expiry_interval)


def socket_is_free(ip: str, port: int) -> bool:
    """Whether nothing listens on ip:port (used by the self-tests to see an address closed)."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((ip, port)) != 0


class KubeClusterThread:
    """A KubeCluster on an event loop of its own thread, for sync tests: their blocking calls (the sync SDK,
    httpx to a subprocess server) would starve an emulator living on the test's own loop.

    ``with KubeClusterThread() as cluster:`` then the same API, every method called from the test's thread
    and run on the cluster's loop (``cluster.wait_ready(name)`` blocks; attributes such as ``kubeconfig``
    are read as they are). On exit the cluster closes and that loop's warm sandboxes end with it."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kubeemu-loop", daemon=True)
        self.cluster: Optional[KubeCluster] = None

    def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        async def call() -> Any:
            result = fn(*args, **kwargs)
            return await result if inspect.isawaitable(result) else result

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result()

    def __enter__(self) -> "KubeClusterThread":
        self._thread.start()
        try:
            self.cluster = self._run(lambda: KubeCluster(**self._options).start())
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if self.cluster is not None:
                self._run(self.cluster.close)
        finally:
            self._stop()

    def _stop(self) -> None:
        from sandlot._engine import default_engine

        try:  # this loop's warm pools and the cleanups of its killed sandboxes end here
            self._run(default_engine().shutdown)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
            self._loop.close()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or self.cluster is None:
            raise AttributeError(name)
        value = getattr(self.cluster, name)
        if not callable(value):
            return value
        return lambda *args, **kwargs: self._run(value, *args, **kwargs)
