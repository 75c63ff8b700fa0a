"""What an operator applies to run Sandlot on Kubernetes (`sandlot kube manifests`): plain data, printed as YAML.

The shapes follow the agent-sandbox custom resources (kubernetes-sigs/agent-sandbox, v1beta1) as the
kubernetes tier uses them: one SandboxTemplate and one SandboxWarmPool per Sandlot template, claimed by
the server (SandboxClaim) for each sandbox. The server's Role allows exactly what that takes (claims;
reading templates and pools) and nothing that reaches into a pod: no pods/exec, no secrets.

Nothing here talks to a cluster: it only builds dicts from the flags and the templates' default limits.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Iterable, Optional

import yaml

from . import _config
from ._exceptions import InvalidRequest
from ._limits import Limits

CRD_GROUP = "extensions.agents.x-k8s.io"
CRD_VERSION = "v1beta1"
AGENT_PORT = 8888  # the pod's agent port (the server's setting for it defaults to the same)
SERVER_PORT = 8000  # `sandlot serve --port`
SERVER_NAME = "sandlot-server"  # Deployment, Service, ServiceAccount, Role; and the label the sandboxes admit
SANDBOX_APP = "sandlot-sandbox"
DB_SECRET, DB_SECRET_KEY = "sandlot-db", "url"
RUNTIME_CLASS, RUNTIME_HANDLER = "gvisor", "runsc"
USER_UID = 1000
SERVER_REPLICAS = 2
AGENT_COMMAND = ["python3", "-I", "-S", "-B", "/opt/sandlot/_agent/pod.py"]

# What the server does with each resource (the kubernetes tier): claims are made, watched, deleted and
# patched (a sandbox's new shutdown time); templates and pools are only read. Nothing else, and no pods:
# the server reaches a sandbox through the claim's status (its pod's IP), never through the pod API.
SERVER_RULES = [
    {"apiGroups": [CRD_GROUP], "resources": ["sandboxclaims"],
     "verbs": ["get", "list", "watch", "create", "delete", "patch"]},
    {"apiGroups": [CRD_GROUP], "resources": ["sandboxtemplates", "sandboxwarmpools"],
     "verbs": ["get", "list", "watch"]},
    # A sandbox granted a network gets a NetworkPolicy of its own pod (egress only; kube_network.py).
    {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": ["create", "delete"]},
]

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DB_URL = re.compile(r"postgres(ql)?(\+\w+)?://\S+")


def check_namespace(namespace: str) -> str:
    if not isinstance(namespace, str) or len(namespace) > 63 or not _DNS_LABEL.fullmatch(namespace):
        raise InvalidRequest(f"bad namespace {namespace!r}: a Kubernetes namespace is a DNS label (lowercase letters, "
                             "digits and '-', starting and ending with a letter or digit, at most 63 characters)")
    return namespace


def object_name(template: str) -> str:
    """``sandlot-T``, the SandboxTemplate's and the SandboxWarmPool's name; the template name must fit in it."""
    name = f"sandlot-{template}"
    if len(name) > 63 or not _DNS_LABEL.fullmatch(name):
        raise InvalidRequest(f"template {template!r} cannot name Kubernetes objects: {name!r} must be a DNS label "
                             "(lowercase letters, digits and '-', at most 63 characters)")
    return name


def check_image(ref: str, what: str = "--image") -> str:
    from ._images import parse_ref

    try:
        return parse_ref(ref)["ref"]
    except InvalidRequest as exc:
        raise InvalidRequest(f"{what}: {exc}") from None


def quantity_memory(n: int) -> str:
    """Bytes as a Kubernetes quantity: ``1Gi``, ``512Mi``, or plain bytes when no binary unit divides them."""
    for unit, size in (("Ti", 1024**4), ("Gi", 1024**3), ("Mi", 1024**2), ("Ki", 1024)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def quantity_cpu(cores: float) -> str:
    millis = max(1, round(cores * 1000))
    return str(millis // 1000) if millis % 1000 == 0 else f"{millis}m"


def resources(limits: Limits) -> dict:
    """Requests equal to limits (the Guaranteed class): a sandbox gets what its limits promise, and a full node
    refuses a pod instead of squeezing the ones it runs. Under gVisor the sentry lives inside the pod's memory
    limit, as it lives inside the sandbox's cgroup on one machine. ``disk`` bounds the pod's ephemeral storage:
    home and /tmp (emptyDirs) together. Kubernetes has no per-pod pids or open-files limit to set here (the
    kubelet's podPidsLimit is the node's); the server enforces the call limits (timeouts, output) itself."""
    amounts = {"cpu": quantity_cpu(limits.cpu), "memory": quantity_memory(limits.memory),
               "ephemeral-storage": quantity_memory(limits.disk)}
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _meta(name: str, namespace: Optional[str], **labels: str) -> dict:
    meta: dict[str, Any] = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    meta["labels"] = {"app.kubernetes.io/part-of": "sandlot", **labels}
    return meta


def _restricted_container_security() -> dict:
    """The container half of the Pod Security Standards' "restricted" profile, and a read-only root."""
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}


