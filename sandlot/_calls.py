"""The arguments of a call, checked once (by ``AsyncSandbox``, before any transport sees them), and the
data helpers both transports share (upload chunks, a download gathered as the caller asked).

The same rules and messages whether the sandbox is local or on a server: a bad argument is an
``InvalidRequest`` before anything is sent.
"""

from __future__ import annotations

import asyncio
import errno
import json
from typing import Any, AsyncIterator, Mapping, Optional, Union

from ._agent import protocol
from ._exceptions import FileError, InvalidRequest
from ._limits import Limits
from ._spec import check_env

FORMATS = ("text", "bytes", "stream")


# One limit per call, the same locally, remotely and on the server (each checks with these functions): a
# call travels to the agent as one protocol frame (protocol.MAX_HEADER, 256 KiB), and a command is one
# argument of /bin/sh (the kernel's MAX_ARG_STRLEN, 128 KiB with its NUL).
MAX_CODE = 192 * 1024  # bytes of UTF-8
MAX_CMD = 128 * 1024 - 1
MAX_COMMAND_ENV = 48 * 1024  # a command's own environment, in bytes of JSON


def _utf8_size(text: str, what: str) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidRequest(f"{what} is not valid UTF-8 (lone surrogates)") from None


def check_code(code: object) -> str:
    if not isinstance(code, str):
        raise InvalidRequest("code must be a string")
    size = _utf8_size(code, "code")
    if size > MAX_CODE:
        raise InvalidRequest(f"code is {size} bytes; one call takes at most {MAX_CODE} ({MAX_CODE // 1024} KiB): put "
                             "data in a file (files.write) and read it from the code, or send the code in parts")
    return code


def check_timeout(timeout: Optional[float]) -> Optional[float]:
    """A call's own timeout: the same bounds (and message) as the ``timeout`` limit."""
    if timeout is not None:
        Limits.build({"timeout": timeout})
    return timeout


def check_cmd(cmd: object) -> str:
    if not isinstance(cmd, str) or not cmd.strip():
        raise InvalidRequest("cmd must be a non-empty string")
    size = _utf8_size(cmd, "cmd")
    if size > MAX_CMD:
        raise InvalidRequest(f"cmd is {size} bytes; a command is at most {MAX_CMD} (one argument of /bin/sh): write "
                             "a script with files.write and run it")
    return cmd


def check_command_env(env: Optional[Mapping[str, str]]) -> Optional[dict[str, str]]:
    if not env:
        return None
    env = dict(check_env(env))
    size = len(json.dumps(env))
    if size > MAX_COMMAND_ENV:
        raise InvalidRequest(f"a command's env is {size} bytes as JSON; at most {MAX_COMMAND_ENV}")
    return env


def check_path(path: object) -> str:
    if not isinstance(path, str) or not path or "\0" in path:
        raise InvalidRequest("path must be a non-empty string without NUL bytes")
    return path


def check_format(format: str) -> str:
    if format not in FORMATS:
        raise InvalidRequest("format must be 'text', 'bytes' or 'stream'")
    return format


def check_depth(depth: object) -> int:
    try:
        value = int(depth)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise InvalidRequest(f"depth must be a whole number, got {depth!r}") from None
    return max(1, min(value, 32))


def check_upload(data: Any) -> Any:
    if isinstance(data, (str, bytes, bytearray, memoryview)) or hasattr(data, "read") \
            or hasattr(data, "__aiter__") or hasattr(data, "__iter__"):
        return data
    raise InvalidRequest("data must be str, bytes, a file object or an iterable of bytes")


async def read_as(stream: AsyncIterator[bytes], format: str, path: str = "") -> Union[str, bytes, AsyncIterator[bytes]]:
    """A file's chunks as the caller asked: the stream itself, or gathered into bytes or UTF-8 text (a file
    that is not UTF-8 is a FileError that says how to read it, not a bare UnicodeDecodeError)."""
    if format == "stream":
        return stream
    data = bytearray()
    async for chunk in stream:
        data += chunk
    if format != "text":
        return bytes(data)
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise FileError(f"{path or 'the file'} is not UTF-8 text (byte {exc.start}): read it with format='bytes'",
                        errno.EILSEQ, path or None) from None


async def chunks(data: Any) -> AsyncIterator[bytes]:
    """Upload data as byte chunks of the protocol's size: text, bytes, a file object, (async) iterables."""
    size = protocol.CHUNK
    if isinstance(data, str):
        data = data.encode()
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data)
        for i in range(0, len(view), size):
            yield bytes(view[i:i + size])
        return
    if hasattr(data, "read"):
        while True:
            chunk = await asyncio.to_thread(data.read, size)
            if not chunk:
                return
            yield chunk.encode() if isinstance(chunk, str) else chunk
    if hasattr(data, "__aiter__"):
        async for chunk in data:
            for i in range(0, len(chunk), size):
                yield bytes(chunk[i:i + size])
        return
    if hasattr(data, "__iter__"):
        for chunk in data:
            for i in range(0, len(chunk), size):
                yield bytes(chunk[i:i + size])
        return
    raise InvalidRequest("data must be str, bytes, a file object or an iterable of bytes")
