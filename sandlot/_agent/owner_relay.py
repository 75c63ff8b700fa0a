"""One owner at a time for a sandbox's agent: the relay under the gVisor tier's keeper and a pod's holder.

Whoever holds the agent's channel holds the sandbox. A relay holds it instead, and carries frames between
the agent (pipes: runsc's stdio on the host, the agent's own stdio in a pod) and one owner at a time (a
server, the local SDK), so the sandbox outlives its owner and a later one takes it over:

- Only whole frames cross (the wire protocol's framing, checked as the agent's own channel checks it): an
  owner that dies mid-frame never leaves half a request in the agent's stream.
- A new owner (any after the first) takes over from the one before (which is closed), and the agent is
  told first (``{"t": "owner"}``: it orphans the earlier owner's requests).
- While no owner is connected, what the agent sends is dropped (a new owner asks again: ``cmd_attach``).
- Lifetime: a lease frame from the owner (``{"t": "lease", "until": <unix time or null>}``) passes through
  to the agent, and the relay notes ``until``. Ownerless, the sandbox ends at ``until``; with no lease it
  ends as soon as its owner goes away.

How owners connect, how the agent starts and how a sandbox ends are the subclass's (``end``): the host's
keeper (sandlot/_host/keeper.py) and a pod's holder (pod.py). Stdlib only: it runs in pods too.
"""

from __future__ import annotations

import os
import selectors
import time

if __package__:
    from . import protocol
else:  # run by path (the host's keeper): the agent's directory is on sys.path
    import protocol  # type: ignore[no-redef]

# One read at most: under the allocator's mmap threshold, so a read of a small frame does not map and unmap
# a large buffer each time (with 1 MiB reads that was most of the relay's cost: ~0.2 ms a round trip).
READ_SIZE = 64 * 1024
HIGH_WATER = 4 * 1024 * 1024  # bytes waiting for one side before the relay stops reading the other
NEW_OWNER = protocol.encode({"t": "owner", "id": 0})


