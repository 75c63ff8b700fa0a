"""`sandlot kube manifests`: what an operator applies to a cluster. Every document is parsed back and checked for
what the kubernetes tier's safety rests on: sandboxes under gVisor, non-root, without a token or privileges, with a
default-deny network that admits only the server's pods (on TCP: the holder and get_url); a server Role that can
make claims and read templates, never exec into a pod or read a secret. The agent-sandbox objects are checked against the facts of
their CRDs (v1beta1) written below; where the real CRD files are at hand ($SANDLOT_AGENT_SANDBOX_CRDS, a directory
holding extensions.agents.x-k8s.io_*.yaml from kubernetes-sigs/agent-sandbox k8s/crds/), against their full
schemas too, pod specs included; the core objects against the official client's models (kubernetes_asyncio).
No cluster is needed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from sandlot.cli import main

IMAGE = "registry.example/team/sandlot-agent:1"
GROUP = "extensions.agents.x-k8s.io"
SERVER_LABEL = {"app.kubernetes.io/name": "sandlot-server"}
# What the kubernetes tier does with the API, and nothing more (KUBE-CONTRACT: claims made, watched, deleted,
# patched for a new shutdown time; templates and pools read).
NEEDED = {(GROUP, "sandboxclaims"): {"get", "list", "watch", "create", "delete", "patch"},
          (GROUP, "sandboxtemplates"): {"get", "list", "watch"},
          (GROUP, "sandboxwarmpools"): {"get", "list", "watch"},
          ("networking.k8s.io", "networkpolicies"): {"create", "delete"}}


def run(*args: str):
    return CliRunner().invoke(main, ["kube", "manifests", *args])


def documents(*args: str) -> list[dict]:
    result = run("--image", IMAGE, *args)
    assert result.exit_code == 0, result.output
    assert not re.search(r"[&*]id\d", result.stdout), "YAML anchors or aliases"
    docs = list(yaml.safe_load_all(result.stdout))
    assert all(isinstance(d, dict) for d in docs), "an empty or non-object document"
    return docs


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def pod_of_template(docs: list[dict], template: str = "python") -> dict:
    return one(docs, "SandboxTemplate", f"sandlot-{template}")["spec"]["podTemplate"]["spec"]


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """A data dir of its own, holding an image template `tools` with its own default limits and pool size."""
    monkeypatch.setenv("SANDLOT_DATA_DIR", str(tmp_path / "data"))
    (tmp_path / "data/templates").mkdir(parents=True)
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    record = {"name": "tools", "rootfs": str(rootfs), "python": "/usr/bin/python3", "pool_size": 3,
              "limits": {"cpu": 0.5, "memory": "2G", "disk": "3G"}}
    (tmp_path / "data/templates/tools.json").write_text(json.dumps(record))
    (tmp_path / "data/templates/my_tools.json").write_text(json.dumps(dict(record, name="my_tools")))
    return tmp_path / "data"


# -- the whole output ----------------------------------------------------------------------------------
def test_every_document_is_a_kubernetes_object_in_an_order_apply_can_create():
    docs = documents("--namespace", "team-a")
    kinds = [d["kind"] for d in docs]
    assert kinds == ["Namespace", "RuntimeClass", "SandboxTemplate", "SandboxWarmPool", "ServiceAccount", "Role",
                     "RoleBinding", "Deployment", "Service"]
    for doc in docs:
        assert doc["apiVersion"] and doc["metadata"]["name"]
        cluster_wide = doc["kind"] in ("Namespace", "RuntimeClass")
        assert ("namespace" in doc["metadata"]) is not cluster_wide, doc["kind"]
        if not cluster_wide:
            assert doc["metadata"]["namespace"] == "team-a"
    assert one(docs, "Namespace")["metadata"]["name"] == "team-a"
    assert one(docs, "RuntimeClass", "gvisor")["handler"] == "runsc"
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding", "Secret")]


def test_the_header_names_the_prerequisites():
    result = run("--image", IMAGE, "-n", "team-a")
    head = result.stdout.split("\n---\n")[0]
    assert all(line.startswith("#") for line in head.splitlines())
    for needed in ("agent-sandbox", "runsc", "NetworkPolicy", "kubectl -n team-a create secret generic sandlot-db"):
        assert needed in head


def test_the_runtime_class_can_be_left_to_the_cluster():
    docs = documents("--no-runtime-class")
    assert "RuntimeClass" not in [d["kind"] for d in docs]
    assert pod_of_template(docs)["runtimeClassName"] == "gvisor"


# -- the sandboxes' pods ---------------------------------------------------------------------------------
def test_sandbox_pods_run_under_gvisor_as_nobody_in_particular_with_nothing_to_escalate():
    pod = pod_of_template(documents())
    assert pod["runtimeClassName"] == "gvisor"
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    assert pod["restartPolicy"] == "Never"
    assert "serviceAccountName" not in pod and "hostNetwork" not in pod and "hostPID" not in pod
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == security["runAsGroup"] == security["fsGroup"] == 1000
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    [container] = pod["containers"]
    assert container["name"] == "agent" and container["image"] == IMAGE
    assert container["command"] == ["python3", "-I", "-S", "-B", "/opt/sandlot/_agent/pod.py"]
    assert container["args"] == ["--port", "8888"]
    assert container["ports"] == [{"containerPort": 8888, "name": "agent"}]
    assert container["readinessProbe"]["tcpSocket"] == {"port": 8888}
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert set(mounts) == {"/home/user", "/tmp"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert all(set(volumes[name]) == {"name", "emptyDir"} for name in mounts.values())  # no host paths


def test_the_sandbox_network_denies_everything_but_the_servers_pods_on_tcp():
    docs = documents()
    template = one(docs, "SandboxTemplate")["spec"]
    assert template["networkPolicyManagement"] == "Managed"
    policy = template["networkPolicy"]
    assert policy["egress"] == []  # present and empty: the controller denies all egress
    [rule] = policy["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": SERVER_LABEL}}]
    # Every TCP port (no "port": all of them): the holder's 8888 and the servers the code starts (get_url).
    assert rule["ports"] == [{"protocol": "TCP"}]
    # The selector admits the server's pods and not the sandboxes themselves.
    server_pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert SERVER_LABEL.items() <= server_pod_labels.items()
    sandbox_labels = template["podTemplate"]["metadata"]["labels"]
    assert sandbox_labels == {"app.kubernetes.io/name": "sandlot-sandbox", "sandlot.dev/template": "python"}
    assert not SERVER_LABEL.items() <= sandbox_labels.items()


def test_resources_come_from_the_templates_default_limits():
    pod = pod_of_template(documents())  # the builtin python: Limits() (1 core, 1 GiB, 512 MiB of disk)
    resources = pod["containers"][0]["resources"]
    assert resources["limits"] == {"cpu": "1", "memory": "1Gi", "ephemeral-storage": "512Mi"}
    assert resources["requests"] == resources["limits"]


def test_each_template_named_gets_its_own_template_and_pool(data_dir):
    docs = documents("--template", "python", "--template", "tools")
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "SandboxTemplate"] == ["sandlot-python",
                                                                                       "sandlot-tools"]
    tools = pod_of_template(docs, "tools")["containers"][0]["resources"]
    assert tools["limits"] == {"cpu": "500m", "memory": "2Gi", "ephemeral-storage": "3Gi"}
    pools = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "SandboxWarmPool"}
    assert pools["sandlot-tools"] == {"sandboxTemplateRef": {"name": "sandlot-tools"}, "replicas": 3}  # its pool_size
    assert pools["sandlot-python"]["replicas"] == 2  # SANDLOT_POOL_MIN's default
    assert one(docs, "SandboxTemplate", "sandlot-tools")["spec"]["podTemplate"]["metadata"]["labels"][
        "sandlot.dev/template"] == "tools"
    warm = documents("--template", "tools", "--warm", "7")
    assert one(warm, "SandboxWarmPool")["spec"]["replicas"] == 7


def test_a_template_may_run_its_own_image(data_dir):
    docs = documents("--template", "python", "--template", "tools=registry.example/team/tools-agent:2")
    assert pod_of_template(docs, "tools")["containers"][0]["image"] == "registry.example/team/tools-agent:2"
    assert pod_of_template(docs, "python")["containers"][0]["image"] == IMAGE


# -- the server --------------------------------------------------------------------------------------------
def test_the_role_grants_exactly_what_the_server_needs():
    docs = documents()
    role = one(docs, "Role", "sandlot-server")
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert set(rule) <= {"apiGroups", "resources", "verbs"}, "no resourceNames or nonResourceURLs"
        for listed in (rule["apiGroups"], rule["resources"], rule["verbs"]):
            assert "*" not in listed, f"a wildcard in {rule}"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    assert granted == NEEDED
    assert not any(resource.startswith("pods") or resource == "secrets" for _, resource in granted)
    binding = one(docs, "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "sandlot-server"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "sandlot-server", "namespace": "sandlot"}]
    assert one(docs, "ServiceAccount")["metadata"]["name"] == "sandlot-server"


def test_the_server_runs_replicas_of_sandlot_serve_on_the_shared_database():
    docs = documents()
    deployment = one(docs, "Deployment", "sandlot-server")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["selector"]["matchLabels"].items() <= \
        deployment["spec"]["template"]["metadata"]["labels"].items()
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "sandlot-server"
    assert pod["securityContext"]["runAsNonRoot"] is True
    [container] = pod["containers"]
    assert container["image"] == IMAGE  # --server-image defaults to --image
    command = container["command"]
    assert command[:2] == ["sandlot", "serve"]
    flags = dict(zip(command[2::2], command[3::2]))
    assert flags == {"--isolations": "kubernetes", "--host": "0.0.0.0", "--port": "8000"}
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}
    env = {e["name"]: e for e in container["env"]}
    assert env["SANDLOT_DB"]["valueFrom"] == {"secretKeyRef": {"name": "sandlot-db", "key": "url"}}
    [port] = container["ports"]
    assert port == {"containerPort": 8000, "name": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    # The only secret the server's pod sees is the one its Deployment names.
    secrets = [v for v in pod.get("volumes", []) if "secret" in v]
    assert not secrets
    service = one(docs, "Service", "sandlot-server")["spec"]
    assert service["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert service["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]


def test_the_serve_flags_in_the_deployment_are_flags_serve_has():
    from sandlot.cli.service import serve

    known = {opt for param in serve.params for opt in param.opts}
    command = one(documents(), "Deployment")["spec"]["template"]["spec"]["containers"][0]["command"]
    assert {arg for arg in command[2:] if arg.startswith("--")} <= known
    assert "SANDLOT_DB" in next(p for p in serve.params if p.name == "db_path").envvar


def test_a_server_image_and_a_database_url_given():
    docs = documents("--server-image", "registry.example/sandlot-server:1", "--db",
                     "postgresql://sandlot:pw@db.example:5432/sandlot")
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"] == \
        "registry.example/sandlot-server:1"
    assert pod_of_template(docs)["containers"][0]["image"] == IMAGE
    secret = one(docs, "Secret", "sandlot-db")
    assert secret["stringData"] == {"url": "postgresql://sandlot:pw@db.example:5432/sandlot"}
    kinds = [d["kind"] for d in docs]
    assert kinds.index("Secret") < kinds.index("Deployment")


# -- bad input --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--namespace", "Team_A"], "bad namespace 'Team_A'"),
    (["--namespace", "-a"], "bad namespace '-a'"),
    (["--namespace", "a" * 64], "bad namespace"),
    (["--template", "no-such-template"], "unknown template 'no-such-template'"),
    (["--warm", "-1"], "--warm -1"),
    (["--db", "/var/lib/sandlot/sandlot.db"], "PostgreSQL URL"),
    (["--server-image", "Not A Ref"], "--server-image"),
    (["--template", "python=Not A Ref"], "--template python=REF"),
    (["--template", "python", "--template", "python"], "given twice"),
])
def test_bad_input_is_a_usage_error_that_says_what_is_wrong(args, message):
    result = run("--image", IMAGE, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "apiVersion" not in result.stdout  # nothing half-printed to apply


def test_an_image_is_required_and_must_be_a_reference():
    assert run().exit_code == 2 and "--image" in run().output
    bad = run("--image", "UPPER/case image")
    assert bad.exit_code == 2 and "--image" in bad.output


def test_a_template_whose_name_cannot_name_kubernetes_objects_is_refused(data_dir):
    result = run("--image", IMAGE, "--template", "my_tools")
    assert result.exit_code == 2 and "DNS label" in result.output


# -- schemas -----------------------------------------------------------------------------------------------
# Facts of the agent-sandbox CRDs (v1beta1), written here from their schemas: the fields each spec may hold
# (anything else the API server would silently prune), the required ones, the enums.
CRD_FACTS = {
    "SandboxTemplate": {
        "fields": {"podTemplate", "networkPolicy", "networkPolicyManagement", "envVarsInjectionPolicy", "service",
                   "volumeClaimTemplates", "volumeClaimTemplatesPolicy"},
        "required": {"podTemplate"},
        "enums": {"networkPolicyManagement": {"Managed", "Unmanaged"}},
    },
    "SandboxWarmPool": {"fields": {"replicas", "sandboxTemplateRef", "updateStrategy"},
                        "required": {"sandboxTemplateRef"}, "enums": {}},
}


def test_agent_sandbox_objects_hold_only_fields_their_crds_know():
    docs = documents()
    for kind, facts in CRD_FACTS.items():
        doc = one(docs, kind)
        assert doc["apiVersion"] == f"{GROUP}/v1beta1"
        spec = doc["spec"]
        assert set(spec) <= facts["fields"], set(spec) - facts["fields"]
        assert facts["required"] <= set(spec)
        for field, allowed in facts["enums"].items():
            assert spec.get(field, next(iter(allowed))) in allowed
    template = one(docs, "SandboxTemplate")["spec"]
    assert set(template["podTemplate"]) <= {"metadata", "spec"} and set(template["podTemplate"]["metadata"]) <= {
        "labels", "annotations"}
    assert set(template["networkPolicy"]) <= {"ingress", "egress"}  # no podSelector/policyTypes: the controller's
    pool = one(docs, "SandboxWarmPool")["spec"]
    assert set(pool["sandboxTemplateRef"]) == {"name"}
    assert isinstance(pool["replicas"], int) and pool["replicas"] >= 0


def _crd_schemas() -> dict[str, dict]:
    where = os.environ.get("SANDLOT_AGENT_SANDBOX_CRDS")
    if not where:
        pytest.skip("SANDLOT_AGENT_SANDBOX_CRDS is not set (a directory with kubernetes-sigs/agent-sandbox's "
                    "k8s/crds/extensions.agents.x-k8s.io_*.yaml): the full CRD schemas are not checked")
    schemas = {}
    for path in sorted(Path(where).glob(f"{GROUP}_*.yaml")):
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            if version["name"] == "v1beta1":
                schemas[crd["spec"]["names"]["kind"]] = version["schema"]["openAPIV3Schema"]
    if not {"SandboxTemplate", "SandboxWarmPool"} <= set(schemas):
        pytest.fail(f"no v1beta1 SandboxTemplate and SandboxWarmPool CRDs in {where}")
    return schemas


def structural_errors(value, schema: dict, path: str = "") -> list[str]:
    """What the API server would reject or prune: wrong types, missing required fields, values outside an enum,
    and fields the schema does not declare (pruned silently: a setting that never takes effect)."""
    errors: list[str] = []
    if schema.get("x-kubernetes-int-or-string"):
        ok = isinstance(value, (int, str)) and not isinstance(value, bool)
        return [] if ok else [f"{path}: {value!r} is neither an integer nor a string"]
    kind = schema.get("type")
    checks = {"object": dict, "array": list, "string": str, "boolean": bool}
    if kind in checks and not isinstance(value, checks[kind]):
        return [f"{path}: expected {kind}, got {type(value).__name__}"]
    if kind == "integer" and (not isinstance(value, int) or isinstance(value, bool)):
        return [f"{path}: expected integer, got {value!r}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not in {schema['enum']}")
    if kind == "string" and "pattern" in schema and not re.search(schema["pattern"], value):
        errors.append(f"{path}: {value!r} does not match {schema['pattern']}")
    if kind == "integer" and "minimum" in schema and value < schema["minimum"]:
        errors.append(f"{path}: {value} < {schema['minimum']}")
    if kind == "object":
        for field in schema.get("required", []):
            if field not in value:
                errors.append(f"{path}: {field} is required")
        properties = schema.get("properties")
        for key, item in value.items():
            if properties is not None and key in properties:
                errors += structural_errors(item, properties[key], f"{path}.{key}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += structural_errors(item, schema["additionalProperties"], f"{path}.{key}")
            elif properties is not None and not schema.get("x-kubernetes-preserve-unknown-fields"):
                errors.append(f"{path}.{key}: not in the schema (the API server would prune it)")
    if kind == "array":
        for i, item in enumerate(value):
            errors += structural_errors(item, schema.get("items", {}), f"{path}[{i}]")
    return errors


def test_agent_sandbox_objects_validate_against_the_crds():
    schemas = _crd_schemas()
    docs = documents("--template", "python")
    for doc in docs:
        if doc["kind"] in schemas:
            assert structural_errors(doc, schemas[doc["kind"]], doc["kind"]) == []
    # The server's pod spec is a PodSpec too: the SandboxTemplate's schema carries the whole of one.
    pod_schema = schemas["SandboxTemplate"]["properties"]["spec"]["properties"]["podTemplate"]["properties"]["spec"]
    server_pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert structural_errors(server_pod, pod_schema, "Deployment.spec.template.spec") == []
    # The check has teeth: a misspelt field and a wrong type are found.
    broken = json.loads(json.dumps(one(docs, "SandboxTemplate")))
    broken["spec"]["podTemplate"]["spec"]["runtimeClass"] = "gvisor"
    broken["spec"]["podTemplate"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8888"
    found = structural_errors(broken, schemas["SandboxTemplate"], "SandboxTemplate")
    assert any("runtimeClass: not in the schema" in e for e in found) and any("containerPort" in e for e in found)


def model_errors(value, type_name: str, models, path: str = "") -> list[str]:
    """Field names and shapes of a core object against the official client's model classes: a key the model
    does not know is a field Kubernetes does not have."""
    if type_name.startswith("list["):
        if not isinstance(value, list):
            return [f"{path}: expected a list"]
        return [e for i, item in enumerate(value) for e in model_errors(item, type_name[5:-1], models, f"{path}[{i}]")]
    if type_name.startswith("dict("):
        return [] if isinstance(value, dict) else [f"{path}: expected a mapping"]
    if type_name in ("str", "int", "bool", "float", "object", "datetime"):
        simple = {"str": str, "int": int, "bool": bool, "float": (int, float)}.get(type_name)
        ok = simple is None or (isinstance(value, simple) and not (type_name == "int" and isinstance(value, bool)))
        return [] if ok else [f"{path}: expected {type_name}, got {value!r}"]
    model = getattr(models, type_name)
    if not isinstance(value, dict):
        return [f"{path}: expected an object ({type_name})"]
    by_key = {key: attr for attr, key in model.attribute_map.items()}
    errors = []
    for key, item in value.items():
        if key not in by_key:
            errors.append(f"{path}.{key}: {type_name} has no such field")
        else:
            errors += model_errors(item, model.openapi_types[by_key[key]], models, f"{path}.{key}")
    return errors


def test_core_objects_are_made_of_fields_kubernetes_has():
    models = pytest.importorskip("kubernetes_asyncio.client.models",
                                 reason="kubernetes_asyncio (the kubernetes extra) is not installed")
    kinds = {"Namespace": "V1Namespace", "RuntimeClass": "V1RuntimeClass", "ServiceAccount": "V1ServiceAccount",
             "Role": "V1Role", "RoleBinding": "V1RoleBinding", "Deployment": "V1Deployment", "Service": "V1Service",
             "Secret": "V1Secret"}
    docs = documents("--db", "postgresql://u:p@db/sandlot")
    for doc in docs:
        if doc["kind"] not in kinds:
            continue
        assert model_errors(doc, kinds[doc["kind"]], models, doc["kind"]) == []
        build_model(doc, kinds[doc["kind"]], models)  # the models' constructors check the required fields
    # The sandboxes' pod spec is a core PodSpec as well.
    assert model_errors(pod_of_template(docs), "V1PodSpec", models, "SandboxTemplate.podTemplate.spec") == []
    build_model(pod_of_template(docs), "V1PodSpec", models)
    # The checks have teeth: a misspelt field, and a container without its name.
    assert model_errors({"spec": {"replica": 2}}, "V1Deployment", models) == [
        ".spec.replica: V1DeploymentSpec has no such field"]
    with pytest.raises(ValueError, match="name"):
        build_model({"image": IMAGE}, "V1Container", models)


def build_model(value, type_name: str, models):
    """The client's model object for ``value`` (already checked by model_errors); its constructor raises
    ValueError for a required field left out."""
    if type_name.startswith("list["):
        return [build_model(item, type_name[5:-1], models) for item in value]
    if type_name.startswith("dict(") or not hasattr(models, type_name):
        return value
    model = getattr(models, type_name)
    by_key = {key: attr for attr, key in model.attribute_map.items()}
    return model(**{by_key[key]: build_model(item, model.openapi_types[by_key[key]], models)
                    for key, item in value.items()})


@pytest.mark.skipif(not os.environ.get("KUBECONFIG") or shutil.which("kubectl") is None,
                    reason="no cluster here (KUBECONFIG unset or kubectl missing): the API server's own dry run is "
                           "not run")
def test_a_real_api_server_accepts_every_object_in_a_dry_run():
    # In `default`, which exists: a dry run creates no namespace for the objects after it to land in.
    result = run("--image", IMAGE, "--namespace", "default")
    applied = subprocess.run(["kubectl", "apply", "--dry-run=server", "-f", "-"], input=result.stdout,
                             capture_output=True, text=True, timeout=120)
    assert applied.returncode == 0, applied.stderr
