"""SandboxSpec: one description of a sandbox, validated once, the same rules wherever a sandbox is created.

The local SDK, the remote SDK, the server's schema (and a real server) and sandbox.yaml must give the same
answer to the same bad environment, metadata or limit: one validator each, so the rules cannot drift.
"""

from __future__ import annotations

import dataclasses
import json

import httpx
import pytest
from pydantic import ValidationError

from sandlot import AsyncSandbox, InvalidRequest, Limits
from sandlot._limits import MAX_CREATE_INPUT
from sandlot._sandboxfile import SandboxFile
from sandlot._spec import SandboxSpec
from sandlot.server.schemas import CreateSandbox, RunCommand, RunOnce

from .conftest import needs_sandbox
from .test_import_graph import import_graph

NOWHERE = "http://127.0.0.1:9"  # the remote SDK must refuse before it sends anything: nothing listens here

BAD_ENVS = [
    {"A=B": "x"},
    {"": "x"},
    {"A": "x\0y"},
    {"A": "\ud800"},
    {f"V{i}": "x" for i in range(257)},
    {"A": 1},
]
BAD_METADATA = [
    {"": "x"},
    {"k" * 129: "x"},
    {"k": "v" * 1025},
    {f"k{i}": "v" for i in range(65)},
    {"k": "a\0b"},
    {"k": 1},
]
BAD_LIMITS = [{"memory": 512}, {"bogus": 1}, {"cpu": "lots"}, {"pids": 0}, {"disk": True}]


def _message(call) -> str:
    with pytest.raises(InvalidRequest) as info:
        call()
    return str(info.value)


# -- the spec itself -----------------------------------------------------------------------------------
def test_round_trip_through_json():
    spec = SandboxSpec.build("python", isolation="process", limits={"memory": "2G", "cpu": 0.5, "pids": None},
                             env={"GREETING": "hello", "EMPTY": ""}, metadata={"job": "7"}, timeout=90,
                             on_idle="pause")
    data = spec.to_json()
    assert data == {"template": "python", "isolation": "process", "timeout": 90.0,
                    "limits": {"cpu": 0.5, "memory": 2 * 1024**3}, "env": {"GREETING": "hello", "EMPTY": ""},
                    "metadata": {"job": "7"}, "on_idle": "pause"}
    assert SandboxSpec.from_json(data) == spec
    assert SandboxSpec.from_json(json.dumps(data)) == spec
    assert spec.limits.lifetime == 90.0 and spec.limits.memory == 2 * 1024**3 and spec.limits.pids == Limits().pids
    # A default spec is a small JSON object, and comes back the same.
    assert SandboxSpec.build().to_json() == {"template": "python"}
    assert SandboxSpec.from_json({}) == SandboxSpec.build()
    # A Limits given whole is asked whole: every field travels.
    whole = SandboxSpec.build(limits=Limits(cpu=2.0))
    assert set(whole.to_json()["limits"]) == {f.name for f in dataclasses.fields(Limits)}
    assert SandboxSpec.from_json(whole.to_json()) == whole


