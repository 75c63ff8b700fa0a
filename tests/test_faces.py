"""The synchronous face cannot drift from the async one, and configuration is read in one place.

The sync ``Sandbox`` forwards every call to ``AsyncSandbox`` (no second implementation); these tests
check, from the classes themselves, that each public method and property of an async class has its sync
twin taking the same parameters, so a method added to one face and not the other fails here. The same for
the environment: every ``SANDLOT_*`` variable is read through sandlot/_config.py and listed in the README.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import sandlot
from sandlot import _config
from sandlot._sandbox import AsyncCommands, AsyncFiles
from sandlot._sync import Commands, Files
from sandlot._transport import AsyncCommandHandle

PACKAGE = Path(sandlot.__file__).resolve().parent
README = PACKAGE.parent / "README.md"

FACES = [(sandlot.AsyncSandbox, sandlot.Sandbox), (AsyncCommands, Commands), (AsyncFiles, Files),
         (AsyncCommandHandle, sandlot.CommandHandle), (sandlot.AsyncVolumes, sandlot.Volumes)]


def _public(cls: type) -> dict[str, object]:
    return {name: member for name, member in inspect.getmembers(cls) if not name.startswith("_")}


def _parameters(function) -> list[tuple[str, object, object]]:
    """Names, kinds and defaults after self/cls (the sync face may take **kwargs for a keyword-only tail)."""
    params = list(inspect.signature(function).parameters.values())
    if params and params[0].name in ("self", "cls"):
        params = params[1:]
    return [(p.name, p.kind, p.default) for p in params]


@pytest.mark.parametrize("async_cls,sync_cls", FACES, ids=[a.__name__ for a, _ in FACES])
def test_every_async_member_has_its_sync_twin(async_cls, sync_cls):
    missing = sorted(set(_public(async_cls)) - set(_public(sync_cls)))
    assert not missing, f"{sync_cls.__name__} lacks {missing}"
    extra = sorted(set(_public(sync_cls)) - set(_public(async_cls)))
    assert not extra, f"{sync_cls.__name__} has {extra}, which {async_cls.__name__} does not"


@pytest.mark.parametrize("async_cls,sync_cls", FACES, ids=[a.__name__ for a, _ in FACES])
def test_twins_take_the_same_parameters(async_cls, sync_cls):
    for name, member in _public(async_cls).items():
        twin = getattr(sync_cls, name)
        if isinstance(member, property):
            assert isinstance(twin, property), f"{sync_cls.__name__}.{name} should be a property"
            continue
        if not callable(member):
            continue
        mine, theirs = _parameters(member), _parameters(twin)
        if theirs and theirs[-1][1] is inspect.Parameter.VAR_KEYWORD:
            # A forwarding tail (``**kwargs``): the positional head must still agree.
            head = [p for p in theirs if p[1] is not inspect.Parameter.VAR_KEYWORD]
            assert mine[:len(head)] == head, f"{sync_cls.__name__}.{name}{theirs} vs {mine}"
        else:
            assert theirs == mine, f"{sync_cls.__name__}.{name}: {theirs} != {async_cls.__name__}.{name}: {mine}"


def test_the_sync_face_reports_what_the_async_one_does_before_a_sandbox_runs():
    # Attributes of the sandbox as asked: the same on both faces without starting anything.
    asb = sandlot.AsyncSandbox(limits={"memory": "300M"}, metadata={"k": "v"}, env={"A": "1"}, api_url="")
    assert asb.limits.memory == 300 * 1024 * 1024 and asb.metadata == {"k": "v"} and asb.env == {"A": "1"}
    assert not asb.is_running and not asb.is_paused and asb.end_reason is None and asb.on_idle == "kill"
    with pytest.raises(sandlot.SandboxNotFound, match="has not been started"):
        asb.sandbox_id


# -- configuration ---------------------------------------------------------------------------------
def _sources() -> list[Path]:
    # The agent runs inside sandboxes, which see no SANDLOT_* of the host.
    return [p for p in PACKAGE.rglob("*.py") if "_agent" not in p.parts]


def test_only_config_reads_sandlot_variables_from_the_environment():
    reading = re.compile(r"(os\.environ(\.get)?|os\.getenv)\s*[\[(]\s*[\"']SANDLOT_")
    offenders = [str(p.relative_to(PACKAGE)) for p in _sources()
                 if p.name != "_config.py" and reading.search(p.read_text())]
    assert offenders == [], f"read SANDLOT_* through sandlot._config instead: {offenders}"


def test_every_variable_named_in_the_code_is_listed_and_documented():
    named = set()
    for path in _sources():
        named |= set(re.findall(r"SANDLOT_[A-Z][A-Z_]*[A-Z](?![A-Za-z0-9_])", path.read_text()))
    unlisted = sorted(named - _config.NAMES)
    assert unlisted == [], f"add to _config.VARIABLES: {unlisted}"
    readme = README.read_text()
    undocumented = sorted(name for name in _config.NAMES if f"`{name}`" not in readme)
    assert undocumented == [], f"the README's Configuration table lacks {undocumented}"


def test_reading_an_unlisted_variable_is_a_bug_not_a_silent_none():
    with pytest.raises(KeyError, match="not a listed Sandlot variable"):
        _config.get("SANDLOT_NOT_A_THING")


def test_the_database_lives_in_the_data_directory_unless_told(monkeypatch, tmp_path):
    monkeypatch.delenv("SANDLOT_DB", raising=False)
    monkeypatch.setenv("SANDLOT_DATA_DIR", str(tmp_path))
    from sandlot.server.store import default_db_path

    assert default_db_path() == tmp_path / "sandlot.db"
    monkeypatch.setenv("SANDLOT_DB", str(tmp_path / "other.db"))
    assert default_db_path() == tmp_path / "other.db"


def test_a_bad_pool_size_in_the_environment_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("SANDLOT_POOL_MIN", "lots")
    with pytest.raises(sandlot.InvalidRequest, match="SANDLOT_POOL_MIN must be a whole number"):
        _config.pool_min()


def test_run_code_shows_its_real_parameters():
    """IDEs and help() show what run_code takes (no **kwargs hiding it), the same on both faces."""
    for sync, async_ in ((sandlot.run_code, sandlot.async_run_code), (sandlot.Sandbox.run_code, sandlot.AsyncSandbox.run_code)):
        params = _parameters(sync)
        assert all(kind != inspect.Parameter.VAR_KEYWORD for _, kind, _ in params), sync
        assert params == _parameters(async_)
    assert "timeout" in {name for name, _, _ in _parameters(sandlot.run_code)}
