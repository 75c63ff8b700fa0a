"""The remote SDK against a real server process on loopback: the same API as a local sandbox, sync and async."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import os
import subprocess
import sys
import time

import pytest

import sandlot
from sandlot import AsyncSandbox, InvalidRequest, Sandbox, SandboxNotFound

from .conftest import needs_sandbox
from .serverproc import ServerProcess
from .stories import files_api_story

pytestmark = needs_sandbox


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp("remote") / "sandlot.db").start()
    proc.api_key = proc.key("alice")
    proc.wait_warm(proc.api_key)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def remote(server):
    return {"api_url": server.url, "api_key": server.api_key}


@pytest.fixture
def rsb(remote):
    with Sandbox(**remote) as sb:
        yield sb


def test_remote_user_story(rsb):
    assert isinstance(rsb._async, sandlot.AsyncSandbox) and not rsb.dies_with_owner
    rsb.run_code("import pandas as pd; df = pd.DataFrame({'a': [1, 2, 3]})")
    assert rsb.run_code("df.a.sum()").text == "6"
    ex = rsb.run_code("import matplotlib.pyplot as plt; plt.plot([1, 2]); plt.show()")
    assert ex.error is None and base64.b64decode(ex.results[0].png).startswith(b"\x89PNG")
    ex = rsb.run_code("1/0")
    assert ex.error.name == "ZeroDivisionError" and "<cell-" in ex.error.traceback
    r = rsb.commands.run("echo hi; exit 3")
    assert (r.exit_code, r.stdout) == (3, "hi\n")
    rsb.files.write("/home/user/data.csv", b"a,b\n1,2\n")
    assert rsb.files.read("/home/user/data.csv") == "a,b\n1,2\n"
    ex = rsb.run_code("x = 41\nx += 1\nprint('out'); import sys; print('err', file=sys.stderr)\nx")
    assert ex.text == "42" and "".join(ex.logs.stdout) == "out\n" and "".join(ex.logs.stderr) == "err\n"
    assert ex.execution_count == 5 and ex.usage.wall_seconds > 0 and ex.usage.peak_memory > 0
    assert rsb.metrics().processes >= 2


def test_streaming_callbacks_arrive_while_code_runs(rsb):
    seen = []
    t0 = time.monotonic()
    ex = rsb.run_code("import time\nprint('a', flush=True)\ntime.sleep(1)\nprint('b')\ndisplay('shown')\n7",
                      on_stdout=lambda s: seen.append((s, time.monotonic() - t0)),
                      on_result=lambda r: seen.append((r.text, time.monotonic() - t0)))
    first = next(t for s, t in seen if s == "a\n")
    assert first < 0.9, "output must reach the client while the code runs, not at the end"
    assert [s for s, _ in seen] == ["a\n", "b\n", "'shown'", "7"]
    assert ex.text == "7" and "".join(ex.logs.stdout) == "a\nb\n"


def test_timeout_interrupts_and_session_survives(rsb):
    rsb.run_code("keep = 'me'")
    ex = rsb.run_code("while True: pass", timeout=1)
    assert ex.error.name == "TimeoutError" and ex.error.limit == "timeout"
    assert rsb.run_code("keep").text == "'me'"
    with pytest.raises(InvalidRequest):
        rsb.run_code("1", timeout=-1)


def test_commands_env_cwd_stdin_and_background(rsb):
    r = rsb.commands.run("echo $FOO; pwd; cat", env={"FOO": "bar"}, cwd="/tmp", stdin="piped")
    assert r.stdout == "bar\n/tmp\npiped" and r.exit_code == 0
    r = rsb.commands.run("od -An -tx1", stdin=b"\xff\x00")
    assert r.stdout.split() == ["ff", "00"]
    chunks = []
    r = rsb.commands.run("echo one; sleep 0.3; echo two >&2", on_stdout=chunks.append, on_stderr=chunks.append)
    assert chunks == ["one\n", "two\n"] and r.stderr == "two\n"
    live = []
    h = rsb.commands.run("for i in 1 2 3; do echo $i; sleep 0.2; done", background=True, on_stdout=live.append)
    assert isinstance(h, sandlot.CommandHandle) and h.pid is not None
    assert h.wait().stdout == "1\n2\n3\n" and live == ["1\n", "2\n", "3\n"] and h.stdout == "1\n2\n3\n"
    h = rsb.commands.run("cat", background=True)
    h.send_stdin("hello ")
    h.send_stdin(b"world", close=True)
    assert h.wait().stdout == "hello world"
    h = rsb.commands.run("sleep 60", background=True)
    t0 = time.monotonic()
    h.kill()
    assert h.wait().exit_code == -9 and time.monotonic() - t0 < 5
    r = rsb.commands.run("sleep 30", timeout=0.5)
    assert r.error and "timeout" in r.error and r.exit_code == -9


def test_files_of_several_megabytes_stream_both_ways(rsb):
    block = os.urandom(1024 * 1024)
    rsb.files.write("big.bin", (block for _ in range(6)))  # a generator: sent chunked, never whole in memory
    assert rsb.files.stat("big.bin").size == 6 * len(block)
    digest = rsb.commands.run("sha256sum big.bin").stdout.split()[0]
    assert digest == hashlib.sha256(block * 6).hexdigest()
    total = hashlib.sha256()
    for chunk in rsb.files.read("big.bin", format="stream"):
        total.update(chunk)
    assert total.hexdigest() == digest
    rsb.files.write("from_file.bin", io.BytesIO(block * 3))
    assert rsb.files.read("from_file.bin", format="bytes") == block * 3
    rsb.files.write("from_file.bin", b"tail", append=True)
    assert rsb.files.stat("from_file.bin").size == 3 * len(block) + 4


def test_files_api_mirrors_local(rsb):
    f = rsb.files
    files_api_story(f)
    f.write("empty", b"")
    assert f.read("empty", format="bytes") == b""


def test_connect_from_another_process_keeps_the_session(remote):
    sb = Sandbox(**remote, metadata={"test": "connect"})
    try:
        sb.run_code("counter = 41")
        env = dict(os.environ, SANDLOT_API_URL=remote["api_url"], SANDLOT_API_KEY=remote["api_key"])
        code = ("import sandlot, sys\n"
                "sb = sandlot.Sandbox.connect(sys.argv[1])\n"  # from the environment variables alone
                "print(sb.run_code('counter += 1; counter').text)\n")
        for expected in ("42", "43"):  # the other process exits each time; the sandbox lives on
            out = subprocess.run([sys.executable, "-c", code, sb.sandbox_id], capture_output=True, text=True,
                                 timeout=60, env=env)
            assert out.stdout.strip() == expected, out.stderr
        again = Sandbox.connect(sb.sandbox_id, **remote)
        assert again.run_code("counter").text == "43" and again.metadata == {"test": "connect"}
    finally:
        sb.kill()
    with pytest.raises(SandboxNotFound, match="killed"):
        Sandbox.connect(sb.sandbox_id, **remote)
    with pytest.raises(SandboxNotFound):
        Sandbox.connect("sb-000000000000", **remote)


def test_list_filters_by_metadata(remote):
    tag = os.urandom(4).hex()
    a = Sandbox(**remote, metadata={"run": tag, "role": "a"})
    b = Sandbox(**remote, metadata={"run": tag, "role": "b"})
    try:
        assert {i.sandbox_id for i in Sandbox.list({"run": tag}, **remote)} == {a.sandbox_id, b.sandbox_id}
        only_b = Sandbox.list({"run": tag, "role": "b"}, **remote)
        assert [i.sandbox_id for i in only_b] == [b.sandbox_id]
        info = only_b[0]
        assert info.status == "running" and info.metadata == {"run": tag, "role": "b"} and info.expires_at > info.created_at
        a.kill()
        assert [i.sandbox_id for i in Sandbox.list({"run": tag}, **remote)] == [b.sandbox_id]
        ended = Sandbox.list({"run": tag}, status="ended", **remote)
        assert [(i.sandbox_id, i.end_reason) for i in ended] == [(a.sandbox_id, "killed by its owner")]
    finally:
        a.kill()
        b.kill()


def test_kill_is_idempotent_and_final(remote):
    sb = Sandbox(**remote)
    assert sb.is_running
    sb.kill()
    sb.kill()
    assert not sb.is_running
    with pytest.raises(SandboxNotFound, match="killed by its owner"):
        sb.commands.run("true")
    with pytest.raises(SandboxNotFound):
        sb.files.write("x", "y")


def test_limits_validated_like_local(remote):
    with pytest.raises(InvalidRequest):
        Sandbox(**remote, limits={"memory": "lots"})
    with pytest.raises(InvalidRequest):
        Sandbox(**remote, limits={"bogus": 1})
    with pytest.raises(InvalidRequest, match="unknown template"):
        Sandbox(**remote, template="no-such-template")
    with Sandbox(**remote, limits={"memory": "256M", "cpu": 0.5}) as sb:
        assert sb.limits.memory == 256 * 1024**2 and sb.limits.cpu == 0.5


def test_lifetime_set_timeout_and_idle_reaping(remote):
    sb = Sandbox(**remote, timeout=1.5)
    sb.set_timeout(5)
    idle = Sandbox(**remote, limits={"idle_timeout": 1})
    time.sleep(2.5)
    assert sb.run_code("1").text == "1"
    with pytest.raises(SandboxNotFound, match="idle"):
        idle.run_code("1")
    [info] = [i for i in Sandbox.list(status="all", **remote) if i.sandbox_id == idle.sandbox_id]
    assert info.status == "ended" and "idle" in info.end_reason
    sb.kill()


def test_one_shot_is_stateless(remote):
    out = []
    ex = sandlot.run_code("secret = 42; print(6 * 7)", on_stdout=out.append, **remote)
    assert out == ["42\n"] and "".join(ex.logs.stdout) == "42\n"
    assert sandlot.run_code("secret", **remote).error.name == "NameError"


def test_environment_variables_select_the_server(server, monkeypatch):
    monkeypatch.setenv("SANDLOT_API_URL", server.url)
    monkeypatch.setenv("SANDLOT_API_KEY", server.api_key)
    with Sandbox() as sb:
        assert not sb.dies_with_owner  # it lives on the server
        assert sb.run_code("2 + 2").text == "4"
    monkeypatch.setenv("SANDLOT_API_KEY", "sl_wrong")
    with pytest.raises(sandlot.AuthError):
        Sandbox()
    with Sandbox(api_url="") as local:  # "" forces a local sandbox whatever the environment says
        assert local.dies_with_owner


async def test_async_remote_api(remote):
    async with AsyncSandbox(env={"GREETING": "hi"}, **remote) as sb:
        chunks = []

        async def on_stdout(text):  # async callbacks are awaited, as locally
            chunks.append(text)

        ex = await sb.run_code("import os; print(os.environ['GREETING']); 2 ** 10", on_stdout=on_stdout)
        assert ex.text == "1024" and chunks == ["hi\n"]
        assert (await sb.commands.run("echo $GREETING")).stdout == "hi\n"
        await sb.files.write("a.txt", "x")
        assert await sb.files.read("a.txt") == "x"
        h = await sb.commands.run("sleep 0.2; echo done", background=True)
        assert (await h.wait()).stdout == "done\n"
        again = await AsyncSandbox.connect(sb.sandbox_id, **remote)
        assert (await again.run_code("1 + 1")).text == "2"
    sbs = await asyncio.gather(*(AsyncSandbox.create(**remote) for _ in range(3)))
    try:
        t0 = time.monotonic()
        results = await asyncio.gather(*(s.run_code("import time; time.sleep(1); 1") for s in sbs))
        assert all(r.text == "1" for r in results) and time.monotonic() - t0 < 2.5
    finally:
        await asyncio.gather(*(s.kill() for s in sbs))


async def test_interrupt_remote_and_local(remote):
    """interrupt() stops the running cell with KeyboardInterrupt and keeps the session, on both faces."""
    for kwargs in (remote, {"api_url": ""}):
        async with AsyncSandbox(**kwargs) as sb:
            await sb.run_code("kept = 'yes'")
            running = asyncio.ensure_future(sb.run_code("import time\nwhile True: time.sleep(0.05)", timeout=30))
            await asyncio.sleep(1.0)
            t0 = time.monotonic()
            await sb.interrupt()
            ex = await asyncio.wait_for(running, 10)
            assert ex.error.name == "KeyboardInterrupt" and time.monotonic() - t0 < 5
            assert (await sb.run_code("kept")).text == "'yes'"
