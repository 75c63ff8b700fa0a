"""A server process that did not start a background command still lists it and reattaches to it: the
sandbox's agent remembers its commands. This is the state a sandbox is in after a restart of the server
re-adopted it (a new owner of its channel, an empty command table); here the real app runs under uvicorn in
this process, and the new owner is made the way a re-adopting server makes one (the agent's "owner" frame)."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
import uvicorn

from sandlot import Sandbox
from sandlot.server import create_app
from sandlot.server.background import CommandTable
from sandlot.server.settings import Quotas, Settings
from sandlot.server.store import create_key

from .conftest import needs_sandbox
from .serverproc import free_port

pytestmark = needs_sandbox


@pytest.fixture(scope="module")
def app_server(tmp_path_factory):
    db = tmp_path_factory.mktemp("adopt") / "sandlot.db"
    app = create_app(Settings(db_path=db, quotas=Quotas(requests_per_minute=100_000)))
    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning", lifespan="on")
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
        assert time.monotonic() < deadline and thread.is_alive(), "the in-process server did not come up"
        time.sleep(0.05)
    try:
        yield app, url, create_key("adopter", db)
    finally:
        server.should_exit = True
        thread.join(60)


def _as_if_restarted(app, sandbox_id: str) -> None:
    """What a new server process has of a re-adopted sandbox: its channel, owned anew, and no command table."""
    live = app.state.sandlot.registry.live[sandbox_id]
    channel = live.local.backend_sandbox.channel
    loop = live.local._watchdog.get_loop()
    asyncio.run_coroutine_threadsafe(channel.send({"t": "owner", "id": 0}), loop).result(10)
    live.commands = CommandTable(live.commands.capacity)


def test_a_server_that_did_not_start_a_command_lists_it_and_reattaches(app_server):
    app, url, key = app_server
    with Sandbox(api_url=url, api_key=key) as sb:
        h = sb.commands.run("echo before; read line; echo got $line; exit 5", background=True, cwd="/tmp")
        deadline = time.monotonic() + 20
        while h.stdout != "before\n":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        _as_if_restarted(app, sb.sandbox_id)
        again = Sandbox.connect(sb.sandbox_id, api_url=url, api_key=key)
        [info] = again.commands.list()
        assert (info.pid, info.cmd, info.cwd) == (h.pid, "echo before; read line; echo got $line; exit 5", "/tmp")
        seen = []
        handle = again.commands.connect(h.pid, on_stdout=seen.append)
        assert handle.stdout == "before\n"
        handle.send_stdin("x\n")
        r = handle.wait()
        assert (r.exit_code, r.stdout, "".join(seen)) == (5, "before\ngot x\n", "got x\n")
        assert again.commands.list() == []
        assert again.commands.connect(h.pid, offset=7).wait().stdout == "got x\n"
        _as_if_restarted(app, sb.sandbox_id)  # ended before this "restart": still found by pid
        ended = again.commands.connect(h.pid)
        assert (ended.wait().exit_code, ended.stdout) == (5, "before\ngot x\n")
