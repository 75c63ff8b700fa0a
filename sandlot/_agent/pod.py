"""pid 1 of a Sandlot pod on Kubernetes: holds the sandbox's agent and lets one server at a time reach it.

``python3 -I -S -B /opt/sandlot/_agent/pod.py --port 8888`` listens on the pod's TCP port. A server
connects over the pod network (never through ``pods/exec``) and says who it is with the sandbox's key:

- its first frame is ``{"t": "hello", "key": K, "bind": B}`` and nothing else until the answer;
- a pod nobody has bound yet (a warm pod, just claimed) is bound by a hello with ``"bind": true`` (the server
  that made the claim): it keeps the key's SHA-256 and answers ``{"t": "welcome", "bound": "now"}``; every later
  connection (a restarted server, another replica) must present the same key (``"bound": "before"``), or it is
  closed without a word. A hello that does not bind (a server taking a sandbox back by its recorded address,
  which a new pod may have been given since) never binds an unbound pod: it is refused and the pod stays free;
- then the connection is the sandbox's owner (sandlot/_agent/owner_relay.py: whole frames, the newest
  owner takes over, leases), and the agent (boot.py in ``pod`` mode, on our stdin/stdout pipes) starts
  when the first owner is there, reading its boot plan from it as on the gVisor tier.

A key is random (256 bits) and the server keeps it; the pod holds only its digest, and is not dumpable
(its memory and /proc files are closed to the code of its own sandbox, which runs as the same user).
Who may reach the port at all is the cluster's NetworkPolicy (ingress from the server's pods only): an
unbound warm pod binds to whoever speaks first, so a pod bound by anyone else fails the server's hello
and the server drops it.

The sandbox ends (the agent killed, then this process exits, and with it the pod's container) when its
agent exits, or when it has no owner and its lease has run out (no lease: as soon as the owner goes).
Stdlib only.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import selectors
import signal
import socket
import subprocess
import sys
import time

if __package__:
    from . import protocol
    from .owner_relay import OwnerRelay, WholeFrames
else:  # run by path, as a pod's command
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import protocol  # type: ignore[no-redef]
    from owner_relay import OwnerRelay, WholeFrames  # type: ignore[no-redef]

HELLO_WITHIN = 10.0  # seconds a connection may take to say hello before it is closed
MAX_PENDING = 16  # connections waiting to say hello; beyond it the oldest is closed
MOVED = protocol.encode({"t": "moved"})
BOOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "boot.py")


class PodHolder(OwnerRelay):
    def __init__(self, port: int, host: str = "") -> None:
        super().__init__(None)
        self.port, self.host = port, host
        self.key_digest = None  # bytes once bound
        self.pending: dict = {}  # socket -> [deadline, WholeFrames]
        self.agent = None  # subprocess.Popen of boot.py, once the first owner came
        self.listener = None
        self.wakeup_r = -1
        self.meter = PodMeter()

    # -- setup --------------------------------------------------------------------------------------
    def listen(self) -> None:
        try:  # both families where the pod has IPv6 (a dual-stack cluster), else IPv4 only
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host or "::", self.port))
        except OSError:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host or "0.0.0.0", self.port))
        sock.listen(16)
        sock.setblocking(False)
        self.listener = sock
        self.sel.register(sock, selectors.EVENT_READ, self._on_accept)
        # pid 1 reaps what its sandbox's code orphans; SIGCHLD wakes the loop to do it.
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        signal.set_wakeup_fd(w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.wakeup_r = r
        self.sel.register(r, selectors.EVENT_READ, self._on_wakeup)

    def start_agent(self) -> None:
        self.agent = subprocess.Popen([sys.executable, "-I", "-S", "-B", BOOT, "0", "pod"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, cwd="/")
        self.attach_agent(self.agent.stdin.fileno(), self.agent.stdout.fileno())

    # -- the loop -----------------------------------------------------------------------------------
    def serve(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self.end("SIGTERM (the pod is deleted)"))
        self.listen()
        try:
            import ctypes

            ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: our memory is not the sandbox's to read
        except (OSError, AttributeError):
            pass
        sys.stderr.write("sandlot pod: listening on port %d\n" % self.port)
        sys.stderr.flush()
        while True:
            for key, mask in self.sel.select(self._loop_timeout()):
                key.data(key, mask)
            self._expire_pending()
            if self.agent is not None and time.monotonic() >= self.meter.next_sample:
                self.meter.sample()
            rc = self._agent_exit()
            if rc is not None:
                return rc
            if self.lease_over():
                self.end("its lease ended with no owner")

    def _loop_timeout(self):
        timeouts = [deadline - time.monotonic() for deadline, _ in self.pending.values()]
        if self.agent is not None:
            timeouts.append(self.meter.next_sample - time.monotonic())
        lease = self._timeout()
        if lease is not None:
            timeouts.append(lease)
        return max(0.0, min(timeouts)) if timeouts else None

    def _on_wakeup(self, key, mask) -> None:
        try:
            while os.read(self.wakeup_r, 512):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _agent_exit(self):
        """The agent's status once it has exited (every other child of ours is reaped and forgotten)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return None
            if pid == 0:
                return None
            if self.agent is not None and pid == self.agent.pid:
                self.agent.returncode = os.waitstatus_to_exitcode(status)
                rc = self.agent.returncode
                return rc if rc >= 0 else 128 - rc

    # -- owners -------------------------------------------------------------------------------------------
    def take_owner(self, conn) -> None:
        """The earlier owner (another replica, a server that lost touch) is told it lost the sandbox before it is
        let go, so it forgets the sandbox instead of ending it: what it was still owed goes first (whole frames
        only), then ``{"t": "moved"}``."""
        old = self.owner
        if old is not None:
            try:
                old.setblocking(True)
                old.settimeout(2)
                old.sendall(bytes(self.to_owner) + MOVED)
            except OSError:
                pass
            self.to_owner = bytearray()
        super().take_owner(conn)

    def owner_frame(self, frame: bytes) -> bool:
        """``{"t": "pod_usage", "id": N, "reset_peak": bool}``: the pod's counters, answered by the holder."""
        head_len, _ = protocol.PREFIX.unpack_from(frame)
        head = frame[protocol.PREFIX.size:protocol.PREFIX.size + head_len]
        if b"pod_usage" not in head:
            return False
        try:
            header = protocol.decode_header(head)
        except protocol.ProtocolError:
            return False  # the agent's own checks close the channel for it
        if header.get("t") != "pod_usage":
            return False
        counters = self.meter.read(reset_peak=header.get("reset_peak") is True)
        self.to_owner_now(protocol.encode(dict(counters, t="pod_usage", id=header.get("id"))))
        return True

    def agent_frames(self, frames: list) -> list:
        """Only this holder says "moved" and answers "pod_usage": the agent (the sandbox's own code, had it taken
        the agent over) can do neither (it would make its server forget it, or under-count it)."""
        return [f for f in frames if not _holders_own(f)]

    # -- connections ------------------------------------------------------------------------------------
    def _on_accept(self, key, mask) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        conn.setblocking(False)
        try:  # small frames each way (a call, its answer): never held back for an ACK (Nagle)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        if len(self.pending) >= MAX_PENDING:
            self._close_pending(next(iter(self.pending)))
        self.pending[conn] = [time.monotonic() + HELLO_WITHIN, WholeFrames()]
        self.sel.register(conn, selectors.EVENT_READ, self._on_pending)

    def _on_pending(self, key, mask) -> None:
        conn = key.fileobj
        try:
            data = conn.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            return self._close_pending(conn)
        try:
            frames = self.pending[conn][1].feed(data)
        except protocol.ProtocolError:
            return self._close_pending(conn)
        if not frames:
            return
        if len(frames) > 1:  # nothing may follow the hello before its answer
            return self._close_pending(conn)
        answer = self._check_hello(frames[0])
        if answer is None:
            return self._close_pending(conn)
        self.sel.unregister(conn)
        del self.pending[conn]
        try:
            conn.setblocking(True)
            conn.settimeout(5)
            conn.sendall(protocol.encode({"t": "welcome", "id": 0, "bound": answer, "machine": os.uname().machine}))
        except OSError:
            conn.close()
            return
        if self.agent is None:
            self.start_agent()
        self.take_owner(conn)

    def _check_hello(self, frame: bytes):
        """"now" (this hello bound the pod), "before" (it presented the key the pod is bound to), or None."""
        head_len, _ = protocol.PREFIX.unpack_from(frame)
        try:  # (whoever reaches the port may send anything: nothing it sends may end pid 1, and with it the pod)
            header = protocol.decode_header(frame[protocol.PREFIX.size:protocol.PREFIX.size + head_len])
        except (protocol.ProtocolError, RecursionError):  # RecursionError: JSON nested too deep
            return None
        key = header.get("key") if header.get("t") == "hello" else None
        if not isinstance(key, str) or len(key) < 32 or not key.isascii():  # (a server's keys are URL-safe base64;
            return None  # JSON may hold lone surrogates, which no encoding takes)
        digest = hashlib.sha256(key.encode()).digest()
        if self.key_digest is None:
            if header.get("bind") is not True:
                return None
            self.key_digest = digest
            return "now"
        return "before" if hmac.compare_digest(digest, self.key_digest) else None

    def _close_pending(self, conn) -> None:
        self.pending.pop(conn, None)
        try:
            self.sel.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()

    def _expire_pending(self) -> None:
        now = time.monotonic()
        for conn, (deadline, _) in list(self.pending.items()):
            if now >= deadline:
                self._close_pending(conn)

    # -- ending ---------------------------------------------------------------------------------------
    def end(self, why: str) -> None:
        """The agent (and with it its session) killed; this process exits once it is reaped, ending the pod's
        container, and with it every process of the pod."""
        self.ending = True
        sys.stderr.write("sandlot pod: ending the sandbox: %s\n" % why)
        sys.stderr.flush()
        if self.agent is None:
            sys.exit(0)  # nothing started yet (a warm pod told to go)
        # By pid, not Popen.kill (which polls first and would reap the agent behind _agent_exit's back).
        for kill, target in ((os.killpg, self.agent.pid), (os.kill, self.agent.pid)):  # its session (setsid), itself
            try:
                kill(target, signal.SIGKILL)
            except OSError:
                pass