def _pod_security() -> dict:
    return {"runAsNonRoot": True, "runAsUser": USER_UID, "runAsGroup": USER_UID, "fsGroup": USER_UID,
            "seccompProfile": {"type": "RuntimeDefault"}}


# -- the objects ---------------------------------------------------------------------------------------
def namespace_doc(namespace: str) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": _meta(namespace, None)}


def runtime_class_doc() -> dict:
    return {"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass",
            "metadata": _meta(RUNTIME_CLASS, None), "handler": RUNTIME_HANDLER}


def sandbox_template_doc(template: str, limits: Limits, image: str, namespace: str) -> dict:
    """The pod every sandbox of ``template`` runs in: gVisor, non-root, no token, read-only root, the agent
    listening on AGENT_PORT, reachable only from the server's pods and reaching nothing (egress: [] denies all)."""
    volume_size = quantity_memory(limits.disk)
    pod_spec = {
        "runtimeClassName": RUNTIME_CLASS,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "restartPolicy": "Never",
        "securityContext": _pod_security(),
        "containers": [{
            "name": "agent",
            "image": image,
            "command": list(AGENT_COMMAND),
            "args": ["--port", str(AGENT_PORT)],
            "ports": [{"containerPort": AGENT_PORT, "name": "agent"}],
            "readinessProbe": {"tcpSocket": {"port": AGENT_PORT}, "periodSeconds": 1},
            "securityContext": _restricted_container_security(),
            "resources": resources(limits),
            "volumeMounts": [{"name": "home", "mountPath": "/home/user"}, {"name": "tmp", "mountPath": "/tmp"}],
        }],
        "volumes": [{"name": "home", "emptyDir": {"sizeLimit": volume_size}},
                    {"name": "tmp", "emptyDir": {"sizeLimit": volume_size}}],
    }
    return {
        "apiVersion": f"{CRD_GROUP}/{CRD_VERSION}", "kind": "SandboxTemplate",
        "metadata": _meta(object_name(template), namespace, **{"sandlot.dev/template": template}),
        "spec": {
            "podTemplate": {"metadata": {"labels": {"app.kubernetes.io/name": SANDBOX_APP,
                                                    "sandlot.dev/template": template}},
                            "spec": pod_spec},
            "networkPolicyManagement": "Managed",
            "networkPolicy": {
                # The server's pods, on every TCP port: the holder's (AGENT_PORT) and the servers the sandbox's
                # code starts (get_url). A port without "port" is every port of its protocol.
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": SERVER_NAME}}}],
                             "ports": [{"protocol": "TCP"}]}],
                "egress": [],
            },
        },
    }


