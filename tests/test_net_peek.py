"""Issue #13: the broker reads which host a client asks for (TLS SNI, HTTP Host) from its first bytes.

Real ClientHellos come from the ssl module (a client handshake into a memory BIO), as Python clients send
them; every prefix must ask for more bytes rather than decide, and a hello split over two records (as
large post-quantum hellos are) must parse the same.
"""

from __future__ import annotations

import ssl

import pytest

from sandlot._net import peek


def _client_hello(server_hostname: str | None) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = server_hostname is not None
    if server_hostname is None:
        context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def _split_into_two_records(hello: bytes) -> bytes:
    message = hello[5:]
    half = len(message) // 2
    header = hello[:3]
    return (header + half.to_bytes(2, "big") + message[:half]
            + header + (len(message) - half).to_bytes(2, "big") + message[half:])


@pytest.mark.parametrize("name", ["files.pythonhosted.org", "a.example", "xn--bcher-kva.example"])
def test_sni_of_a_real_client_hello(name):
    hello = _client_hello(name)
    assert peek.classify(hello) == peek.FirstBytes("tls", host=name)
    assert peek.classify(_split_into_two_records(hello)) == peek.FirstBytes("tls", host=name)
    for cut in range(0, len(hello), 7):
        with pytest.raises(peek.NeedMore):
            peek.classify(hello[:cut])


def test_a_client_hello_without_sni_says_so():
    assert peek.classify(_client_hello(None)) == peek.FirstBytes("tls", host=None)


def test_garbage_after_a_tls_header_is_malformed_not_a_host():
    hello = bytearray(_client_hello("a.example"))
    claimed = len(hello) - 5 - 4 - 10
    hello[6:9] = claimed.to_bytes(3, "big")  # the hello now ends inside its extensions
    result = peek.classify(bytes(hello))
    assert result.host is None and "malformed" in result.problem
    assert peek.classify(b"\x16\x03\x01\x00\x00").problem  # an empty record is no hello


@pytest.mark.parametrize("head,host", [
    (b"GET / HTTP/1.1\r\nHost: pypi.org\r\nAccept: */*\r\n\r\n", "pypi.org"),
    (b"GET /simple/ HTTP/1.1\r\nhost: PyPI.org:8080\r\n\r\n", "PyPI.org"),
    (b"GET http://evil.example/x HTTP/1.1\r\nHost: pypi.org\r\n\r\n", "evil.example"),  # servers obey the URL
    (b"CONNECT evil.example:443 HTTP/1.1\r\nHost: pypi.org\r\n\r\n", "evil.example"),
    (b"GET / HTTP/1.1\r\nHost: [2001:db8::7]:80\r\n\r\n", "2001:db8::7"),
    (b"GET / HTTP/1.0\r\n\r\n", None),
])
def test_host_of_an_http_request(head, host):
    assert peek.classify(head) == peek.FirstBytes("http", host=host)
    with pytest.raises(peek.NeedMore):
        peek.classify(head[:-2])


def test_ambiguous_http_heads_are_problems():
    assert peek.classify(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n").problem == "two Host headers"
    assert peek.classify(b"GET / HTTP/1.1\r\nHost : a\r\n\r\n").problem == "malformed header"
    assert peek.classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").problem  # h2c prior knowledge: no Host to check


def test_other_protocols_are_other():
    assert peek.classify(b"SSH-2.0-OpenSSH_9.2\r\n").protocol == "other"
    assert peek.classify(b"EHLO client.example\r\n").protocol == "other"  # decided at the end of its line
    with pytest.raises(peek.NeedMore):
        peek.classify(b"EHLO client.example")
    assert peek.classify(b"*1\r\n$4\r\nPING\r\n").protocol == "other"
    assert peek.same_host("PyPI.org.", "pypi.org") and not peek.same_host(None, "pypi.org")


def _ok(outcome):
    forward, problem = outcome
    assert problem is None, problem
    return forward


def test_every_request_of_a_plaintext_connection_is_checked():
    check = peek.HttpRequests("www.example.com")
    # a body is data (one that IS a request is refused: test_net_hostile, desync)
    hidden = b'{"log": "GET / HTTP/1.1\\r\\nHost: evil.example"}'
    head = b"POST /a HTTP/1.1\r\nHost: www.example.com\r\nContent-Length: %d\r\n\r\n" % len(hidden)
    assert _ok(check.feed(head)) == head
    assert _ok(check.feed(hidden)) == hidden
    chunked = b"PUT /b HTTP/1.1\r\nHost: www.example.com\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    _ok(check.feed(chunked + b"GET /c HTTP/1.1\r\nHost: www.example.com\r\n\r\nGET /d HTT"))
    assert check.feed(b"P/1.1\r\nHost: evil.example\r\n\r\n")[1].startswith("host-mismatch")
    assert check.requests == 4


def test_absolute_urls_and_missing_hosts_in_later_requests():
    check = peek.HttpRequests("www.example.com")
    _ok(check.feed(b"GET / HTTP/1.1\r\nHost: www.example.com\r\n\r\n"))
    assert "evil.example" in check.feed(b"GET http://evil.example/ HTTP/1.1\r\nHost: www.example.com\r\n\r\n")[1]
    assert "malformed" in peek.HttpRequests("a.example").feed(b"GET / HTTP/1.1\r\n\r\n")[1]


UPGRADE = b"GET /ws HTTP/1.1\r\nHost: www.example.com\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"


def test_after_an_accepted_upgrade_the_stream_is_another_protocol():
    ws = peek.HttpRequests("www.example.com")
    assert _ok(ws.feed(UPGRADE + b"\x81\x05early")) == UPGRADE  # what follows waits for the answer
    assert _ok(ws.feed(b"\x81\x05later")) == b""
    assert _ok(ws.response(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")) == b"\x81\x05early\x81\x05later"
    assert ws.opaque and _ok(ws.feed(b"GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n"))  # websocket bytes now


def test_a_declined_upgrade_cannot_smuggle_a_request_for_another_host():
    ws = peek.HttpRequests("www.example.com")
    assert _ok(ws.feed(UPGRADE)) == UPGRADE
    assert _ok(ws.feed(b"GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n")) == b""  # held
    forward, problem = ws.response(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert forward == b"" and problem.startswith("host-mismatch") and not ws.opaque
    honest = peek.HttpRequests("www.example.com")
    _ok(honest.feed(UPGRADE))
    _ok(honest.feed(b"GET /next HTTP/1.1\r\nHost: www.example.com\r\n\r\n"))
    assert b"/next" in _ok(honest.response(b"HTTP/1.1 400 Bad Request\r\n\r\n"))
