"""The kubernetes tier: every sandbox is a pod claimed from a warm pool, under gVisor, on a cluster.

On top of kubernetes-sigs/agent-sandbox (the custom resources the GKE Agent Sandbox is built on): per
Sandlot template, a ``SandboxTemplate`` (the pod: ``runtimeClassName: gvisor``, non-root, no service-account
token, default-deny egress, ingress from the server's pods only) and a ``SandboxWarmPool`` of ready pods;
``sandlot kube manifests`` prints them. A sandbox is a ``SandboxClaim`` on the pool:

- start: the claim is made (``lifecycle.shutdownTime``: the sandbox's deadline, so a crashed server leaks
  no pod; ``shutdownPolicy: Delete``), its Ready condition and pod address awaited (a watch, taken up again
  after a 410), then the server connects to the pod's holder (sandlot/_agent/pod.py) over the pod network
  with a key made for this sandbox, which binds the pod; the agent boots from the plan sent on that channel.
- the channel is Sandlot's wire protocol over TCP, exactly as on the other tiers (everything above the
  backend is unchanged); a lease moves the claim's shutdownTime with the sandbox's deadline.
- get_url (a server the sandbox's code started): a TCP connection to that port at the pod's address, over the
  pod network as the holder's channel (``open_port``).
- kill: the claim deleted (the controller deletes the Sandbox and its pod).
- adopt (a restarted server): the record (claim name, pod address, key) names the pod; the key proves the
  server is the owner, and the newest owner takes over the channel.

The pod's limits are the template's (its resources): the cluster's warm pods are made before any owner
asks. cpu and memory other than those are refused. The kernel's counters live on the node, out of
the server's reach: the pod's holder reads the pod's own (gVisor's sentry's: CPU of every process,
memory, its peak sampled) and answers ``pod_usage`` around each call (``refresh_usage``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import secrets
import socket
import time
from typing import Any, Mapping, Optional

from .. import _config
from .._agent import protocol
from .._exceptions import HostUnsupported, InvalidRequest, SandboxCrashed, SandboxNotFound, SandlotError
from .._exceptions import TimeoutError as SandlotTimeout
from .._host.channel import Channel
from .._limits import Limits
from .._net.policy import NetworkPolicy
from .._net.ports import PortUnreachable, connect_address
from .._templates import Template
from ._common import boot_message, new_sandbox_id, sandbox_config, sandbox_env, template_config
from . import kube_network
from .base import Backend, BackendSandbox, Capabilities, Counters

GROUP, VERSION = "extensions.agents.x-k8s.io", "v1beta1"
CLAIMS = "sandboxclaims"
LABEL_SANDBOX, LABEL_MANAGED = "sandlot.dev/sandbox", "sandlot.dev/managed-by"
LABEL_TEMPLATE = "sandlot.dev/template"
# On the claims of a durable engine's sandboxes (a server's: recorded in its database), the only ones a server's
# sweep may take for leftovers; a program using the SDK directly records its sandboxes nowhere.
LABEL_DURABLE = "sandlot.dev/durable"
POD_AGENT_DIR = "/opt/sandlot/_agent"
CONNECT_TIMEOUT = 10.0
# seconds a connection to a server of the sandbox's code (get_url) may take: a pod gone or a NetworkPolicy that
# drops the packets answers nothing, and the caller's 502 should not wait for TCP's own minutes
PORT_CONNECT_TIMEOUT = 5.0
BOOT_TIMEOUT = 120.0
USAGE_WITHIN = 1.0  # seconds a pod's holder has to answer for its counters
# Seconds: a claim no server recorded, younger than this, may be a create in flight or another replica's one-shot
# run (which has no row); older, it is what a server that died left.
ORPHAN_AFTER = 3600.0
# seconds for one call of the API server: its client has no timeout, and a connection that died without a word
# (a load balancer dropping it) would hold a create, a kill or a lease for ever
API_TIMEOUT = 30.0
WATCH_AGAIN_AFTER = 1.0  # seconds: the least time between two watches of a claim
HOLDER_CLOSED = "the agent closed the channel"  # Channel.closed_reason when the pod's holder closed it


def claim_name(sandbox_id: str) -> str:
    return "sandlot-" + sandbox_id


def pool_name(template: str) -> str:
    """The SandboxWarmPool (and SandboxTemplate) of a Sandlot template."""
    return "sandlot-" + template


def rfc3339(unix_time: float) -> str:
    return datetime.datetime.fromtimestamp(unix_time, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class PodRefused(SandlotError):
    """The pod's holder refused this server's key: someone else bound the pod first, or it is not ours."""


# -- the cluster's API ---------------------------------------------------------------------------------
class _Cluster:
    """The API client of one event loop (aiohttp sessions belong to their loop)."""

    def __init__(self, api_client: Any, namespace: str) -> None:
        from kubernetes_asyncio import client

        self.api_client = api_client
        self.custom = client.CustomObjectsApi(api_client)
        self.namespace = namespace

    @classmethod
    async def connect(cls) -> "_Cluster":
        try:
            from kubernetes_asyncio import client, config
        except ImportError:
            raise HostUnsupported("the kubernetes tier needs the Kubernetes client: pip install 'sandlot[kubernetes]'") \
                from None
        configuration = client.Configuration()
        in_cluster = os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG")
        context_namespace = None
        try:
            if in_cluster:
                config.load_incluster_config(client_configuration=configuration)
            else:
                # Named now: the client reads $KUBECONFIG once, when it is first imported.
                config_file = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
                await config.load_kube_config(config_file=config_file, client_configuration=configuration)
                _, current = config.list_kube_config_contexts(config_file)
                context_namespace = ((current or {}).get("context") or {}).get("namespace")
        except Exception as exc:  # the client's ConfigException and file errors
            raise HostUnsupported(f"the kubernetes tier found no cluster to use: {exc} (set KUBECONFIG, or run "
                                  "the server in the cluster)") from None
        return cls(client.ApiClient(configuration=configuration), _config.kube_namespace(context_namespace))

    async def create_network_policy(self, body: dict) -> None:
        from kubernetes_asyncio import client

        await _answered(client.NetworkingV1Api(self.api_client).create_namespaced_network_policy(self.namespace, body))

    async def delete_network_policy(self, name: str) -> None:
        from kubernetes_asyncio import client
        from kubernetes_asyncio.client.exceptions import ApiException

        try:
            await _answered(client.NetworkingV1Api(self.api_client).delete_namespaced_network_policy(name, self.namespace))
        except ApiException as exc:
            if exc.status != 404:
                raise

    async def create_claim(self, body: dict) -> dict:
        return await _answered(self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, CLAIMS,
                                                                            body))

    async def get_claim(self, name: str) -> Optional[dict]:
        from kubernetes_asyncio.client.exceptions import ApiException

        try:
            return await _answered(self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, CLAIMS,
                                                                            name))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def delete_claim(self, name: str) -> None:
        from kubernetes_asyncio.client.exceptions import ApiException

        try:
            await _answered(self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, CLAIMS, name))
        except ApiException as exc:
            if exc.status != 404:
                raise

    async def patch_claim(self, name: str, patch: dict) -> None:
        await _answered(self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, CLAIMS, name, patch,
                                                                   _content_type="application/merge-patch+json"))

    async def list_claims(self, label_selector: str) -> list:
        listed = await _answered(self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, CLAIMS,
                                                                           label_selector=label_selector))
        return list(listed.get("items") or [])

    async def wait_ready(self, name: str, timeout: float) -> str:
        """The claimed pod's address once the claim is Ready; SandboxCrashed if the claim goes away or
        fails, TimeoutError after ``timeout``. A watch from the claim's resourceVersion; a 410 (the version
        is too old: the API server compacted its history) starts over from a fresh read."""
        try:  # (a watch whose connection died without a word would never end, nor see the deadline)
            return await asyncio.wait_for(self._wait_ready(name, timeout), timeout + API_TIMEOUT)
        except asyncio.TimeoutError:
            raise SandlotTimeout(f"the cluster gave sandbox claim {name} no ready pod within {timeout:.0f} s "
                                 "(its API server stopped answering)") from None

    async def _wait_ready(self, name: str, timeout: float) -> str:
        from kubernetes_asyncio import watch
        from kubernetes_asyncio.client.exceptions import ApiException

        deadline = time.monotonic() + timeout
        while True:
            claim = await self.get_claim(name)
            address = _ready_address(claim, name)
            if address is not None:
                return address
            left = deadline - time.monotonic()
            if left <= 0:
                raise SandlotTimeout(f"the cluster gave sandbox claim {name} no ready pod within {timeout:.0f} s "
                                     f"({_claim_state(claim)})")
            stream = watch.Watch()
            watched_at = time.monotonic()
            try:
                async with stream:
                    async for event in stream.stream(
                            self.custom.list_namespaced_custom_object, GROUP, VERSION, self.namespace, CLAIMS,
                            field_selector=f"metadata.name={name}", resource_version=claim["metadata"].get("resourceVersion"),
                            timeout_seconds=max(1, int(min(left, 60)))):
                        obj = event.get("object") or {}
                        if event.get("type") == "DELETED":
                            raise SandboxCrashed(f"sandbox claim {name} was deleted before its pod was ready")
                        if (obj.get("metadata") or {}).get("name") != name:
                            continue
                        address = _ready_address(obj, name)
                        if address is not None:
                            return address
                        if time.monotonic() >= deadline:
                            break
            except ApiException as exc:
                if exc.status != 410:
                    raise
            # 410 Gone, or the watch's own timeout: read the claim afresh and watch again; at most once a second
            # (a server or proxy that ends every watch at once would have us flood it for the whole timeout)
            await asyncio.sleep(max(0.0, min(WATCH_AGAIN_AFTER - (time.monotonic() - watched_at),
                                             deadline - time.monotonic())))

    async def close(self) -> None:
        await self.api_client.close()


async def _answered(call: Any) -> Any:
    """An API call's answer within API_TIMEOUT, else TimeoutError."""
    try:
        return await asyncio.wait_for(call, API_TIMEOUT)
    except asyncio.TimeoutError:
        raise SandlotTimeout(f"the cluster's API server did not answer within {API_TIMEOUT:.0f} s") from None


