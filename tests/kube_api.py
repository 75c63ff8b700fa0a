"""A Kubernetes API server for tests: kmock's KubernetesEmulator with the semantics a real one has.

kmock serves real HTTP on loopback, parses Kubernetes URLs (group, version, plural, namespace, name,
subresource), answers discovery (/api, /apis, /version) and renders errors as ``Status`` bodies. Its own
object handlers are thin (no resourceVersion, no selectors, no PUT, no status subresource, watches that
replay everything and may miss events between the replay and the live stream), so every request for a
served resource is answered here instead, as kube-apiserver answers it:

- objects get ``uid``, ``creationTimestamp``, ``generation`` and a ``resourceVersion`` from one global
  counter (etcd's revision); lists carry the collection's resourceVersion;
- ``labelSelector`` (=, ==, !=, in, notin, exists, !exists) and ``fieldSelector`` (metadata.name,
  metadata.namespace; = and !=) on list, watch and delete-collection; ``limit``/``continue`` on list;
- create (201; 409 AlreadyExists; ``generateName``), get (404 NotFound), replace (PUT; 409 Conflict on a
  stale resourceVersion, 422 without one for custom resources), patch (merge-patch and JSON-patch; a JSON
  patch whose body is not a list is 400, strategic merge on a custom resource is 415, as the real server
  answers kubernetes_asyncio's default content type), delete (finalizers, preconditions), delete-collection;
- the ``status`` subresource: the main resource ignores ``.status`` on create, replace and patch, and
  ``/status`` changes nothing but ``.status``; a write that changes nothing keeps its resourceVersion;
- watch with ``resourceVersion`` (the events after it, from a log), without one or "0" (the current
  objects as ADDED first), ``timeoutSeconds``, label-selector transitions (ADDED/DELETED when an object
  starts or stops matching), and 410 Gone: a watch from a resourceVersion older than the log's floor gets
  an ERROR event with a ``Status`` of code 410 / reason Expired, as kube-apiserver sends it;
- a bearer token is required (401 otherwise).

``expire_watches()`` is the 410 knob: it raises the floor past every resourceVersion handed out so far
and ends the open watches, so each watcher's next request (from its last resourceVersion) gets 410.
The in-process side (the emulated controller) reads and writes the same store through ``get``, ``objects``,
``create``, ``write_status``, ``delete`` and follows every change through ``subscribe()``.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import datetime
import json
import re
import secrets
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import aiohttp.web
import jsonpatch
import kmock
from kmock._internal import rendering  # the parsed request type kmock hands to _handle

AGENTS_GROUP = "agents.x-k8s.io"
EXTENSIONS_GROUP = "extensions.agents.x-k8s.io"
LOG_SIZE = 10_000  # watch events kept for resuming; older resourceVersions are 410 Gone


@dataclass(frozen=True)
class Kind:
    """One served resource."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    status_subresource: bool = True
    custom: bool = True  # a CRD: no strategic merge, no unconditional update

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:  # how kube-apiserver names it in messages: sandboxclaims.extensions.agents.x-k8s.io
        return f"{self.plural}.{self.group}" if self.group else self.plural


SANDBOX_TEMPLATES = Kind(EXTENSIONS_GROUP, "v1beta1", "sandboxtemplates", "SandboxTemplate")
SANDBOX_WARMPOOLS = Kind(EXTENSIONS_GROUP, "v1beta1", "sandboxwarmpools", "SandboxWarmPool")
SANDBOX_CLAIMS = Kind(EXTENSIONS_GROUP, "v1beta1", "sandboxclaims", "SandboxClaim")
SANDBOXES = Kind(AGENTS_GROUP, "v1beta1", "sandboxes", "Sandbox")
PODS = Kind("", "v1", "pods", "Pod", custom=False)
NETWORK_POLICIES = Kind("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", status_subresource=False,
                        custom=False)
SERVED = (SANDBOX_TEMPLATES, SANDBOX_WARMPOOLS, SANDBOX_CLAIMS, SANDBOXES, PODS, NETWORK_POLICIES)


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- errors: kube-apiserver's Status bodies -----------------------------------------------------------------