def warm_pool_doc(template: str, replicas: int, namespace: str) -> dict:
    name = object_name(template)
    return {"apiVersion": f"{CRD_GROUP}/{CRD_VERSION}", "kind": "SandboxWarmPool",
            "metadata": _meta(name, namespace, **{"sandlot.dev/template": template}),
            "spec": {"sandboxTemplateRef": {"name": name}, "replicas": replicas}}


def rbac_docs(namespace: str) -> list[dict]:
    labels = {"app.kubernetes.io/name": SERVER_NAME}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(SERVER_NAME, namespace, **labels)},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": _meta(SERVER_NAME, namespace, **labels), "rules": copy.deepcopy(SERVER_RULES)},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": _meta(SERVER_NAME, namespace, **labels),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": SERVER_NAME},
         "subjects": [{"kind": "ServiceAccount", "name": SERVER_NAME, "namespace": namespace}]},
    ]


def server_command() -> list[str]:
    return ["sandlot", "serve", "--isolations", "kubernetes", "--host", "0.0.0.0", "--port", str(SERVER_PORT)]


def deployment_doc(image: str, namespace: str, replicas: int = SERVER_REPLICAS) -> dict:
    """The server: several replicas sharing one PostgreSQL (the Secret's URL, read through SANDLOT_DB, the
    variable `sandlot serve --db` reads). Its own token is mounted (it talks to the API as sandlot-server);
    everything else is locked down as the sandboxes are, minus gVisor (it runs no tenant code)."""
    selector = {"app.kubernetes.io/name": SERVER_NAME}
    container = {
        "name": "server",
        "image": image,
        "command": server_command(),
        "env": [
            {"name": "SANDLOT_DB", "valueFrom": {"secretKeyRef": {"name": DB_SECRET, "key": DB_SECRET_KEY}}},
            {"name": "SANDLOT_DATA_DIR", "value": "/var/lib/sandlot"},
            # The claims go to the server's own namespace, where the templates and warm pools are.
            {"name": "SANDLOT_KUBE_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "HOME", "value": "/home/user"},
        ],
        "ports": [{"containerPort": SERVER_PORT, "name": "http"}],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10,
                          "failureThreshold": 6},
        "securityContext": _restricted_container_security(),
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "volumeMounts": [{"name": "data", "mountPath": "/var/lib/sandlot"}, {"name": "home", "mountPath": "/home/user"},
                         {"name": "tmp", "mountPath": "/tmp"}],
    }
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(SERVER_NAME, namespace, **selector),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": dict(selector)},
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/part-of": "sandlot", **selector}},
                "spec": {
                    "serviceAccountName": SERVER_NAME,
                    "automountServiceAccountToken": True,
                    "enableServiceLinks": False,
                    "securityContext": _pod_security(),
                    "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                                   "whenUnsatisfiable": "ScheduleAnyway",
                                                   "labelSelector": {"matchLabels": dict(selector)}}],
                    "containers": [container],
                    "volumes": [{"name": name, "emptyDir": {}} for name in ("data", "home", "tmp")],
                },
            },
        },
    }


def service_doc(namespace: str) -> dict:
    selector = {"app.kubernetes.io/name": SERVER_NAME}
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(SERVER_NAME, namespace, **selector),
            "spec": {"selector": dict(selector),
                     "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}}


def db_secret_doc(url: str, namespace: str) -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": _meta(DB_SECRET, namespace), "type": "Opaque",
            "stringData": {DB_SECRET_KEY: url}}