def test_spec_is_frozen():
    spec = SandboxSpec.build(env={"A": "1"}, metadata={"k": "v"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.template = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        spec.env["B"] = "2"  # type: ignore[index]
    with pytest.raises(TypeError):
        spec.metadata["k"] = "w"  # type: ignore[index]


def test_from_json_refuses_what_it_does_not_know():
    assert "unknown sandbox spec field" in _message(lambda: SandboxSpec.from_json({"volumes": "all"}))
    assert "network='open'" in _message(lambda: SandboxSpec.from_json({"network": "open"}))
    assert "JSON" in _message(lambda: SandboxSpec.from_json("{not json"))
    assert "JSON object" in _message(lambda: SandboxSpec.from_json("[1]"))
    assert "on_idle" in _message(lambda: SandboxSpec.from_json({"on_idle": "sleep"}))
    assert "template" in _message(lambda: SandboxSpec.from_json({"template": 7}))


def test_spec_imports_nothing_above_it():
    # The network policy and the secrets are pure data validators too (they import only _exceptions).
    assert import_graph()["sandlot._spec"] <= {"sandlot._limits", "sandlot._exceptions", "sandlot._net.policy",
                                               "sandlot._net.secrets", "sandlot._storage.mounts"}
    for module in ("sandlot._net.policy", "sandlot._net.secrets", "sandlot._storage.mounts"):
        assert import_graph()[module] <= {"sandlot._exceptions"}


# -- mounts: the request is validated with the spec, before anything of the host is touched -----------
def test_mounts_round_trip_with_their_modes_spelled_out():
    spec = SandboxSpec.build(mounts={"/data": "/srv/datasets", "/project": "/home/me/project:rw",
                                     "/cache": "vol:pipcache", "/ref": "vol:refdata:ro", "/home/user/in": "/srv/x/../in"})
    assert spec.to_json()["mounts"] == {"/cache": "vol:pipcache:rw", "/data": "/srv/datasets:ro",
                                        "/home/user/in": "/srv/in:ro", "/project": "/home/me/project:rw",
                                        "/ref": "vol:refdata:ro"}
    assert SandboxSpec.from_json(spec.to_json()) == spec
    kinds = {m.target: (m.kind, m.source, m.readonly) for m in spec.mounts}
    assert kinds["/data"] == ("dir", "/srv/datasets", True)  # a host directory is read-only unless asked
    assert kinds["/cache"] == ("volume", "pipcache", False)  # a volume is writable unless asked
    assert SandboxSpec.build().mounts == () and "mounts" not in SandboxSpec.build().to_json()


@pytest.mark.parametrize("mounts, words", [
    ({"data": "/srv"}, "absolute, normalised"), ({"/data/": "/srv"}, "absolute, normalised"),
    ({"/a/../etc": "/srv"}, "absolute, normalised"), ({"/": "/srv"}, "reserved"), ({"/usr/local": "/srv"}, "reserved"),
    ({"/proc": "/srv"}, "reserved"), ({"/home/user": "/srv"}, "reserved"), ({"/tmp": "/srv"}, "reserved"),
    ({"/opt/sandlot/x": "/srv"}, "reserved"), ({"/etc/x": "/srv"}, "reserved"), ({"/a:b": "/srv"}, "':'"),
    ({"/data": "srv/x"}, "absolute path"), ({"/data": "./x"}, "absolute path"), ({"/data": ""}, "source"),
    ({"/data": "vol:Bad Name"}, "volume name"), ({"/data": "vol:"}, "volume name"), ({"/data": 7}, "source"),
    ({"/a": "/x", "/a/b": "/y"}, "may not nest"), ({"/a": "vol:v", "/b": "vol:v:ro"}, "once per sandbox"),
    ({f"/m{i}": "/srv" for i in range(17)}, "at most 16"), (["/data"], "must map"),
])
def test_a_bad_mount_is_refused_with_what_is_wrong(mounts, words):
    assert words in _message(lambda: SandboxSpec.build(mounts=mounts))
    # the same words from the SDK's constructor, before anything starts, locally and remotely
    assert words in _message(lambda: AsyncSandbox(mounts=mounts))
    assert words in _message(lambda: AsyncSandbox(mounts=mounts, api_url=NOWHERE))


# -- one validator: the same error wherever a sandbox is created ---------------------------------------
@pytest.mark.parametrize("env", BAD_ENVS, ids=["equals", "empty", "nul", "surrogate", "too-many", "not-str"])
def test_a_bad_env_gets_the_same_error_everywhere(env):
    expected = _message(lambda: SandboxSpec.build(env=env))
    assert _message(lambda: AsyncSandbox(env=env, api_url="")) == expected
    assert _message(lambda: AsyncSandbox(env=env, api_url=NOWHERE, api_key="sl_x")) == expected
    str_env = all(isinstance(v, str) for v in env.values())
    # The schema's own type checks answer first for a non-string or a lone surrogate (any string field).
    same_words = str_env and not any("\ud800" in v for v in env.values())
    for schema, body in ((CreateSandbox, {"env": env}), (RunOnce, {"code": "1", "env": env}),
                         (RunCommand, {"cmd": "true", "env": env})):
        with pytest.raises(ValidationError) as info:
            schema.model_validate(body)
        if same_words:
            assert expected in str(info.value), (schema, str(info.value))
    if str_env:
        with pytest.raises(ValidationError) as info:
            SandboxFile.model_validate({"base": "python", "env": env})
        assert expected in str(info.value)


@pytest.mark.parametrize("metadata", BAD_METADATA, ids=["empty-key", "long-key", "long-value", "too-many", "nul",
                                                         "not-str"])
def test_metadata_rules_are_the_same_everywhere(metadata):
    expected = _message(lambda: SandboxSpec.build(metadata=metadata))
    assert _message(lambda: AsyncSandbox(metadata=metadata, api_url="")) == expected
    assert _message(lambda: AsyncSandbox(metadata=metadata, api_url=NOWHERE, api_key="sl_x")) == expected
    with pytest.raises(ValidationError) as info:
        CreateSandbox.model_validate({"metadata": metadata})
    if all(isinstance(v, str) for v in metadata.values()):
        assert expected in str(info.value)


def test_good_metadata_and_env_pass_everywhere():
    env, metadata = {"PATH_EXTRA": "/opt/x", "A-B.c": "dashes are fine in a process env"}, {"k" * 128: "v" * 1024}
    spec = SandboxSpec.build(env=env, metadata=metadata)
    assert dict(spec.env) == env and dict(spec.metadata) == metadata
    CreateSandbox.model_validate({"env": env, "metadata": metadata})
    assert AsyncSandbox(env=env, metadata=metadata, api_url="").metadata == metadata


@pytest.mark.parametrize("limits", BAD_LIMITS, ids=["memory-bytes", "unknown", "not-a-number", "pids-0", "bool"])
def test_a_bad_limit_gets_the_same_error_locally_and_remotely(limits):
    expected = _message(lambda: SandboxSpec.build(limits=limits))
    assert expected == _message(lambda: Limits.build(limits))  # one limit validator
    assert _message(lambda: AsyncSandbox(limits=limits, api_url="")) == expected
    assert _message(lambda: AsyncSandbox(limits=limits, api_url=NOWHERE, api_key="sl_x")) == expected
    with pytest.raises(ValidationError) as info:
        SandboxFile.model_validate({"base": "python", "limits": limits})
    assert expected in str(info.value)


def test_oversize_input_is_refused_before_anything_starts():
    big = {"V": "x" * (MAX_CREATE_INPUT - 64), "W": "y" * 100}
    expected = _message(lambda: SandboxSpec.build(env=big))
    assert expected.startswith("create input too large")
    # Env and metadata each within their own rules, too big together: counted together.
    env, metadata = {"V": "x" * 100_000}, {f"m{i}": "y" * 1000 for i in range(40)}
    together = _message(lambda: SandboxSpec.build(env=env, metadata=metadata))
    assert together.startswith("create input too large")
    assert _message(lambda: AsyncSandbox(env=env, metadata=metadata, api_url="")) == together
    assert _message(lambda: AsyncSandbox(env=big, api_url="")) == expected
    assert _message(lambda: AsyncSandbox(env=big, api_url=NOWHERE, api_key="sl_x")) == expected
    with pytest.raises(ValidationError) as info:
        CreateSandbox.model_validate({"env": big})
    assert expected in str(info.value)
    # Just under the bound is fine.
    SandboxSpec.build(env={"V": "x" * (MAX_CREATE_INPUT - 1024)})


# -- and through a real server ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from .serverproc import ServerProcess

    proc = ServerProcess(tmp_path_factory.mktemp("spec-server") / "sandlot.db").start()
    proc.api_key = proc.key("spec")
    yield proc
    proc.stop()


@needs_sandbox
def test_a_real_server_gives_the_sdks_messages(server):
    headers = {"Authorization": f"Bearer {server.api_key}"}
    for env in ({"A=B": "x"}, {"": "x"}, {f"V{i}": "x" for i in range(257)}):
        r = httpx.post(server.url + "/v1/sandboxes", json={"env": env}, headers=headers, timeout=60)
        assert r.status_code == 422 and _message(lambda: SandboxSpec.build(env=env)) in r.json()["error"]["message"]
    for limits in ({"memory": 512}, {"bogus": 1}):
        r = httpx.post(server.url + "/v1/sandboxes", json={"limits": limits}, headers=headers, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["message"] == _message(lambda: Limits.build(limits))
    metadata = {f"k{i}": "v" for i in range(65)}
    r = httpx.post(server.url + "/v1/sandboxes", json={"metadata": metadata}, headers=headers, timeout=60)
    assert r.status_code == 422 and _message(lambda: SandboxSpec.build(metadata=metadata)) in r.text
    # A name a process environment can hold but the old server pattern refused: now one rule everywhere.
    from sandlot import Sandbox

    spec_env = {"A-B.c": "ok"}
    with Sandbox(env=spec_env, metadata={"via": "spec"}, limits={"memory": "256M"}, timeout=120,
                 api_url=server.url, api_key=server.api_key) as sb:
        assert sb.run_code("import os; os.environ['A-B.c']").text == "'ok'"
        assert sb.metadata == {"via": "spec"} and sb.limits.memory == 256 * 1024**2 and sb.limits.lifetime == 120


# -- the CLI and MCP create through the spec ------------------------------------------------------------
@pytest.mark.parametrize("flags, bad", [(("--limit", "memory=512"), {"limits": {"memory": 512}}),
                                        (("--limit", "bogus=1"), {"limits": {"bogus": 1}})])
def test_the_cli_refuses_a_bad_create_with_the_spec_message(flags, bad):
    from .test_cli import sandlot

    r = sandlot("run", *flags, "print(1)")
    assert r.returncode == 2, r.stderr
    assert _message(lambda: SandboxSpec.build(**bad)) in r.stderr


def test_mcp_provider_holds_a_validated_spec():
    from sandlot.mcp_server import LocalSandboxes

    assert LocalSandboxes("python").spec == SandboxSpec.build("python")
    assert "template" in _message(lambda: LocalSandboxes(""))