class WholeFrames:
    """Bytes in, whole frames out, each as its raw bytes (nothing re-encoded): the protocol's length checks
    (``protocol.check_prefix``) before anything is buffered past a prefix."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list:
        self._buf += data
        frames = []
        size = protocol.PREFIX.size
        while len(self._buf) >= size:
            head_len, payload_len = protocol.check_prefix(bytes(self._buf[:size]))
            end = size + head_len + payload_len
            if len(self._buf) < end:
                break
            frames.append(bytes(self._buf[:end]))
            del self._buf[:end]
        return frames


def lease_of(frame: bytes):
    """``(True, until)`` for a lease frame, else ``(False, None)``. Only a header that names "lease" is decoded."""
    head_len, _ = protocol.PREFIX.unpack_from(frame)
    head = frame[protocol.PREFIX.size:protocol.PREFIX.size + head_len]
    if b"lease" not in head:
        return False, None
    header = protocol.decode_header(head)
    if header.get("t") != "lease":
        return False, None
    until = header.get("until")
    return True, (float(until) if isinstance(until, (int, float)) and not isinstance(until, bool) else None)



class OwnerRelay:
    """The relay's state and its selector callbacks. A subclass connects owners (``take_owner``), starts the
    agent (``attach_agent``) and ends the sandbox (``end``)."""

    def __init__(self, lease_until=None) -> None:
        self.sel = selectors.DefaultSelector()
        self.owner = None  # the connected owner's socket
        self.lost = False  # a write to the owner failed: what it sent last is being read, then it is dropped
        self.owners = 0  # owners connected so far: from the second on, the agent is told of each
        self.from_owner = WholeFrames()
        self.from_agent = WholeFrames()
        self.to_owner = bytearray()
        self.to_agent = bytearray()
        self.agent_in = self.agent_out = -1
        self.lease_until = lease_until  # unix time; None: no lease (ownerless means ended)
        self.ending = False  # the sandbox is being ended: waiting for it to go
        self.watching: dict = {}  # fd -> the events the selector watches it for (owner and agent pipes)

    def attach_agent(self, agent_in: int, agent_out: int) -> None:
        """The agent's stdin (we write) and stdout (we read)."""
        self.agent_in, self.agent_out = agent_in, agent_out
        os.set_blocking(self.agent_in, False)
        os.set_blocking(self.agent_out, False)
        self._want(self.agent_out, selectors.EVENT_READ, self._on_agent)

    def take_owner(self, conn) -> None:
        """``conn`` (a connected, vetted socket) is the owner from now on."""
        if self.owner is not None:  # a new owner takes over (the old one may be gone without a word yet)
            self._drop_owner()
        conn.setblocking(False)
        self.owner = conn
        self.lost = False
        self.owners += 1
        self.from_owner = WholeFrames()
        self.to_owner = bytearray()
        if self.owners > 1:  # after the whole frames of the earlier owner, before any of this one's
            self._to_agent(NEW_OWNER)
        self._watch_owner()

    def lease_over(self) -> bool:
        """No owner, and the lease it left has run out."""
        return self.owner is None and not self.ending and self.lease_until is not None \
            and time.time() >= self.lease_until

    def owner_frame(self, frame: bytes) -> bool:
        """A frame from the owner that the relay answers itself (True: not for the agent)."""
        return False

    def to_owner_now(self, frame: bytes) -> None:
        """A whole frame of the relay's own for the owner, after what is already queued."""
        if self.owner is not None:
            self.to_owner += frame
            self._flush_owner()

    def agent_frames(self, frames: list) -> list:
        """What of the agent's whole frames goes on to the owner (a subclass may hold some back)."""
        return frames

    def on_lease(self, until) -> None:
        """An owner gave a lease (already noted in ``lease_until``)."""

    def end(self, why: str) -> None:
        raise NotImplementedError

    def _timeout(self):
        if self.owner is not None or self.ending or self.lease_until is None:
            return None
        return max(0.0, self.lease_until - time.time())

    def _on_owner(self, key, mask) -> None:
        if mask & selectors.EVENT_READ:
            if self._read_owner() is False:
                return self._owner_gone()
        if mask & selectors.EVENT_WRITE and self.owner is not None:
            self._flush_owner()
        self._settle_lost()
        self._watch_owner()
        self._watch_agent()

    def _read_owner(self):
        """One read of what the owner sent: True (frames taken), None (nothing now), False (it is gone: end of
        stream, reset, or not our framing)."""
        try:
            data = self.owner.recv(READ_SIZE)
        except BlockingIOError:
            return None
        except OSError:
            return False
        if not data:
            return False
        try:
            frames = self.from_owner.feed(data)
            leases = [lease_of(frame) for frame in frames]
        except protocol.ProtocolError:
            return False  # not our owner's framing: treated as gone
        for frame, (is_lease, until) in zip(frames, leases):
            if is_lease:
                self.lease_until = until
                self.on_lease(until)
            if not self.owner_frame(frame):
                self._to_agent(frame)
        return True

    def _flush_owner(self) -> None:
        """Send what waits for the owner now (the common case: all of it, no extra turn of the loop)."""
        if self.lost:
            self.to_owner = bytearray()
            return
        while self.to_owner and self.owner is not None:
            try:
                sent = self.owner.send(self.to_owner)
            except BlockingIOError:
                break
            except OSError:
                # Gone (EPIPE, ECONNRESET). It is let go at the end of this turn (_settle_lost), after what it
                # sent before it went, in order: a lease that shortened its deadline may be among it. (Answers the
                # relay gives meanwhile go nowhere: ``lost`` drops them above.)
                self.to_owner, self.lost = bytearray(), True
                return
            del self.to_owner[:sent]
        self._watch_owner()
        self._watch_agent()  # drained below the high-water mark: read the agent again (a large download)

    def _settle_lost(self) -> None:
        """At the end of a turn in which a write to the owner failed: the rest of what it sent is taken (in order,
        after the frames of the read in progress), then it is let go. Never called inside a read: a nested read
        would pass later frames on before earlier ones."""
        if not self.lost or self.owner is None:
            return
        for _ in range(64):  # a gone owner sends nothing more: its queued bytes end soon
            if not self._read_owner():
                break
        self._owner_gone()

    def _owner_gone(self) -> None:
        self._drop_owner()
        if self.lease_until is None:
            self.end("its owner went away and it has no lease")
        self._watch_agent()

    def _drop_owner(self) -> None:
        if self.owner is None:
            return
        self._want(self.owner.fileno(), 0, None)
        self.owner.close()
        self.owner = None
        self.to_owner = bytearray()  # whole frames only were queued: the next owner starts on a boundary

    def _watch_owner(self) -> None:
        if self.owner is None:
            return
        events = selectors.EVENT_WRITE if self.to_owner else 0
        if len(self.to_agent) < HIGH_WATER:
            events |= selectors.EVENT_READ
        self._want(self.owner.fileno(), events, self._on_owner)

    def _want(self, fd: int, events: int, callback) -> None:
        """Watch ``fd`` for ``events`` (0: not at all); the selector is told only of changes."""
        had = self.watching.get(fd, 0)
        if events == had:
            return
        if not events:
            self.sel.unregister(fd)
            del self.watching[fd]
        elif not had:
            self.sel.register(fd, events, callback)
            self.watching[fd] = events
        else:
            self.sel.modify(fd, events, callback)
            self.watching[fd] = events

    # -- the agent's side -----------------------------------------------------------------------------
    def _to_agent(self, frame: bytes) -> None:
        if self.agent_in < 0:
            return
        self.to_agent += frame
        self._flush_agent()

    def _flush_agent(self) -> None:
        while self.to_agent and self.agent_in >= 0:
            try:
                sent = os.write(self.agent_in, self.to_agent)
            except BlockingIOError:
                break
            except OSError:  # the agent's stdin is gone: runsc is ending
                self.to_agent = bytearray()
                break
            del self.to_agent[:sent]
        self._watch_agent()
        self._watch_owner()  # drained below the high-water mark: read the owner again (a large upload)

    def _on_agent(self, key, mask) -> None:
        try:
            data = os.read(self.agent_out, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # runsc is ending: its exit (the pidfd) finishes
            self._want(self.agent_out, 0, None)
            self.agent_out = -1
            return
        try:
            frames = self.agent_frames(self.from_agent.feed(data))
        except protocol.ProtocolError:
            self.end("its agent broke the protocol")
            return
        if self.owner is not None and frames:
            self.to_owner += b"".join(frames)
            self._flush_owner()
            self._settle_lost()
        self._watch_agent()

    def _on_agent_writable(self, key, mask) -> None:
        self._flush_agent()

    def _watch_agent(self) -> None:
        if self.agent_out >= 0:
            self._want(self.agent_out, selectors.EVENT_READ if len(self.to_owner) < HIGH_WATER else 0, self._on_agent)
        if self.agent_in >= 0:
            self._want(self.agent_in, selectors.EVENT_WRITE if self.to_agent else 0, self._on_agent_writable)