# -- all of it ---------------------------------------------------------------------------------------
def manifests(*, namespace: str, image: str, templates: Iterable[str] = ("python",), warm: Optional[int] = None,
              server_image: Optional[str] = None, db_url: Optional[str] = None,
              runtime_class: bool = True) -> list[dict]:
    """Every object, in the order `kubectl apply` can create them. InvalidRequest on a bad input."""
    from ._templates import get_template

    check_namespace(namespace)
    image = check_image(image)
    server_image = check_image(server_image, "--server-image") if server_image else image
    if warm is not None and not 0 <= warm <= 4096:
        raise InvalidRequest(f"--warm {warm}: a warm pool holds 0 to 4096 pods")
    if db_url is not None and not _DB_URL.fullmatch(db_url):
        raise InvalidRequest("--db: a PostgreSQL URL (postgresql://USER:PASSWORD@HOST:PORT/DB) is needed; the "
                             "server's replicas share it (SQLite is one machine's)")
    chosen: dict[str, tuple[str, Limits, int]] = {}
    for entry in list(templates) or ["python"]:
        name, _, own_image = entry.partition("=")
        template = get_template(name)  # InvalidRequest names the known ones
        object_name(name)
        if name in chosen:
            raise InvalidRequest(f"--template {name} is given twice")
        replicas = warm if warm is not None else (template.pool_size if template.pool_size is not None
                                                  else _config.pool_min())
        chosen[name] = (check_image(own_image, f"--template {name}=REF") if own_image else image,
                        Limits.build(template.default_limits()), replicas)
    docs = [namespace_doc(namespace)]
    if runtime_class:
        docs.append(runtime_class_doc())
    for name, (pod_image, limits, replicas) in chosen.items():
        docs.append(sandbox_template_doc(name, limits, pod_image, namespace))
        docs.append(warm_pool_doc(name, replicas, namespace))
    docs += rbac_docs(namespace)
    if db_url is not None:
        docs.append(db_secret_doc(db_url, namespace))
    docs += [deployment_doc(server_image, namespace), service_doc(namespace)]
    return docs


def header(namespace: str, *, runtime_class: bool, db_secret: bool) -> str:
    lines = [
        f"Sandlot on Kubernetes, namespace {namespace}: apply with `kubectl apply -f -`.",
        "Prerequisites (not created here):",
        "  - the agent-sandbox controller and its CRDs, extensions included (kubernetes-sigs/agent-sandbox):",
        f"    SandboxTemplate, SandboxWarmPool and SandboxClaim ({CRD_GROUP}/{CRD_VERSION});",
        f"  - gVisor's runsc on the nodes, known to the container runtime as the handler {RUNTIME_HANDLER!r}",
        (f"    (the RuntimeClass {RUNTIME_CLASS!r} below names it; where the cluster has its own, e.g. GKE Sandbox,"
         if runtime_class else f"    (left out: the cluster's own RuntimeClass {RUNTIME_CLASS!r} must exist, as on"),
        "    print with --no-runtime-class);" if runtime_class else "    GKE Sandbox);",
        "  - a network plugin that enforces NetworkPolicy: without one, nothing holds the sandboxes'",
        "    default-deny network (egress: none; ingress: the server's pods only, on TCP);",
    ]
    if db_secret:
        lines += ["  - PostgreSQL, reachable from the server's pods (its URL is in the Secret sandlot-db below:",
                  "    this output holds its password; keep it out of version control)."]
    else:
        lines += ["  - PostgreSQL for the server's replicas, its URL in the Secret sandlot-db (key url):",
                  f"      kubectl -n {namespace} create secret generic {DB_SECRET} "
                  f"--from-literal={DB_SECRET_KEY}=postgresql://USER:PASSWORD@HOST:5432/DB",
                  "    (or print it with --db URL)."]
    lines += [
        "The sandbox image runs Sandlot's agent (`sandlot kube image` builds it); the server's image needs Sandlot",
        "with its server and the kubernetes and postgres extras. The Service is plain HTTP inside the cluster:",
        "put a TLS-terminating ingress in front to serve beyond it.",
    ]
    return "".join(f"# {line}\n" if line else "#\n" for line in lines)


class _PlainDumper(yaml.SafeDumper):
    """Never anchors and aliases (&id001, *id001) for values used twice: a manifest reads as written."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render(docs: list[dict], head: str = "") -> str:
    """Multi-document YAML: ``---`` before each object (kubectl and yaml.safe_load_all read it)."""
    body = "".join("---\n" + yaml.dump(doc, Dumper=_PlainDumper, sort_keys=False, default_flow_style=False)
                   for doc in docs)
    return head + body
