"""User stories that the local and the remote SDK must both pass, word for word."""

from __future__ import annotations

import pytest

import sandlot
from sandlot import InvalidRequest


def files_api_story(f) -> None:
    """``f``: a sandbox's ``files``. mkdir, write, read (text and bytes), stat, list, exists, remove, errors."""
    assert f.mkdir("d/e") is True and f.mkdir("d/e") is False
    f.write("d/e/t.txt", "héllo")
    assert f.read("d/e/t.txt") == "héllo"
    assert f.read("d/e/t.txt", format="bytes") == "héllo".encode()
    info = f.stat("/home/user/d/e/t.txt")
    assert info.type == "file" and info.size == len("héllo".encode())
    assert [e.name for e in f.list("d", depth=2)] == ["e", "t.txt"]
    assert f.exists("d/e/t.txt")
    f.remove("d")
    assert not f.exists("d/e/t.txt")
    with pytest.raises(sandlot.FileError) as err:
        f.read("nope.txt")
    assert err.value.errno == 2
    with pytest.raises(InvalidRequest):
        f.read("")
    # A binary file read as text: one of Sandlot's errors, saying how to read it (not a bare UnicodeDecodeError).
    f.write("bin.dat", b"\x89PNG\xff\x00")
    with pytest.raises(sandlot.FileError, match="format='bytes'") as err:
        f.read("bin.dat")
    assert err.value.filename == "bin.dat"
    assert f.read("bin.dat", format="bytes") == b"\x89PNG\xff\x00"
