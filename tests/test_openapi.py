"""The server's OpenAPI document is a contract a client generator can use: models named for what they are,
a typed ``limits`` object, the NDJSON events of every streaming endpoint, every error status on every route.
And the server keeps to it where a document cannot show it: the streamed ``end`` event carries the fields of the
plain answer, a download carries its Content-Length."""

from __future__ import annotations

import copy
import dataclasses
import json

import httpx
import pytest
from fastapi.testclient import TestClient

from sandlot._limits import Limits
from sandlot.server import create_app
from sandlot.server.schemas import with_event_components
from sandlot.server.settings import Settings

from .conftest import needs_sandbox
from .serverproc import ServerProcess

ERROR_STATUSES = {"400", "401", "403", "404", "410", "413", "422", "429"}
STREAMING = {("post", "/v1/sandboxes/{sandbox_id}/code"): ("Execution", {"stdout", "stderr", "result", "error",
                                                                          "ping", "end", "exception"}),
             ("post", "/v1/run"): ("Execution", {"stdout", "stderr", "result", "error", "ping", "end", "exception"}),
             ("post", "/v1/sandboxes/{sandbox_id}/commands"): (None, {"stdout", "stderr", "ping", "end", "exception"}),
             ("get", "/v1/sandboxes/{sandbox_id}/commands/{command_id}/stream"): (
                 None, {"stdout", "stderr", "ping", "end", "exception"})}


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    app = create_app(Settings(db_path=tmp_path_factory.mktemp("openapi") / "sandlot.db"))
    response = TestClient(app).get("/openapi.json")  # no lifespan: the document needs no sandbox
    assert response.status_code == 200
    return response.json()


def _operations(spec):
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            yield method, path, operation


def _resolve(spec, schema):
    while "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = spec["components"]["schemas"][name]
    return schema


def test_models_are_named_for_what_they_are(spec):
    names = set(spec["components"]["schemas"])
    assert not [n for n in names if n.endswith("Out") or n.startswith("Response_")], sorted(names)
    assert {"Sandbox", "Execution", "CommandResult", "BackgroundCommand", "RunningCommand", "FileEntry", "Volume",
            "ServerInfo", "Error", "Limits", "LimitOverrides"} <= names
    create = spec["paths"]["/v1/sandboxes"]["post"]["responses"]["201"]["content"]["application/json"]["schema"]
    assert create == {"$ref": "#/components/schemas/Sandbox"}
    # The JSON a client reads is the same as before the renaming.
    assert set(spec["components"]["schemas"]["Sandbox"]["properties"]) == {
        "sandbox_id", "template", "isolation", "status", "metadata", "limits", "created_at", "expires_at",
        "ended_at", "end_reason", "on_idle"}


def test_limits_are_a_typed_object_in_requests_and_answers(spec):
    schemas = spec["components"]["schemas"]
    names = {f.name for f in dataclasses.fields(Limits)}
    overrides = schemas["LimitOverrides"]
    assert set(overrides["properties"]) == names and overrides["additionalProperties"] is False
    for body in ("CreateSandbox", "RunOnce"):
        assert {"$ref": "#/components/schemas/LimitOverrides"} in schemas[body]["properties"]["limits"]["anyOf"]
    assert set(schemas["Limits"]["properties"]) == names
    assert schemas["Sandbox"]["properties"]["limits"] == {"$ref": "#/components/schemas/Limits"}
    for field in ("defaults", "ceilings"):
        assert schemas["ServerInfo"]["properties"][field]["$ref"] == "#/components/schemas/Limits"


def test_every_route_lists_every_error_status_with_the_error_body(spec):
    for method, path, operation in _operations(spec):
        if path == "/healthz":
            continue  # no key, no body, no sandbox: it only answers 200
        responses = operation["responses"]
        assert ERROR_STATUSES <= set(responses), (method, path, sorted(responses))
        for status in ERROR_STATUSES:
            assert responses[status]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/Error"}, (method, path, status)
            assert responses[status]["description"]


def test_streaming_endpoints_describe_their_ndjson_events(spec):
    for (method, path), (answer, kinds) in STREAMING.items():
        ok = spec["paths"][path][method]["responses"]["200"]
        events = [_resolve(spec, e) for e in ok["content"]["application/x-ndjson"]["schema"]["oneOf"]]
        by_kind = {event["properties"]["type"]["const"]: event for event in events}
        assert set(by_kind) == kinds, (path, sorted(by_kind))
        assert all(event["title"].endswith("Event") for event in events)
        assert by_kind["stdout"]["required"] == ["type", "text"]
        if answer is not None:  # the end event has every field of the plain JSON answer
            assert ok["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{answer}"}
            plain = set(spec["components"]["schemas"][answer]["properties"])
            assert plain <= set(by_kind["end"]["properties"]), (path, plain - set(by_kind["end"]["properties"]))
    events = spec["paths"]["/v1/sandboxes/{sandbox_id}/commands"]["post"]["responses"]["200"]["content"][
        "application/x-ndjson"]["schema"]["oneOf"]
    end = {e["properties"]["type"]["const"]: e for e in map(lambda e: _resolve(spec, e), events)}["end"]
    assert set(spec["components"]["schemas"]["CommandResult"]["properties"]) <= set(end["properties"])