def api_error(code: int, reason: str, message: str, kind: Optional[Kind] = None,
              name: Optional[str] = None) -> kmock.KubernetesError:
    details: dict[str, Any] = {}
    if kind is not None:
        details = {"group": kind.group, "kind": kind.plural}
        if name:
            details["name"] = name
    return kmock.KubernetesError(status=code, reason=reason, message=message, details=details or None)


def not_found(kind: Kind, name: str) -> kmock.KubernetesError:
    return api_error(404, "NotFound", f'{kind.qualified} "{name}" not found', kind, name)


def conflict(kind: Kind, name: str) -> kmock.KubernetesError:
    return api_error(409, "Conflict", f'Operation cannot be fulfilled on {kind.qualified} "{name}": the object '
                     "has been modified; please apply your changes to the latest version and try again", kind, name)


def status_body(err: kmock.KubernetesError) -> dict:
    body = {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
            "message": err.message, "reason": err.reason, "code": err.status}
    if err.details:
        body["details"] = err.details
    return body


# -- selectors ------------------------------------------------------------------------------------------------

_SET_RE = re.compile(r"^\s*([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split_selector(text: str) -> list[str]:
    """Split on commas that are not inside the parentheses of a set expression."""
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def label_selector(text: Optional[str]) -> Callable[[dict], bool]:
    """A predicate on a labels dict, for the selector syntax kube-apiserver accepts."""
    tests: list[Callable[[dict], bool]] = []
    for term in _split_selector(text or ""):
        if m := _SET_RE.match(term):
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",") if v.strip()}
            if op == "in":
                tests.append(lambda lb, k=key, vs=values: lb.get(k) in vs)
            else:
                tests.append(lambda lb, k=key, vs=values: lb.get(k) not in vs)
        elif "!=" in term:
            key, value = (s.strip() for s in term.split("!=", 1))
            tests.append(lambda lb, k=key, v=value: lb.get(k) != v)
        elif "=" in term:
            key, value = (s.strip() for s in term.replace("==", "=").split("=", 1))
            tests.append(lambda lb, k=key, v=value: lb.get(k) == v)
        elif term.startswith("!"):
            tests.append(lambda lb, k=term[1:].strip(): k not in lb)
        else:
            tests.append(lambda lb, k=term: k in lb)
    return lambda labels: all(t(labels) for t in tests)


def field_selector(text: Optional[str]) -> Callable[[dict], bool]:
    """metadata.name and metadata.namespace, = / == / != (what the API server allows on custom resources)."""
    tests: list[Callable[[dict], bool]] = []
    for term in _split_selector(text or ""):
        negate = "!=" in term
        key, value = (s.strip() for s in re.split(r"!=|==|=", term, maxsplit=1))
        if key not in ("metadata.name", "metadata.namespace"):
            raise api_error(400, "BadRequest", f'field label not supported: {key}')
        attr = key.split(".", 1)[1]
        tests.append(lambda obj, a=attr, v=value, n=negate: (obj.get("metadata", {}).get(a) == v) != n)
    return lambda obj: all(t(obj) for t in tests)


# -- the store ---------------------------------------------------------------------------------------------


@dataclass
class Event:
    rv: int
    kind: Kind
    type: str  # ADDED, MODIFIED, DELETED
    obj: dict
    old: Optional[dict] = None


@dataclass(eq=False)
class _Watch:
    """One open watch stream, ended by ``expire_watches`` or ``close``."""

    ended: asyncio.Event = field(default_factory=asyncio.Event)