def _ready_address(claim: Optional[Mapping[str, Any]], name: str) -> Optional[str]:
    if claim is None:
        raise SandboxCrashed(f"sandbox claim {name} is gone")
    status = claim.get("status") or {}
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Ready" and condition.get("status") == "True":
            ips = (status.get("sandbox") or {}).get("podIPs") or []
            if ips:
                return str(ips[0])
    return None


def _claim_state(claim: Optional[Mapping[str, Any]]) -> str:
    for condition in ((claim or {}).get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Ready":
            return f"Ready={condition.get('status')}: {condition.get('reason') or ''} {condition.get('message') or ''}".strip()
    return "no Ready condition yet: is the agent-sandbox controller running, and the warm pool's template there?"


# -- the pod's holder ------------------------------------------------------------------------------------
async def connect_pod(address: str, port: int, key: str, *, bind: bool = False) -> "tuple[socket.socket, dict]":
    """A TCP connection to a pod's holder that said welcome to ``key`` (pod.py), and its welcome. ``bind``: the
    pod may be unbound, and this key binds it (only for the claim this server just made)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(address, port, type=socket.SOCK_STREAM)
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, sockaddr), CONNECT_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await loop.sock_sendall(sock, protocol.encode({"t": "hello", "id": 0, "key": key, "bind": bind}))
        welcome = await asyncio.wait_for(_read_frame(sock), CONNECT_TIMEOUT)
    except (OSError, asyncio.TimeoutError, protocol.ProtocolError, EOFError) as exc:
        sock.close()
        if isinstance(exc, EOFError):
            raise PodRefused(f"the pod at {address}:{port} refused this server's key") from None
        raise SandboxCrashed(f"cannot reach the sandbox's pod at {address}:{port}: {exc or type(exc).__name__}") \
            from None
    if welcome.get("t") != "welcome":
        sock.close()
        raise PodRefused(f"the pod at {address}:{port} does not speak Sandlot's pod protocol")
    return sock, welcome


async def _read_frame(sock: socket.socket) -> dict:
    """One frame, read exactly (what follows it belongs to the channel)."""
    prefix = await _read_exactly(sock, protocol.PREFIX.size)
    head_len, payload_len = protocol.check_prefix(prefix)
    rest = await _read_exactly(sock, head_len + payload_len)
    return protocol.decode_header(rest[:head_len])


async def _read_exactly(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = bytearray()
    while len(data) < n:
        chunk = await loop.sock_recv(sock, n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return bytes(data)


# -- the handle -----------------------------------------------------------------------------------------
class KubernetesSandbox(BackendSandbox):
    isolation = "kubernetes"

    def __init__(self, sandbox_id: str, template: str, limits: Limits, cluster: _Cluster, address: str,
                 port: int, key: str, sock: socket.socket) -> None:
        self.id = sandbox_id
        self.template = template
        self.limits = limits
        self.cluster = cluster
        self.address, self.port, self.key = address, port, key
        self.channel = Channel(sock)
        self.channel.honours_moved = True  # the pod's holder says so when another owner took over (pod.py)
        self.killed_reason: Optional[str] = None
        self._returncode: Optional[int] = None
        self._cleanup: Optional[asyncio.Task] = None
        self.network_policy = False  # a NetworkPolicy of its own opens its egress (kube_network.py)
        self._counters = Counters(cpu_seconds=0.0, memory=0, memory_peak=0, oom_kills=0, memory_limit_hits=0,
                                  pids_limit_hits=0, processes=0)

    @property
    def claim(self) -> str:
        return claim_name(self.id)

    @property
    def pid(self) -> int:
        return 0  # no process of this host: the sandbox is a pod

    @property
    def returncode(self) -> Optional[int]:
        if self._returncode is None and not self.channel.is_open:
            self._returncode = -9 if self.killed_reason else 0
        return self._returncode

    async def wait(self) -> int:
        await self.channel.closed()
        return self.returncode or 0

    async def kill(self, reason: str = "killed") -> None:
        if self.killed_reason is None:
            self.killed_reason = reason
        let_go = self.channel.closed_reason == HOLDER_CLOSED  # before we asked: see _delete_claim
        await self.channel.aclose()
        self._returncode = -9
        if self._cleanup is None and not self.channel.moved:  # moved: the sandbox is another owner's now
            self._cleanup = asyncio.get_running_loop().create_task(self._delete_claim(let_go))
            self.on_cleanup(self._cleanup)
        if self._cleanup is not None:
            await asyncio.shield(self._cleanup)

    async def _delete_claim(self, let_go: bool = False) -> None:
        """``let_go``: the holder closed our channel without a "moved" we read. It closes an owner only for a newer
        one (its "moved" lost: we did not read it within its 2 s, or were cut off) or as the pod ends: while the
        claim still names a ready pod at our address, the sandbox is another owner's, in use, and not ours to end."""
        try:
            if let_go and _ready_address(await self.cluster.get_claim(self.claim), self.claim) == self.address \
                    and await self._holder_listens():  # (a claim's status lags its pod's death by seconds)
                self.channel.moved = True
                return
            await self.cluster.delete_claim(self.claim)
        except Exception:  # the claim's shutdownTime ends it anyway
            pass
        if self.network_policy:
            try:  # the cluster's garbage collector deletes it with the claim too (its owner)
                await self.cluster.delete_network_policy(self.claim)
            except Exception:
                pass

    async def _holder_listens(self) -> bool:
        """Whether the pod's holder still takes connections: one it keeps open, silent, waiting for a hello (a dead
        pod's address refuses, resets or closes it), closed by us without a word."""
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(self.address, self.port),
                                                    CONNECT_TIMEOUT / 3)
        except (OSError, asyncio.TimeoutError):
            return False
        try:
            await asyncio.wait_for(reader.read(1), 0.5)
            return False  # closed (or spoke): no holder behind it
        except asyncio.TimeoutError:
            return True
        except OSError:
            return False
        finally:
            writer.close()

    async def apply_limits(self, limits: Limits) -> None:
        _check_pod_limits(limits, self.limits)
        self.limits = limits

    async def refresh_usage(self, *, reset_peak: bool = False) -> None:
        """The pod's counters, from its holder (pod.py PodMeter: the pod's kernel's, which its code cannot
        change); the last ones kept if it does not answer within a second."""
        if not self.channel.is_open:
            return
        rid, queue = self.channel.new_request()
        try:
            await self.channel.send({"t": "pod_usage", "id": rid, "reset_peak": reset_peak})
            item = await asyncio.wait_for(queue.get(), USAGE_WITHIN)
        except (asyncio.TimeoutError, OSError):
            return
        finally:
            self.channel.forget(rid)
        if isinstance(item, tuple) and item[0].get("t") == "pod_usage":
            self._counters = _counters(item[0], self._counters)

    def usage(self, *, reset_peak: bool = False, processes: bool = False) -> Counters:
        return self._counters

    def check_ports(self) -> None:
        """Every pod's ports are reachable from the server's pods (the manifests' NetworkPolicy)."""

    async def open_port(self, port: int) -> "tuple[asyncio.StreamReader, asyncio.StreamWriter]":
        """``port`` at the pod's address, over the pod network as the holder's channel (the manifests' NetworkPolicy
        lets the server's pods reach every TCP port of a sandbox pod); refused or unreachable: PortUnreachable."""
        if not self.channel.is_open:  # the pod is gone (its address may be another pod's by now)
            raise PortUnreachable(f"sandbox {self.id} has ended: {self.channel.closed_reason}")
        if port == self.port:  # the holder's own: nothing of the sandbox's can listen there
            raise PortUnreachable(f"port {port} of a kubernetes sandbox is its pod's holder (Sandlot's), not a server "
                                  "of its code: serve on another port")
        return await connect_address(self.address, port, PORT_CONNECT_TIMEOUT)

    async def leased(self, until: Optional[float]) -> None:
        """The claim ends with the sandbox's deadline (a crashed server leaks no pod past it)."""
        if until is not None:
            await self.cluster.patch_claim(self.claim, {"spec": {"lifecycle": {"shutdownTime": rfc3339(until)}}})

    def describe(self) -> dict[str, Any]:
        return dict(super().describe(), claim=self.claim, address=self.address, port=self.port, key=self.key,
                    network_policy=self.network_policy)


