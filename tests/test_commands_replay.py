"""The sandbox remembers its commands: output read again from an offset, an ended command's exit code and
output by pid, a reader that did not start the command (a new owner of the sandbox, as after a server
restart), and a flood that the sandbox keeps bounded."""

from __future__ import annotations

import asyncio
import time

import pytest

from sandlot import AsyncSandbox, InvalidRequest, SandboxNotFound
from sandlot._local import LocalCommands

from .conftest import needs_sandbox

pytestmark = [needs_sandbox, pytest.mark.usefixtures("tier")]


def _until(check, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def test_output_is_read_again_from_the_start_and_from_a_middle_offset(sandbox):
    h = sandbox.commands.run("printf 0123456789; printf oops >&2; cat; printf END", background=True)
    _until(lambda: h.stdout == "0123456789" and h.stderr == "oops")
    seen = []
    again = sandbox.commands.connect(h.pid, offset=0, on_stdout=seen.append)
    _until(lambda: again.stdout == "0123456789" and again.stderr == "oops")
    assert again.offsets == {"stdout": 0, "stderr": 0} and "".join(seen) == "0123456789"  # the replay too
    middle = sandbox.commands.connect(h.pid, offset={"stdout": 6, "stderr": 2})
    _until(lambda: middle.stdout == "6789" and middle.stderr == "ps")
    assert middle.offsets == {"stdout": 6, "stderr": 2}
    middle.send_stdin("more", close=True)  # a reader's controls reach the command
    results = [x.wait() for x in (h, again, middle)]
    assert [(r.exit_code, r.stdout) for r in results] == [
        (0, "0123456789moreEND"), (0, "0123456789moreEND"), (0, "6789moreEND")]
    assert "".join(seen) == "0123456789moreEND"
    # Ended: its exit code and its output by pid, from any offset (past the end: nothing, not an error)
    ended = sandbox.commands.connect(h.pid, offset=10)
    r = ended.wait()
    assert (r.exit_code, r.stdout, r.stderr) == (0, "moreEND", "")
    assert sandbox.commands.connect(h.pid, offset=10**9).wait().stdout == ""
    assert h.pid not in [c.pid for c in sandbox.commands.list()]
    with pytest.raises(InvalidRequest, match="offset"):
        sandbox.commands.connect(h.pid, offset=-1)
    with pytest.raises(SandboxNotFound, match="no background command with pid 999999"):
        sandbox.commands.connect(999999, offset=0)


async def test_a_new_owner_reaches_a_command_it_did_not_start(asandbox: AsyncSandbox):
    live = asandbox._live()
    h = await asandbox.commands.run("echo before; read line; echo got $line; sleep 0.2; exit 7",
                                    background=True, cwd="/tmp")
    while h.stdout != "before\n":
        await asyncio.sleep(0.02)
    # A new owner of the channel, as a server re-adopting the sandbox after a restart: the first owner's
    # requests are orphaned (its handle hears nothing more), and a fresh LocalCommands has no handles.
    await live.backend_sandbox.channel.send({"t": "owner", "id": 0})
    adopted = LocalCommands(live)
    [info] = [c for c in await adopted.list() if c.pid == h.pid]
    assert (info.cmd, info.cwd) == ("echo before; read line; echo got $line; sleep 0.2; exit 7", "/tmp")
    seen = []
    again = await adopted.connect(h.pid, on_stdout=seen.append)
    assert again.stdout == "before\n"  # what it printed before (offset=None: no replay to the callbacks)
    await again.send_stdin("hi\n")
    r = await again.wait()
    assert (r.exit_code, r.stdout, "".join(seen)) == (7, "before\ngot hi\n", "got hi\n")
    assert h.pid not in [c.pid for c in await adopted.list()]
    later = await LocalCommands(live).connect(h.pid, offset=0)  # ended, still remembered
    assert ((await later.wait()).exit_code, later.stdout) == (7, "before\ngot hi\n")
    assert (await asandbox.run_code("1 + 1")).text == "2"


async def test_a_flood_nobody_reads_stays_bounded_by_the_output_limit(tier):
    cap = 256 * 1024
    async with AsyncSandbox(limits={"output": cap}) as sb:
        live = sb._live()
        channel = live.backend_sandbox.channel
        total = 8 * 1024 * 1024
        rid, queue = channel.new_request()
        await channel.send({"t": "cmd", "id": rid, "cmd": f"head -c {total} /dev/zero | tr '\\0' x; echo; echo END",
                            "env": {}, "cwd": None, "stdin": False, "keep": cap})
        # A new owner at once, before the agent reads any output: nobody reads or caps the command, only the
        # agent keeps (some of) what it prints.
        await channel.send({"t": "owner", "id": 0})
        started, _ = await asyncio.wait_for(queue.get(), 30)
        pid = started["pid"]
        adopted = LocalCommands(live)
        deadline = time.monotonic() + 120
        while pid in [c.pid for c in await adopted.list()]:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        replay = await adopted.connect(pid, offset=0)
        r = await replay.wait()
        assert r.exit_code == 0 and r.stdout.endswith("x\nEND\n")
        kept = len(r.stdout)
        assert kept <= cap and kept > cap // 2, kept  # the newest bytes, at most the cap
        assert replay.offsets["stdout"] == total + len("\nEND\n") - kept  # where what it kept starts
        assert (await sb.run_code("2 + 2")).text == "4"


async def test_many_floods_together_keep_at_most_what_the_host_allows_in_all(tier):
    # The host asks the agent to keep at most max(output, memory / 8) of all commands together (the agent's
    # memory is the sandbox's); here the agent is asked for a small total directly, so a few floods pass it.
    cap, n, each, budget = 2 * 1024 * 1024, 8, 3 * 1024 * 1024, 6 * 1024 * 1024
    async with AsyncSandbox(limits={"output": cap}) as sb:
        live = sb._live()
        channel = live.backend_sandbox.channel
        for _ in range(n):
            rid, _queue = channel.new_request()
            await channel.send({"t": "cmd", "id": rid, "cmd": f"head -c {each} /dev/zero | tr '\\0' x; sleep 60",
                                "env": {}, "cwd": None, "stdin": False, "keep": cap, "kept_total": budget})
        await channel.send({"t": "owner", "id": 0})  # nobody reads them
        deadline = time.monotonic() + 120
        while True:
            listed = (await live._request({"t": "cmd_list"}))["commands"]
            if len(listed) == n and all(c["stdout"]["end"] == each for c in listed):
                break
            assert time.monotonic() < deadline, listed
            await asyncio.sleep(0.2)
        kept = [c["stdout"]["end"] - c["stdout"]["start"] for c in listed]
        assert max(kept) <= cap and sum(kept) <= budget, kept  # each within the output cap, all within the total
        assert sum(kept) > budget - cap, kept
        pid = listed[-1]["pid"]
        replay = await LocalCommands(live).connect(pid, offset=0)  # the newest bytes, and where they start
        assert replay.offsets["stdout"] + len(replay.stdout) == each and set(replay.stdout) <= {"x"}
        await replay.kill()
        assert (await replay.wait()).exit_code == -9
        assert (await sb.run_code("3 + 3")).text == "6"