class KubeAPI(kmock.KubernetesEmulator):
    """kmock's emulator serving SERVED (and only those) with kube-apiserver's semantics (module doc)."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.token = secrets.token_hex(16)
        self.kinds: dict[tuple[str, str, str], Kind] = {}
        self._store: dict[tuple[Kind, Optional[str], str], dict] = {}
        self._rv = 1
        self._log: collections.deque[Event] = collections.deque()
        self._floor = 0  # a watch from a resourceVersion below this one is 410 Gone
        self._changed = asyncio.Condition()
        self._watches: set[_Watch] = set()
        self._subscribers: list[asyncio.Queue] = []
        self._closed = False
        for kind in SERVED:
            self.serve(kind)

    def serve(self, kind: Kind) -> None:
        self.kinds[(kind.group, kind.version, kind.plural)] = kind
        self.resources[f"{kind.group}/{kind.version}/{kind.plural}" if kind.group else f"v1/{kind.plural}"] = \
            kmock.ResourceInfo(kind=kind.kind, namespaced=kind.namespaced,
                               verbs={"get", "list", "watch", "create", "update", "patch", "delete",
                                      "deletecollection"},
                               subresources={"status"} if kind.status_subresource else set())

    # -- the in-process face (the emulated controller; assertions) -------------------------------------

    @property
    def resource_version(self) -> int:
        return self._rv

    def get(self, kind: Kind, namespace: Optional[str], name: str) -> Optional[dict]:
        obj = self._store.get((kind, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def objects(self, kind: Kind, namespace: Optional[str] = None, labels: Optional[str] = None,
                fields: Optional[str] = None) -> list[dict]:
        match_labels, match_fields = label_selector(labels), field_selector(fields)
        return [copy.deepcopy(obj) for (k, ns, _), obj in sorted(self._store.items(), key=lambda kv: kv[0][1:])
                if k == kind and (namespace is None or ns == namespace)
                and match_labels(obj["metadata"].get("labels") or {}) and match_fields(obj)]

    def subscribe(self) -> asyncio.Queue:
        """Every change from now on, as an ``Event``, in order (``None`` when the server closes)."""
        queue: asyncio.Queue = asyncio.Queue()
        self._subscribers.append(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        if queue in self._subscribers:
            self._subscribers.remove(queue)

    async def create(self, kind: Kind, namespace: Optional[str], body: dict) -> dict:
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        obj.setdefault("apiVersion", kind.api_version)
        obj.setdefault("kind", kind.kind)
        if obj["apiVersion"] != kind.api_version or obj["kind"] != kind.kind:
            raise api_error(400, "BadRequest", f"the API version in the data ({obj['apiVersion']}) does not "
                            f"match the expected API version ({kind.api_version})" if obj["apiVersion"] !=
                            kind.api_version else f"the kind in the data ({obj['kind']}) is not {kind.kind}")
        if kind.namespaced:
            if meta.get("namespace") not in (None, "", namespace):
                raise api_error(400, "BadRequest", "the namespace of the provided object does not match the "
                                "namespace sent on the request")
            meta["namespace"] = namespace
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise api_error(422, "Invalid", f"{kind.kind}.{kind.group or 'core'} \"\" is invalid: "
                                "metadata.name: Required value: name or generateName is required", kind)
            meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
        key = (kind, namespace if kind.namespaced else None, meta["name"])
        if key in self._store:
            raise api_error(409, "AlreadyExists", f'{kind.qualified} "{meta["name"]}" already exists',
                            kind, meta["name"])
        for transient in ("resourceVersion", "uid", "creationTimestamp", "deletionTimestamp", "generation"):
            meta.pop(transient, None)
        if kind.status_subresource:
            obj.pop("status", None)  # create cannot set status when the status subresource is on
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=now_rfc3339(), generation=1)
        return await self._commit(kind, key, obj, None, "ADDED")

    async def write_status(self, kind: Kind, namespace: Optional[str], name: str, status: dict) -> dict:
        """Replace the object's ``.status`` (what a controller does through the status subresource)."""
        key = (kind, namespace, name)
        old = self._store.get(key)
        if old is None:
            raise not_found(kind, name)
        new = copy.deepcopy(old)
        new["status"] = copy.deepcopy(status)
        return await self._update(kind, key, old, new)

    async def delete(self, kind: Kind, namespace: Optional[str], name: str,
                     preconditions: Optional[dict] = None) -> dict:
        key = (kind, namespace if kind.namespaced else None, name)
        old = self._store.get(key)
        if old is None:
            raise not_found(kind, name)
        meta = old["metadata"]
        pre = preconditions or {}
        if (pre.get("uid") and pre["uid"] != meta["uid"]) or \
                (pre.get("resourceVersion") and pre["resourceVersion"] != meta["resourceVersion"]):
            raise conflict(kind, name)
        if meta.get("finalizers"):
            if meta.get("deletionTimestamp"):
                return copy.deepcopy(old)
            new = copy.deepcopy(old)
            new["metadata"]["deletionTimestamp"] = now_rfc3339()
            return await self._commit(kind, key, new, old, "MODIFIED")
        return await self._commit(kind, key, copy.deepcopy(old), old, "DELETED")

    def expire_watches(self) -> None:
        """410 Gone for every resourceVersion handed out so far: a real API server's compaction. The open
        watches end (as the server ends them on its timeouts), so each watcher comes back with its last
        resourceVersion and gets the ERROR event; a fresh list gives a resourceVersion that works again."""
        self._rv += 1  # the store moves on (etcd's revision is global: other writes happen)
        self._floor = self._rv
        self._log.clear()
        for watch in list(self._watches):
            watch.ended.set()

    async def close(self) -> None:
        self._closed = True
        for watch in list(self._watches):
            watch.ended.set()
        async with self._changed:
            self._changed.notify_all()
        for queue in self._subscribers:
            queue.put_nowait(None)

    # -- writes -------------------------------------------------------------------------------------

    async def _update(self, kind: Kind, key: tuple, old: dict, new: dict) -> dict:
        for immutable in ("uid", "creationTimestamp", "name", "namespace", "deletionTimestamp", "generation",
                          "resourceVersion"):
            if immutable in old["metadata"]:
                new["metadata"][immutable] = old["metadata"][immutable]
            else:
                new["metadata"].pop(immutable, None)
        if new == old:  # a no-op write: same resourceVersion, no event
            return copy.deepcopy(old)
        if kind.custom and new.get("spec") != old.get("spec"):
            new["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
        meta = new["metadata"]
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            return await self._commit(kind, key, new, old, "DELETED")
        return await self._commit(kind, key, new, old, "MODIFIED")

    async def _commit(self, kind: Kind, key: tuple, obj: dict, old: Optional[dict], type_: str) -> dict:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        if type_ == "DELETED":
            self._store.pop(key, None)
        else:
            self._store[key] = obj
        event = Event(self._rv, kind, type_, copy.deepcopy(obj), copy.deepcopy(old) if old else None)
        self._log.append(event)
        while len(self._log) > LOG_SIZE:
            self._floor = self._log.popleft().rv
        for queue in self._subscribers:
            queue.put_nowait(event)
        async with self._changed:
            self._changed.notify_all()
        return copy.deepcopy(obj)

    # -- HTTP ---------------------------------------------------------------------------------------

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        raw = request._raw_request
        if raw is not None and raw.headers.get("Authorization") != f"Bearer {self.token}":
            raise api_error(401, "Unauthorized", "Unauthorized")
        if request.resource is None or request.resource.plural is None:
            # kubernetes_asyncio asks /version/ and /apis/ with the slash, which kmock's routes lack
            roots = {"/version/": self._serve_server_version, "/apis/": self._serve_apis, "/api/": self._serve_api}
            if raw is not None and raw.path in roots:
                return _json(await roots[raw.path](request))
            return await super()._handle(request)  # discovery: kmock's own
        res = request.resource
        kind = self.kinds.get((res.group, res.version, res.plural))
        if kind is None:
            raise api_error(404, "NotFound", "the server could not find the requested resource")
        if request.subresource not in (None, "status") or (request.subresource and not kind.status_subresource):
            raise api_error(404, "NotFound", "the server could not find the requested resource")
        ns = request.namespace if kind.namespaced else None
        params = request.params
        method = request.method.value
        if method == "GET" and params.get("watch") in ("1", "t", "T", "true", "TRUE", "True"):  # Go's ParseBool
            return await self._watch(request, kind, ns)
        if request.name is None:
            if method == "GET":
                return _json(self._list(kind, ns, params))
            if method == "POST":
                if kind.namespaced and ns is None:
                    raise api_error(404, "NotFound", "the server could not find the requested resource")
                return _json(await self.create(kind, ns, _body(request, dict)), 201)
            if method == "DELETE":
                deleted = [await self.delete(kind, o["metadata"].get("namespace"), o["metadata"]["name"])
                           for o in self.objects(kind, ns, params.get("labelSelector"), params.get("fieldSelector"))]
                return _json({"apiVersion": kind.api_version, "kind": kind.kind + "List",
                              "metadata": {"resourceVersion": str(self._rv)}, "items": deleted})
            raise api_error(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        if kind.namespaced and ns is None:
            raise api_error(404, "NotFound", "the server could not find the requested resource")
        key = (kind, ns, request.name)
        if method == "GET":
            obj = self.get(kind, ns, request.name)
            if obj is None:
                raise not_found(kind, request.name)
            return _json(obj)
        if method == "DELETE":
            options = request.data if isinstance(request.data, dict) else {}
            gone = await self.delete(kind, ns, request.name, options.get("preconditions"))
            if kind.custom and key not in self._store:
                # A custom resource deleted at once answers a Status (a pod, or an object held by its
                # finalizers, answers the object)
                return _json({"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Success",
                              "details": {"name": request.name, "group": kind.group, "kind": kind.plural,
                                          "uid": gone["metadata"]["uid"]}})
            return _json(gone)
        old = self._store.get(key)
        if old is None:
            raise not_found(kind, request.name)
        if method == "PUT":
            body = _body(request, dict)
            meta = body.get("metadata") or {}
            if meta.get("name") not in (None, request.name):
                raise api_error(400, "BadRequest", "the name of the object does not match the name on the URL")
            if not meta.get("resourceVersion"):
                if kind.custom:
                    raise api_error(422, "Invalid", f'{kind.kind}.{kind.group} "{request.name}" is invalid: '
                                    "metadata.resourceVersion: Invalid value: 0x0: must be specified for an update",
                                    kind, request.name)
            elif meta["resourceVersion"] != old["metadata"]["resourceVersion"]:
                raise conflict(kind, request.name)
            new = copy.deepcopy(body)
            new.setdefault("metadata", {})
        elif method == "PATCH":
            new = self._patched(kind, old, request)
        else:
            raise api_error(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        if kind.status_subresource:
            if request.subresource == "status":  # only .status changes through /status
                status = new.get("status")
                new = copy.deepcopy(old)
                if status is None:
                    new.pop("status", None)
                else:
                    new["status"] = status
            elif "status" in old:
                new["status"] = copy.deepcopy(old["status"])
            else:
                new.pop("status", None)
        return _json(await self._update(kind, key, old, new))

    def _patched(self, kind: Kind, old: dict, request: rendering.Request) -> dict:
        ctype = (request.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        patch = request.data
        if ctype == "application/json-patch+json":
            if not isinstance(patch, list):
                raise api_error(400, "BadRequest", "json: cannot unmarshal object into Go value of type jsonpatch.Patch")
            try:
                new = jsonpatch.apply_patch(copy.deepcopy(old), patch)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                raise api_error(422, "Invalid", f"the server rejected our request due to an error in our request: {exc}")
        elif ctype == "application/merge-patch+json" or (ctype == "application/strategic-merge-patch+json"
                                                          and not kind.custom):
            if not isinstance(patch, dict):
                raise api_error(400, "BadRequest", "json: cannot unmarshal array into Go value of type map[string]interface {}")
            wanted_rv = (patch.get("metadata") or {}).get("resourceVersion")
            if wanted_rv and wanted_rv != old["metadata"]["resourceVersion"]:
                raise conflict(kind, old["metadata"]["name"])
            new = _merge_patch(copy.deepcopy(old), patch)
        else:
            raise api_error(415, "UnsupportedMediaType", "the body of the request was in an unknown format - accepted "
                            "media types include: application/json-patch+json, application/merge-patch+json, "
                            "application/apply-patch+yaml")
        if not isinstance(new, dict) or not isinstance(new.get("metadata"), dict):
            raise api_error(422, "Invalid", "the patch removed the object's metadata")
        return new

    def _list(self, kind: Kind, ns: Optional[str], params: dict) -> dict:
        items = self.objects(kind, ns, params.get("labelSelector"), params.get("fieldSelector"))
        meta: dict[str, Any] = {"resourceVersion": str(self._rv)}
        limit = int(params.get("limit") or 0)
        start = int(params.get("continue") or 0)
        if limit:
            if start + limit < len(items):
                meta["continue"] = str(start + limit)
                meta["remainingItemCount"] = len(items) - start - limit
            items = items[start:start + limit]
        return {"apiVersion": kind.api_version, "kind": kind.kind + "List", "metadata": meta, "items": items}

    async def _watch(self, request: rendering.Request, kind: Kind, ns: Optional[str]) -> aiohttp.web.StreamResponse:
        params = request.params
        match_labels = label_selector(params.get("labelSelector"))
        match_fields = field_selector(params.get("fieldSelector"))
        name = request.name

        def matches(obj: Optional[dict]) -> bool:
            if obj is None:
                return False
            meta = obj["metadata"]
            return ((ns is None or meta.get("namespace") == ns) and (name is None or meta.get("name") == name)
                    and match_labels(meta.get("labels") or {}) and match_fields(obj))

        raw = request._raw_request
        assert raw is not None
        response = aiohttp.web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        await response.prepare(raw)
        watch = _Watch()
        self._watches.add(watch)
        try:
            since = params.get("resourceVersion") or "0"
            try:
                since_rv = int(since)
            except ValueError:
                since_rv = -1
            pending: list[dict] = []
            if since_rv < 0 or (since != "0" and since_rv < self._floor):
                err = api_error(410, "Expired", f"too old resource version: {since} ({self._floor})")
                await response.write(json.dumps({"type": "ERROR", "object": status_body(err)}).encode() + b"\n")
                return response
            if since == "0":
                since_rv = self._rv
                pending = [{"type": "ADDED", "object": obj} for obj in self.objects(kind, ns) if matches(obj)]
            timeout = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else None
            deadline = asyncio.get_running_loop().time() + timeout if timeout else None
            cursor = since_rv
            while True:
                for item in pending:
                    await response.write(json.dumps(item).encode() + b"\n")
                pending = []
                if watch.ended.is_set() or self._closed:
                    break
                if cursor < self._floor:  # the log moved past this watcher (compaction): 410 as a real server
                    err = api_error(410, "Expired", f"too old resource version: {cursor} ({self._floor})")
                    pending.append({"type": "ERROR", "object": status_body(err)})
                    watch.ended.set()
                    continue
                fresh: list[Event] = []
                for event in reversed(self._log):
                    if event.rv <= cursor:
                        break
                    fresh.append(event)
                for event in reversed(fresh):
                    if event.kind != kind:
                        continue
                    now, before = matches(event.obj), matches(event.old)
                    if event.type == "ADDED" and now:
                        pending.append({"type": "ADDED", "object": event.obj})
                    elif event.type == "DELETED" and (now or before):
                        pending.append({"type": "DELETED", "object": event.obj})
                    elif event.type == "MODIFIED" and (now or before):
                        pending.append({"type": "MODIFIED" if now and before else "ADDED" if now else "DELETED",
                                        "object": event.obj})
                cursor = self._rv
                if pending:
                    continue
                left = None if deadline is None else deadline - asyncio.get_running_loop().time()
                if left is not None and left <= 0:
                    break
                if raw.transport is None or raw.transport.is_closing():
                    break  # the client went away
                async with self._changed:
                    if self._rv == cursor and not watch.ended.is_set() and not self._closed:
                        try:
                            await asyncio.wait_for(self._changed.wait(), min(left or 1.0, 1.0))
                        except asyncio.TimeoutError:
                            pass
        except (ConnectionError, RuntimeError):
            pass  # the client closed the stream
        finally:
            self._watches.discard(watch)
        try:
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass
        return response


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if not isinstance(target, dict):
        target = {}
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        else:
            target[key] = _merge_patch(target.get(key), value)
    return target


def _body(request: rendering.Request, expected: type) -> Any:
    if not isinstance(request.data, expected):
        raise api_error(400, "BadRequest", "the request body is not a JSON object")
    return request.data


def _json(payload: Any, status: int = 200) -> aiohttp.web.Response:
    return aiohttp.web.json_response(payload, status=status)