def test_event_schemas_can_be_named_components(spec):
    """with_event_components (for app.openapi) gives each event kind a component the streams refer to."""
    document = with_event_components(copy.deepcopy(spec))
    schemas = document["components"]["schemas"]
    for (method, path), (_, kinds) in STREAMING.items():
        stream = document["paths"][path][method]["responses"]["200"]["content"]["application/x-ndjson"]["schema"]
        assert set(stream["discriminator"]["mapping"]) == kinds
        for ref in stream["oneOf"]:
            assert schemas[ref["$ref"].rsplit("/", 1)[-1]]["properties"]["type"]["const"] in kinds
    assert schemas["ResultEvent"]["properties"]["result"] == {"$ref": "#/components/schemas/Result"}
    test_every_reference_resolves(document)


def test_downloads_declare_their_length(spec):
    ok = spec["paths"]["/v1/sandboxes/{sandbox_id}/files"]["get"]["responses"]["200"]
    assert "application/octet-stream" in ok["content"]
    assert ok["headers"]["Content-Length"]["schema"]["type"] == "integer"


def test_every_reference_resolves(spec):
    text = json.dumps(spec)
    for ref in {part.split('"')[0] for part in text.split('"$ref": "')[1:]}:
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[-1] in spec["components"]["schemas"], ref


# -- what the server does ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp("openapi-live") / "sandlot.db").start()
    key = proc.key("alice")
    with httpx.Client(base_url=proc.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
        sid = c.post("/v1/sandboxes", json={"limits": {"memory": "512M", "cpu": 1}}).json()["sandbox_id"]
        yield c, f"/v1/sandboxes/{sid}"
        c.delete(f"/v1/sandboxes/{sid}")
    proc.stop()


def _stream(c, method, url, **kwargs) -> list[dict]:
    with c.stream(method, url, **kwargs) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        return [json.loads(line) for line in r.iter_lines() if line]


@needs_sandbox
def test_the_streamed_end_carries_the_plain_answers_fields(served):
    c, base = served
    code = "print('a'); import sys; print('b', file=sys.stderr); 6 * 7"
    plain = c.post(base + "/code", json={"code": code}).json()
    end = _stream(c, "POST", base + "/code", json={"code": code, "stream": True})[-1]
    assert end["type"] == "end" and set(plain) <= set(end)
    assert (end["text"], end["logs"], end["error"]) == ("42", {"stdout": ["a\n"], "stderr": ["b\n"]}, None)
    assert end["results"][0]["text"] == "42" and end["execution_count"] == plain["execution_count"] + 1
    failed = _stream(c, "POST", base + "/code", json={"code": "1/0", "stream": True})[-1]
    assert failed["error"]["name"] == "ZeroDivisionError"  # the error event's error, again in the end
    plain = c.post(base + "/commands", json={"cmd": "echo out; echo err >&2; exit 3"}).json()
    end = _stream(c, "POST", base + "/commands", json={"cmd": "echo out; echo err >&2; exit 3", "stream": True})[-1]
    assert set(plain) <= set(end) and (end["exit_code"], end["stdout"], end["stderr"]) == (3, "out\n", "err\n")
    started = c.post(base + "/commands", json={"cmd": "echo bg", "background": True}).json()
    end = _stream(c, "GET", base + f"/commands/{started['command_id']}/stream")[-1]
    assert set(plain) <= set(end) and (end["exit_code"], end["stdout"]) == (0, "bg\n")


@needs_sandbox
def test_a_download_carries_its_content_length(served):
    c, base = served
    data = bytes(range(256)) * 5000
    c.put(base + "/files", params={"path": "blob.bin"}, content=data)
    r = c.get(base + "/files", params={"path": "blob.bin"})
    assert r.status_code == 200 and r.headers["content-length"] == str(len(data)) and r.content == data
    c.post(base + "/commands", json={"cmd": "ln -s blob.bin link.bin; : > empty"})
    r = c.get(base + "/files", params={"path": "link.bin"})  # a link's own size is not its target's: chunked
    assert r.status_code == 200 and r.content == data
    r = c.get(base + "/files", params={"path": "empty"})
    assert r.headers["content-length"] == "0" and r.content == b""
    r = c.get(base + "/files", params={"path": "/proc/self/status"})  # reports size 0, has bytes: chunked
    assert r.status_code == 200 and b"Pid:" in r.content and "content-length" not in r.headers
    r = c.get(base + "/files", params={"path": "nope.bin"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "FileError"


def test_operation_ids_are_unique(spec):
    ids = [operation["operationId"] for _, _, operation in _operations(spec)]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
