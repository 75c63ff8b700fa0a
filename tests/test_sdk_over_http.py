"""The SDK suite again, over the HTTP transport.

Every test of test_core.py about what a sandbox does runs a second time with ``SANDLOT_API_URL`` and
``SANDLOT_API_KEY`` set, as a user points the SDK at a server: the same ``Sandbox``/``AsyncSandbox`` calls,
now through ``HTTPTransport`` to the real app served by uvicorn in this process (real HTTP on loopback, so
NDJSON streams and callbacks arrive as they happen). The tests left out are about how a *local* sandbox
lives and dies with its owning process, which a server's sandbox by design does not.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import uvicorn

from sandlot.server import create_app
from sandlot.server.settings import Quotas, Settings
from sandlot.server.store import create_key

from . import test_core
from .conftest import needs_sandbox
from .serverproc import free_port

pytestmark = [needs_sandbox, pytest.mark.usefixtures("tier", "over_http"), pytest.mark.tiers("process")]

LOCAL_ONLY = {
    "test_sandboxes_die_with_their_owner": "a local sandbox ends with its process; a server's lives on",
    "test_direct_path_without_zygote": "about this process's engine booting without a zygote",
}


@pytest.fixture(scope="module")
def app_server(tmp_path_factory):
    """The Sandlot app under uvicorn in a thread of this process, on a free loopback port."""
    db = tmp_path_factory.mktemp("over-http") / "sandlot.db"
    settings = Settings(db_path=db, quotas=Quotas(max_live=64, requests_per_minute=100_000))
    key = create_key("suite", db)
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=free_port(), log_level="warning",
                            lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="sandlot-app", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{config.port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the in-process server did not come up")
        time.sleep(0.05)
    try:
        yield url, key
    finally:
        server.should_exit = True
        thread.join(60)


@pytest.fixture
def over_http(app_server, monkeypatch):
    url, key = app_server
    monkeypatch.setenv("SANDLOT_API_URL", url)
    monkeypatch.setenv("SANDLOT_API_KEY", key)


def _reuse(name: str):
    test = getattr(test_core, name)
    if name in LOCAL_ONLY:
        return pytest.mark.skip(reason=f"local-transport behaviour: {LOCAL_ONLY[name]}")(test)
    return test


for _name in [n for n in dir(test_core) if n.startswith("test_")]:
    globals()[_name] = _reuse(_name)


def test_the_suite_really_went_over_http(sandbox):
    """The fixture's sandbox is a server's (the environment picked the HTTP transport)."""
    assert not sandbox.dies_with_owner
    assert sandbox.run_code("1 + 1").text == "2"
