"""A Sandlot pod's holder (sandlot/_agent/pod.py), as the kubernetes tier reaches it over the pod network.

The pod runs where a kubelet would run it: in a real sandbox (process tier here; gVisor in a cluster), its port
reached through the sandbox's port forwarder, as a server reaches a pod's IP. No cluster is needed for this part.
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse

import pytest

import sandlot
from sandlot._agent import protocol
from sandlot._backends import kubernetes as kube
from sandlot._backends._common import sandbox_config, sandbox_env, template_config
from sandlot._engine import default_engine
from sandlot._limits import Limits
from sandlot._local import LocalSandbox
from sandlot._spec import SandboxSpec
from sandlot._templates import get_template

from .conftest import needs_sandbox

pytestmark = [needs_sandbox]

KEY = "k" * 43


class Pod:
    """A pod: the holder running in a sandbox of its own, its port forwarded to 127.0.0.1."""

    def __init__(self, host: sandlot.AsyncSandbox, port: int) -> None:
        self.host, self.port = host, port

    @classmethod
    async def start(cls) -> "Pod":
        host = await sandlot.AsyncSandbox.create()
        await host.commands.run("python3 -I -S -B /opt/sandlot/_agent/pod.py --port 8888 2>/tmp/pod.log",
                                background=True)
        url = await host.get_url(8888)
        pod = cls(host, urllib.parse.urlsplit(url).port)
        # (The forwarder accepts at once, whether anything listens inside or not: the holder's log says when.)
        await pod.wait_listening()
        return pod

    async def wait_listening(self) -> None:
        deadline = time.monotonic() + 20
        while "listening" not in await self.log():
            assert time.monotonic() < deadline, "the pod never listened"
            await asyncio.sleep(0.05)

    async def log(self) -> str:
        r = await self.host.commands.run("cat /tmp/pod.log")
        return r.stdout

    async def holder_running(self) -> bool:
        # Anchored: the shell that runs pgrep has the pattern in its own command line too.
        r = await self.host.commands.run("pgrep -f '^python3 -I -S -B /opt/sandlot/_agent/pod.py'")
        return r.exit_code == 0

    async def connect(self, key: str = KEY, bind: bool = False):
        return await kube.connect_pod("127.0.0.1", self.port, key, bind=bind)

    async def owner(self, sock, key: str = KEY) -> LocalSandbox:
        """The sandbox behind a connection that said welcome, as a server holds it."""
        proc = kube.KubernetesSandbox("sb-0000000000aa", "python", Limits(), None, "127.0.0.1", self.port, key, sock)
        proc.on_cleanup = lambda task: None
        await proc.channel.open()
        return LocalSandbox(SandboxSpec.build("python", isolation="kubernetes"), default_engine().backend("kubernetes"),
                            proc)

    async def boot(self, key: str = KEY) -> LocalSandbox:
        """What the kubernetes backend does after a claim is ready: bind, send the plan, wait for ready."""
        sock, welcome = await self.connect(key, bind=True)
        assert welcome["bound"] == "now"
        sandbox = await self.owner(sock, key)
        template, limits = get_template("python"), Limits()
        config = dict(template_config(template, {}), **sandbox_config(limits, sandbox_env(template, {})))
        config.update(prefixes=["/"], agent_dir=kube.POD_AGENT_DIR, preload=[])
        await sandbox._proc.channel.send({"t": "config", "config": config})
        await asyncio.wait_for(kube._expect_ready(sandbox._proc), 60)
        return sandbox

    async def close(self) -> None:
        await self.host.kill()


@pytest.fixture
async def pod():
    p = await Pod.start()
    yield p
    await p.close()


async def test_the_first_hello_binds_the_pod_and_code_runs_as_the_user_with_the_sandboxs_fences(pod):
    sandbox = await pod.boot()
    execution = await sandbox.run_code(
        "import os\n"
        "print(os.getuid(), open('/proc/self/status').read().split('Seccomp:')[1].split()[0])\n"
        "6 * 7")
    assert execution.error is None, execution.error
    uid, seccomp_mode = execution.logs.stdout[0].split()
    assert uid == "1000"
    assert seccomp_mode == "2"  # the agent's own filter on top of the pod's
    assert execution.results[0].text == "42"
    r = await sandbox.commands.run("echo $HOME; id -u")
    assert r.stdout.split() == ["/home/user", "1000"]


async def test_another_key_is_refused_and_the_owners_key_takes_over_the_channel(pod):
    sandbox = await pod.boot()
    await sandbox.run_code("x = 5")
    with pytest.raises(kube.PodRefused, match="refused"):
        await pod.connect("x" * 43)
    assert (await sandbox.run_code("x + 1")).results[0].text == "6"  # the owner's channel was not disturbed
    # The same key again (a restarted server, another replica): it becomes the owner, the session lives on.
    sock, welcome = await pod.connect()
    assert welcome["bound"] == "before"
    taken = await pod.owner(sock)
    assert (await taken.run_code("x * 10")).results[0].text == "50"
    # The earlier owner was let go, told why: it forgets the sandbox instead of ending it.
    deadline = time.monotonic() + 10
    while sandbox._proc.channel.is_open:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert sandbox.moved_away and sandbox._proc.channel.closed_reason == "another owner took the sandbox over"
    await sandbox._proc.kill()  # what the earlier owner's registry or watchdog may still do: the pod is not ended
    assert (await taken.run_code("x")).results[0].text == "5"


async def test_a_connection_that_sends_anything_but_a_hello_is_closed_and_binds_nothing(pod):
    reader, writer = await asyncio.open_connection("127.0.0.1", pod.port)
    writer.write(protocol.encode({"t": "exec", "id": 1, "code": "print(1)"}))
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 10) == b""  # closed without a word
    writer.close()
    # A short key is no key either.
    with pytest.raises(kube.PodRefused):
        await pod.connect("short", bind=True)
    # A hello that does not ask to bind (a server taking a sandbox back at its recorded address, which the
    # cluster may have given a new pod since) never binds a free pod.
    with pytest.raises(kube.PodRefused):
        await pod.connect("z" * 43)
    sandbox = await pod.boot()  # still unbound: the real owner binds it
    assert (await sandbox.run_code("1 + 1")).results[0].text == "2"


async def test_without_a_lease_the_pod_ends_when_its_owner_goes_and_with_one_it_waits(pod):
    sandbox = await pod.boot()
    await sandbox.run_code("kept = 'yes'")
    # A lease (the server's sandboxes have one): the owner may go, the sandbox waits for the next.
    await sandbox._proc.channel.send({"t": "lease", "id": 0, "until": time.time() + 60})
    await sandbox._proc.channel.aclose()
    await asyncio.sleep(0.5)
    assert await pod.holder_running()
    sock, welcome = await pod.connect()
    again = await pod.owner(sock)
    proc = again._proc
    assert (await again.run_code("kept")).results[0].text == "'yes'"
    # No lease now: the owner going away ends the sandbox, and the holder exits (in a cluster, the pod's container).
    await proc.channel.send({"t": "lease", "id": 0, "until": None})
    await proc.channel.aclose()
    deadline = time.monotonic() + 15
    while await pod.holder_running():
        assert time.monotonic() < deadline, await pod.log()
        await asyncio.sleep(0.1)
    assert "its owner went away and it has no lease" in await pod.log()


def test_only_the_holder_says_moved_or_counts_usage_the_agent_cannot():
    """A frame saying "moved", or answering "pod_usage", from the agent (the sandbox's code, had it taken the agent
    over) never reaches the owner: otherwise a sandbox could make its server forget it (and outlive its idle
    timeout), or under-report what it uses."""
    from sandlot._agent.pod import PodHolder

    holder = PodHolder(0)
    forged = [protocol.encode({"t": "moved"}), protocol.encode({"pad": "x" * 300, "t": "moved"}),
              protocol.encode({"t": "pod_usage", "id": 7, "cpu_seconds": 0}),
              protocol.encode({"t": "out", "id": 3, "s": "moved pod_usage"})]
    assert holder.agent_frames(forged) == forged[3:]


# Code in the sandbox (the agent's user) writing frames into the agent's pipe to the holder, from a child that
# outlives the call (so the agent is idle): HEAD is the frame's header, PAYLOAD its payload size, COUNT how many.
INTO_AGENTS_PIPE = r'''
import os, struct, sys, time
if os.fork() == 0:
    time.sleep(0.5)
    head = HEAD
    frame = struct.pack(">II", len(head), PAYLOAD) + head + b"j" * PAYLOAD
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if not any(part.endswith(b"boot.py") for part in cmd) or b"pod" not in cmd:
            continue
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:"):
                    continue
                flags = int(open(f"/proc/{pid}/fdinfo/{fd}").read().split("flags:")[1].split()[0], 8)
                if flags & 3 != os.O_WRONLY:
                    continue
                w = os.open(f"/proc/{pid}/fd/{fd}", os.O_WRONLY)
                for _ in range(COUNT):
                    os.write(w, frame)
                os.close(w)
            except OSError:
                pass
    os._exit(0)
print("armed")
'''


def forge(head: bytes, payload: int = 0, count: int = 1) -> str:
    return INTO_AGENTS_PIPE.replace("HEAD", repr(head)).replace("PAYLOAD", str(payload)).replace("COUNT", str(count))


@pytest.mark.parametrize("head", [b'{"t":"mov\\u0065d"}', '{"t":"moved"}'.encode("utf-16-le")],
                         ids=["json-escape", "utf-16"])
async def test_the_sandboxs_code_cannot_make_its_server_forget_it_with_a_moved_frame_in_disguise(pod, head):
    """The sandbox's code runs as the agent's user: it can write frames into the agent's pipe to the holder. A
    "moved" the holder lets through makes the server forget the sandbox (no idle timeout, out of its quotas)."""
    sandbox = await pod.boot()
    execution = await sandbox.run_code(forge(head))
    assert execution.error is None and execution.logs.stdout == ["armed\n"], execution
    await asyncio.sleep(2)
    assert not sandbox.moved_away, "a frame of the sandbox's code passed for the holder's"
    assert (await sandbox.run_code("6 * 7")).results[0].text == "42"


async def test_a_header_too_deep_to_decode_ends_the_sandbox_instead_of_silencing_its_channel(pod):
    """JSON nested 100000 deep fits in a header and makes json.loads raise RecursionError, which is no ProtocolError:
    the server's reader died without closing the channel, and every later call waited for an answer for ever."""
    sandbox = await pod.boot()
    head = b'{"t":"x","a":' + b"[" * 100000 + b"]" * 100000 + b"}"
    execution = await sandbox.run_code(forge(head))
    assert execution.logs.stdout == ["armed\n"], execution
    await asyncio.sleep(2)
    with pytest.raises((sandlot.SandboxCrashed, sandlot.SandboxNotFound)):
        await asyncio.wait_for(sandbox.run_code("6 * 7"), 15)


