"""sandbox.yaml `mounts:`: a template's default mounts, validated when the file is read, kept in its record, and
merged under the owner's (per target) by Engine.resolve; a real sandbox of such a template gets them."""

from __future__ import annotations

import dataclasses
import os

import pytest
from pydantic import ValidationError

import sandlot
from sandlot import InvalidRequest
from sandlot._engine import Engine
from sandlot._sandboxfile import SandboxFile
from sandlot._spec import SandboxSpec
from sandlot._storage.mounts import mounts_to_json
from sandlot._templates import from_record, python_template, register_transient, unregister_transient

from .conftest import needs_sandbox


def test_sandbox_yaml_mounts_are_validated_and_normalised():
    spec = SandboxFile(base="python:3.12-slim", mounts={"/data": "/srv/datasets", "/cache": "vol:pipcache"})
    assert spec.mounts == {"/cache": "vol:pipcache:rw", "/data": "/srv/datasets:ro"}
    for bad, says in (({"data": "/srv"}, "absolute"), ({"/data": "srv"}, "absolute path"),
                      ({"/etc": "/srv"}, "reserved"), ({"/a": "/x", "/a/b": "/y"}, "nest")):
        with pytest.raises(ValidationError, match=says):
            SandboxFile(base="python:3.12-slim", mounts=bad)
    record = {"name": "t", "rootfs": "/nonexistent", "mounts": spec.mounts}
    assert from_record(record).mounts == (("/cache", "vol:pipcache:rw"), ("/data", "/srv/datasets:ro"))
    assert from_record({"name": "t", "rootfs": "/x"}).mounts == ()


@pytest.fixture
def template_with_mounts(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "hello").write_text("from the template\n")
    template = dataclasses.replace(python_template(), name="with-mounts",
                                   mounts=(("/data", f"{shared}:ro"), ("/cache", "vol:tplcache:rw")))
    register_transient(template)
    yield template, shared
    unregister_transient(template.name)


def test_the_owners_mounts_override_the_templates_per_target(template_with_mounts, tmp_path):
    _, shared = template_with_mounts
    engine = Engine()
    resolved, _ = engine.resolve(SandboxSpec.build("with-mounts"))
    assert mounts_to_json(resolved.mounts) == {"/cache": "vol:tplcache:rw", "/data": f"{shared}:ro"}
    mine = tmp_path / "mine"
    mine.mkdir()
    resolved, _ = engine.resolve(SandboxSpec.build("with-mounts", mounts={"/data": f"{mine}:rw", "/extra": "vol:x"}))
    assert mounts_to_json(resolved.mounts) == {"/cache": "vol:tplcache:rw", "/data": f"{mine}:rw",
                                               "/extra": "vol:x:rw"}
    with pytest.raises(InvalidRequest, match="may not nest"):
        engine.resolve(SandboxSpec.build("with-mounts", mounts={"/data/sub": str(mine)}))


@needs_sandbox
def test_a_sandbox_of_the_template_gets_its_default_mounts(template_with_mounts, tmp_path, monkeypatch):
    monkeypatch.setenv("SANDLOT_DATA_DIR", str(tmp_path / "data"))
    sandlot.Volumes(api_url="").create("tplcache", size="16M")
    try:
        with sandlot.Sandbox("with-mounts", api_url="") as sb:
            assert sb.files.read("/data/hello") == "from the template\n"
            sb.files.write("/cache/note", "kept")
            assert sb.commands.run("touch /data/x").exit_code != 0  # the template asked read-only
        with sandlot.Sandbox("with-mounts", api_url="", mounts={"/cache": "vol:tplcache:ro"}) as sb:
            assert sb.files.read("/cache/note") == "kept"
            assert sb.commands.run("touch /cache/y").exit_code != 0  # the owner's :ro won over the template's rw
    finally:
        sandlot.Volumes(api_url="").delete("tplcache")
    assert not os.path.exists(tmp_path / "shared" / "x")
