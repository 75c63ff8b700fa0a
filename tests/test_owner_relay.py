"""The relay between a sandbox's owner and its agent (sandlot/_agent/owner_relay.py: the gVisor keeper's and a
pod holder's core), driven over a real socket pair and real pipes: an owner that dies with frames unread."""

from __future__ import annotations

import fcntl
import os
import socket

from sandlot._agent import protocol
from sandlot._agent.owner_relay import OwnerRelay, WholeFrames

F_SETPIPE_SZ = 1031


class AnsweringRelay(OwnerRelay):
    """Answers "usage" frames itself, as a pod's holder answers pod_usage."""

    ended = None

    def owner_frame(self, frame: bytes) -> bool:
        if b'"usage"' in frame:
            self.to_owner_now(protocol.encode({"t": "usage_answer", "id": 1}))
            return True
        return False

    def end(self, why: str) -> None:
        self.ended = why


def headers_of(data: bytes) -> list:
    out = []
    for frame in WholeFrames().feed(data):
        head_len, _ = protocol.PREFIX.unpack_from(frame)
        out.append(protocol.decode_header(frame[protocol.PREFIX.size:protocol.PREFIX.size + head_len]))
    return out


def test_an_owner_that_dies_with_frames_unread_has_them_all_passed_on_in_order_and_its_last_lease_kept():
    """The relay's answer to the owner's first frame fails (the owner is gone): the frames the owner sent after
    it still reach the agent, after the earlier ones, and the last lease it sent is the one kept."""
    relay = AnsweringRelay(lease_until=1e12)
    agent_in_r, agent_in_w = os.pipe()
    agent_out_r, agent_out_w = os.pipe()
    fcntl.fcntl(agent_in_w, F_SETPIPE_SZ, 1 << 20)  # room for all the agent is sent: the test reads it after
    relay.attach_agent(agent_in_w, agent_out_r)
    ours, owner = socket.socketpair()
    relay.take_owner(ours)
    try:
        owner.sendall(protocol.encode({"t": "usage", "id": 1})
                      + protocol.encode({"t": "lease", "id": 0, "until": 600.0})
                      + protocol.encode({"t": "fdata", "id": 2}, b"x" * 70000)  # more than one read of the relay
                      + protocol.encode({"t": "lease", "id": 0, "until": 30.0}))
        owner.close()  # gone with the relay's answer unread: writing it fails
        for key, mask in relay.sel.select(0):
            key.data(key, mask)
        assert relay.owner is None and relay.ended is None
        assert relay.lease_until == 30.0
        os.set_blocking(agent_in_r, False)
        got = headers_of(os.read(agent_in_r, 1 << 21))
        assert [(h["t"], h.get("until")) for h in got] == [("lease", 600.0), ("fdata", None), ("lease", 30.0)]
    finally:
        for fd in (agent_in_r, agent_in_w, agent_out_r, agent_out_w):
            os.close(fd)