@pytest.mark.parametrize("head", [b'{"t":"hello","key":"' + b"\\ud800" * 40 + b'"}',
                                  b'{"t":"hello","key":' + b"[" * 100000 + b"]" * 100000 + b"}"],
                         ids=["lone-surrogates", "nested-too-deep"])
async def test_a_hello_the_holder_cannot_read_is_refused_and_the_pod_lives_on(pod, head):
    """Whoever reaches the port before the owner (or the sandbox's own code, over the pod's loopback) must not be
    able to crash pid 1, which ends the pod."""
    reader, writer = await asyncio.open_connection("127.0.0.1", pod.port)
    writer.write(protocol.PREFIX.pack(len(head), 0) + head)
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    assert await pod.holder_running(), await pod.log()
    sandbox = await pod.boot()
    assert (await sandbox.run_code("1 + 1")).results[0].text == "2"


async def test_frames_without_an_id_after_boot_do_not_pile_up_in_the_servers_memory(pod):
    """Frames with no request id go to the channel's control queue, read only while the agent boots. The sandbox's
    code writing them into its agent's pipe made its server keep every one (1 MiB each) for the sandbox's life:
    one tenant could run a server replica, and every other tenant's sandboxes on it, out of memory."""
    sandbox = await pod.boot()
    execution = await sandbox.run_code(forge(b'{"t":"junk"}', 1024 * 1024, 64))
    assert execution.logs.stdout == ["armed\n"], execution
    await asyncio.sleep(4)
    control = sandbox._proc.channel.control
    held = sum(len(item[1]) for item in control._queue if isinstance(item, tuple))
    assert held < 8 * 1024 * 1024, f"{control.qsize()} frames, {held} payload bytes held"