class PodMeter:
    """The pod's usage, as its kernel counts it (gVisor's sentry in a cluster; the sandbox's code cannot change
    these, and the holder that reads them is not its to touch): CPU of every process, live and reaped, from
    /proc; memory in use from the pod's memory cgroup where the runtime shows one, else the processes'
    resident memory; its peak sampled every SAMPLE_EVERY seconds (and at each read) since the last reset."""

    SAMPLE_EVERY = 0.5

    def __init__(self) -> None:
        self.peak = 0
        self.next_sample = time.monotonic()

    def sample(self) -> int:
        memory = _cgroup_memory()
        if memory is None:
            memory = sum(rss for _, rss in _processes())
        self.peak = max(self.peak, memory)
        self.next_sample = time.monotonic() + self.SAMPLE_EVERY
        return memory

    def read(self, reset_peak: bool = False) -> dict:
        processes = list(_processes())
        ticks = os.sysconf("SC_CLK_TCK")
        memory = self.sample()
        out = {"cpu_seconds": sum(cpu for cpu, _ in processes) / ticks, "memory": memory, "memory_peak": self.peak,
               "processes": len(processes), "oom_kills": _cgroup_count("memory.events", "oom_kill"),
               "memory_limit_hits": _cgroup_count("memory.events", "max"),
               "pids_limit_hits": _cgroup_count("pids.events", "max")}
        if reset_peak:
            self.peak = memory
        return out