def _counters(answer: Mapping[str, Any], last: Counters) -> Counters:
    """A holder's answer as Counters (a field missing or not a number keeps its last value)."""
    def number(name: str, kind: type) -> Any:
        value = answer.get(name)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
        return kind(value) if ok else getattr(last, name)

    return Counters(cpu_seconds=number("cpu_seconds", float), memory=number("memory", int),
                    memory_peak=number("memory_peak", int), oom_kills=number("oom_kills", int),
                    memory_limit_hits=number("memory_limit_hits", int), pids_limit_hits=number("pids_limit_hits", int),
                    processes=number("processes", int))


def _check_pod_limits(limits: Limits, pod: Limits) -> None:
    if limits.cpu != pod.cpu or limits.memory != pod.memory:
        raise InvalidRequest(f"the kubernetes tier runs a template's sandboxes with its pods' resources (cpu "
                             f"{pod.cpu:g}, memory {pod.memory} bytes): other cpu or memory limits need another "
                             "template (its own warm pool)")


# -- the backend ----------------------------------------------------------------------------------------
class KubernetesBackend(Backend):
    name = "kubernetes"
    # Outlive: the pod's holder keeps the sandbox for the next owner until its lease ends (adopt()).
    capabilities = Capabilities(outlive=True)
    pooled = False  # the cluster's SandboxWarmPool is the pool
    network_by_cluster = True  # a NetworkPolicy per sandbox (kube_network.py), not this host's broker
    reachable_anywhere = True  # over the pod network, from any replica holding the key

    def __init__(self) -> None:
        super().__init__()
        self._clusters: dict[tuple, _Cluster] = {}
        self._closers: dict[tuple, asyncio.Task] = {}  # closes a client when its event loop ends: see cluster()

    async def cluster(self) -> _Cluster:
        """The API client of this event loop for the cluster the environment names now (KUBECONFIG, namespace)."""
        key = (id(asyncio.get_running_loop()), os.environ.get("KUBECONFIG"), _config.get("SANDLOT_KUBE_NAMESPACE"))
        cluster = self._clusters.get(key)
        if cluster is None:
            made = await _Cluster.connect()
            cluster = self._clusters.get(key)
            if cluster is not None:  # another call of this loop connected meanwhile: its client is the one
                await made.close()
                return cluster
            cluster = self._clusters[key] = made
            # asyncio.run() cancels the tasks left when its main ends: this one closes the client then (an HTTP
            # session), which the interpreter would otherwise warn about at exit.
            self._closers[key] = asyncio.get_running_loop().create_task(self._close_at_loop_end(key, cluster))
        return cluster

    async def _close_at_loop_end(self, key: tuple, cluster: "_Cluster") -> None:
        try:
            await asyncio.Event().wait()
        finally:
            if self._clusters.get(key) is cluster:
                del self._clusters[key]
            if self._closers.get(key) is asyncio.current_task():
                del self._closers[key]
            await cluster.close()

    @classmethod
    def network_problem(cls, policy: Any, secrets: Any) -> Optional[str]:
        return kube_network.problem(policy, secrets)

    async def finish_cleanups(self) -> None:
        """Claims of killed sandboxes deleted, then this event loop's API client closed (a later call makes one)."""
        await super().finish_cleanups()
        loop_id = id(asyncio.get_running_loop())
        for key in [k for k in self._closers if k[0] == loop_id]:
            self._clusters.pop(key, None)  # a later call makes a new client, never gets the one closing
            closer = self._closers[key]
            closer.cancel()  # it closes the client as it ends
            await asyncio.gather(closer, return_exceptions=True)

    async def start(self, template: Template, limits: Limits, env: dict[str, str], *,
                    awaited: bool = False, network: bool = False, mounts: Any = None,
                    policy: Optional[NetworkPolicy] = None) -> KubernetesSandbox:
        """``policy``: the egress its pod gets (a NetworkPolicy of its own); without one, none (the template's
        default deny)."""
        if mounts is not None:
            raise InvalidRequest("the kubernetes tier has no host directories or volumes yet")
        if network and policy is None:
            raise InvalidRequest("the kubernetes tier's network is a policy of addresses (network=): secrets need "
                                 "isolation='process' or 'gvisor'")
        if template.rootfs:
            raise InvalidRequest(f"the kubernetes tier runs the pod image of its templates: image template "
                                 f"{template.name!r} has no warm pool in the cluster")
        _check_pod_limits(limits, Limits.build(template.default_limits()) if template.limits else Limits())
        cluster = await self.cluster()
        sandbox_id = new_sandbox_id()
        name = claim_name(sandbox_id)
        key = secrets.token_urlsafe(32)
        sandbox: Optional[KubernetesSandbox] = None
        try:
            # In the try: a create cancelled while the API server makes the claim (made, its answer not read yet)
            # deletes it too.
            labels = {LABEL_SANDBOX: sandbox_id, LABEL_MANAGED: "sandlot", LABEL_TEMPLATE: template.name}
            if self.durable:
                labels[LABEL_DURABLE] = "true"
            claim = await cluster.create_claim({
                "apiVersion": f"{GROUP}/{VERSION}", "kind": "SandboxClaim",
                "metadata": {"name": name, "labels": labels},
                "spec": {"warmPoolRef": {"name": pool_name(template.name)},
                         "lifecycle": {"shutdownTime": rfc3339(time.time() + limits.lifetime),
                                       "shutdownPolicy": "Delete"},
                         # The pod carries the sandbox's id too: its own NetworkPolicy, if any, selects it by that.
                         "additionalPodMetadata": {"labels": {LABEL_SANDBOX: sandbox_id}}},
            })
            if policy is not None:
                owner = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "SandboxClaim", "name": name,
                         "uid": str(claim.get("metadata", {}).get("uid") or ""), "blockOwnerDeletion": False}
                await cluster.create_network_policy(kube_network.network_policy(
                    name, (LABEL_SANDBOX, sandbox_id), policy, owner if owner["uid"] else None))
            address = await cluster.wait_ready(name, _config.kube_claim_timeout())
            port = _config.kube_agent_port()
            sock, welcome = await connect_pod(address, port, key, bind=True)
            if welcome.get("bound") != "now":
                sock.close()
                raise PodRefused(f"the pod of claim {name} was bound before this server claimed it")
            sandbox = KubernetesSandbox(sandbox_id, template.name, limits, cluster, address, port, key, sock)
            sandbox.on_cleanup = self.track_cleanup
            sandbox.network_policy = policy is not None
            await sandbox.channel.open()
            env_inside = sandbox_env(template, env)
            config = dict(template_config(template, env), **sandbox_config(limits, env_inside))
            config.update(prefixes=["/"], agent_dir=POD_AGENT_DIR, preload=[])
            if welcome.get("machine") != os.uname().machine:  # our filter is compiled for our architecture
                config["seccomp"] = None
            await sandbox.channel.send({"t": "config", "config": config})
            await asyncio.wait_for(_expect_ready(sandbox), BOOT_TIMEOUT)
        except BaseException as exc:
            if sandbox is not None:
                await asyncio.shield(sandbox.kill("boot failed"))
            elif getattr(exc, "status", None) != 409:  # (409: the name was taken: not our claim to delete)
                await asyncio.shield(cluster.delete_claim(name))
                if policy is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(cluster.delete_network_policy(name))
            if isinstance(exc, asyncio.TimeoutError):
                raise SandlotTimeout(f"the sandbox's agent did not boot in its pod within {BOOT_TIMEOUT:.0f} s") from None
            raise
        return sandbox

    async def adopt(self, record: Mapping[str, Any]) -> KubernetesSandbox:
        """The sandbox ``record`` names (describe()), its pod's channel taken over with its key."""
        sandbox_id = str(record.get("id"))
        cluster = await self.cluster()
        claim = await cluster.get_claim(claim_name(sandbox_id))
        if claim is None:
            raise SandboxNotFound(f"sandbox {sandbox_id} is gone: its claim was deleted")
        try:
            address = _ready_address(claim, claim_name(sandbox_id)) or str(record["address"])
            sock, welcome = await connect_pod(address, int(record["port"]), str(record["key"]), bind=False)
            if welcome.get("bound") != "before":
                sock.close()
                raise PodRefused(f"the pod at {address} is not the sandbox's (it was not bound to its key)")
        except (SandboxCrashed, PodRefused, KeyError, ValueError) as exc:
            # The caller records it as gone (lost), and nobody holds it after: its pod must not run on, out of
            # every quota and idle timeout, until the claim's shutdownTime (its lifetime).
            await asyncio.shield(cluster.delete_claim(claim_name(sandbox_id)))
            raise SandboxNotFound(f"sandbox {sandbox_id} is gone: {exc}") from None
        limits = Limits.build(record["limits"]) if record.get("limits") else Limits()
        sandbox = KubernetesSandbox(sandbox_id, str(record.get("template") or "python"), limits, cluster, address,
                                    int(record["port"]), str(record["key"]), sock)
        sandbox.on_cleanup = self.track_cleanup
        sandbox.network_policy = bool(record.get("network_policy"))
        await sandbox.channel.open()
        return sandbox

    async def sweep_orphans(self, keep: "set[str]") -> int:
        """Claims a server made (found by label) for sandboxes no server recorded, deleted once older than
        ORPHAN_AFTER (younger ones may be another replica's creates in flight)."""
        cluster = await self.cluster()
        deleted = 0
        for claim in await cluster.list_claims(f"{LABEL_MANAGED}=sandlot,{LABEL_DURABLE}=true"):
            meta = claim.get("metadata") or {}
            sandbox_id = (meta.get("labels") or {}).get(LABEL_SANDBOX)
            if sandbox_id in keep or _age(meta.get("creationTimestamp")) < ORPHAN_AFTER:
                continue
            await cluster.delete_claim(meta["name"])
            deleted += 1
        return deleted


def _age(timestamp: Optional[str]) -> float:
    """Seconds since an RFC 3339 time of the API server (0 when absent or unreadable: treated as new)."""
    try:
        then = datetime.datetime.fromisoformat(str(timestamp).replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    if then.tzinfo is None:
        then = then.replace(tzinfo=datetime.timezone.utc)
    return time.time() - then.timestamp()


async def _expect_ready(sandbox: KubernetesSandbox) -> None:
    while (await boot_message(sandbox.channel, "kubernetes sandbox")).get("t") != "ready":
        pass
