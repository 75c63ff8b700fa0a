"""The wire protocol between the host and the agent inside a sandbox.

One frame = an 8-byte prefix (header length, payload length; both big-endian u32), a JSON header
(a dict with at least ``"t"``, the message type, and usually ``"id"``, the request id) and an optional
binary payload (output chunks, file data). Both sides bound every length before reading, so a peer
that sends garbage or giant frames is detected instead of exhausting memory.

Stdlib only: this module runs inside the sandbox too.
"""

from __future__ import annotations

import json
import struct

PREFIX = struct.Struct(">II")
MAX_HEADER = 256 * 1024  # a header is metadata (a result's repr, a traceback); bounded generously
MAX_PAYLOAD = 1024 * 1024  # output and file data travel in chunks of at most 1 MiB
CHUNK = 256 * 1024  # the size the agent uses for file and output chunks
FREAD_WINDOW = 4 * CHUNK  # file bytes in flight to the host before it acknowledges ("fack") them


class ProtocolError(Exception):
    """The peer broke the framing rules (oversized, malformed or truncated frame)."""


def encode(header: dict, payload: bytes = b"") -> bytes:
    head = json.dumps(header, separators=(",", ":"), default=str).encode()
    if len(head) > MAX_HEADER:
        raise ProtocolError("header too large: %d bytes" % len(head))
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError("payload too large: %d bytes" % len(payload))
    return PREFIX.pack(len(head), len(payload)) + head + payload


def check_prefix(prefix: bytes) -> tuple:
    head_len, payload_len = PREFIX.unpack(prefix)
    if head_len > MAX_HEADER or payload_len > MAX_PAYLOAD or head_len == 0:
        raise ProtocolError("bad frame lengths %d/%d" % (head_len, payload_len))
    return head_len, payload_len


def decode_header(raw: bytes) -> dict:
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError("header is not JSON: %s" % exc) from None
    if not isinstance(header, dict) or not isinstance(header.get("t"), str):
        raise ProtocolError("header is not a message")
    return header


class FrameBuffer:
    """Incremental decoder for a non-blocking reader: feed bytes, take whole frames."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list:
        self._buf += data
        frames = []
        while len(self._buf) >= PREFIX.size:
            head_len, payload_len = check_prefix(bytes(self._buf[: PREFIX.size]))
            end = PREFIX.size + head_len + payload_len
            if len(self._buf) < end:
                break
            header = decode_header(bytes(self._buf[PREFIX.size : PREFIX.size + head_len]))
            payload = bytes(self._buf[PREFIX.size + head_len : end])
            del self._buf[:end]
            frames.append((header, payload))
        return frames