def _processes():
    """(CPU ticks: own and reaped children's, resident bytes) of each process of the pod."""
    page = os.sysconf("SC_PAGE_SIZE")
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        # After the name: state is field 3; utime, stime, cutime, cstime are 14-17; rss (pages) is 24.
        try:
            yield sum(int(v) for v in fields[11:15]), int(fields[21]) * page
        except (IndexError, ValueError):
            continue


def _cgroup_memory():
    for path in ("/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory/memory.usage_in_bytes"):
        try:
            with open(path) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            continue
    return None


def _cgroup_count(name: str, key: str) -> int:
    try:
        with open("/sys/fs/cgroup/" + name) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2 and parts[0] == key:
                    return int(parts[1])
    except (OSError, ValueError):
        pass
    return 0


def _holders_own(frame: bytes) -> bool:
    """A frame of a kind only the holder sends."""
    head_len, _ = protocol.PREFIX.unpack_from(frame)
    head = frame[protocol.PREFIX.size:protocol.PREFIX.size + head_len]
    # The common case, decided without decoding: the owner decodes a header as json.loads does (bytes: UTF-16
    # and UTF-32 too, escapes), so a kind can hide behind an escape (a backslash) or another encoding (NULs,
    # since "{" is ASCII); with neither, a header that means one says it literally.
    if b"moved" not in head and b"pod_usage" not in head and b"\\" not in head and b"\0" not in head:
        return False
    try:
        return protocol.decode_header(head).get("t") in ("moved", "pod_usage")
    except protocol.ProtocolError:
        return False
    except RecursionError:  # nested too deep for its owner to read either: held back (the holder lives on)
        return True


def main(argv: "list[str]") -> int:
    parser = argparse.ArgumentParser(prog="pod.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8888)
    parser.add_argument("--host", default="", help="the address to listen on (default: every address of the pod)")
    args = parser.parse_args(argv)
    return PodHolder(args.port, args.host).serve()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
