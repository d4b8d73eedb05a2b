"""Sniffing names from first bytes: real ClientHellos, HTTP requests, garbage."""

from __future__ import annotations

import ssl
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egressd.proxy.sniff import (
    INCOMPLETE,
    MALFORMED,
    NO_HOST,
    NO_SNI,
    NOT_HTTP,
    NOT_TLS,
    OK,
    classify_first_bytes,
    sniff_http_host,
    sniff_tls_sni,
)


def client_hello(server_hostname: str | None, *, tls13_only: bool = False) -> bytes:
    """The bytes Python's ssl module sends first, as a real client would."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if tls13_only:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def hello_with_extensions(extensions: bytes, *, record_split: int | None = None) -> bytes:
    """A hand-built ClientHello (TLS 1.2 layout) around `extensions`."""
    body = (
        b"\x03\x03"
        + b"\x11" * 32
        + b"\x00"  # session id
        + b"\x00\x02\x13\x01"  # one cipher suite
        + b"\x01\x00"  # null compression
        + struct.pack("!H", len(extensions))
        + extensions
    )
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    if record_split is None:
        return b"\x16\x03\x01" + struct.pack("!H", len(handshake)) + handshake
    first, second = handshake[:record_split], handshake[record_split:]
    return (
        b"\x16\x03\x01"
        + struct.pack("!H", len(first))
        + first
        + b"\x16\x03\x01"
        + struct.pack("!H", len(second))
        + second
    )


def sni_ext(*names: tuple[int, bytes]) -> bytes:
    entries = b"".join(bytes([t]) + struct.pack("!H", len(n)) + n for t, n in names)
    data = struct.pack("!H", len(entries)) + entries
    return struct.pack("!HH", 0, len(data)) + data


def ext(ext_type: int, data: bytes = b"") -> bytes:
    return struct.pack("!HH", ext_type, len(data)) + data


# --- TLS ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["api.allowed.test", "EU.Data.Allowed.Test", "x" * 60 + ".test"])
@pytest.mark.parametrize("tls13_only", [False, True])
def test_real_client_hello(name: str, tls13_only: bool) -> None:
    data = client_hello(name, tls13_only=tls13_only)
    assert classify_first_bytes(data) == "tls"
    assert sniff_tls_sni(data) == sniff_tls_sni(data + b"\x17\x03\x03\x00\x01x")
    result = sniff_tls_sni(data)
    assert result.status == OK
    assert result.host == name.lower()


def test_client_hello_without_sni() -> None:
    # Python sends no SNI for an IP address (RFC 6066 forbids literals).
    assert sniff_tls_sni(client_hello("203.0.113.10")).status == NO_SNI
    assert sniff_tls_sni(client_hello(None)).status == NO_SNI


def test_every_truncation_is_incomplete() -> None:
    data = client_hello("api.allowed.test")
    for end in range(len(data)):
        result = sniff_tls_sni(data[:end])
        assert result.status == INCOMPLETE, end
        assert result.host is None


def test_hello_fragmented_over_records() -> None:
    exts = sni_ext((0, b"frag.allowed.test")) + ext(0x000A, b"\x00\x02\x00\x1d")
    for split in (1, 3, 4, 10, 50):
        data = hello_with_extensions(exts, record_split=split)
        assert sniff_tls_sni(data).host == "frag.allowed.test", split
        for end in range(len(data)):
            assert sniff_tls_sni(data[:end]).status == INCOMPLETE, (split, end)


def test_real_hello_refragmented() -> None:
    data = client_hello("api.allowed.test")
    handshake = data[5:]
    pieces = [handshake[i : i + 100] for i in range(0, len(handshake), 100)]
    records = b"".join(b"\x16\x03\x03" + struct.pack("!H", len(p)) + p for p in pieces)
    assert sniff_tls_sni(records).host == "api.allowed.test"


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET / HTTP/1.1\r\n", NOT_TLS),
        (b"\x17\x03\x03\x00\x05hello", NOT_TLS),
        (b"\x16\x02\x00", NOT_TLS),
        (b"\x16\x03\x01\x00\x00", MALFORMED),  # empty record
        (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", MALFORMED),  # ServerHello
        (hello_with_extensions(sni_ext((0, b"a.test"), (0, b"b.test"))), MALFORMED),
        (hello_with_extensions(sni_ext((0, b"a.test")) + sni_ext((0, b"a.test"))), MALFORMED),
        (hello_with_extensions(sni_ext((0, b"bad host.test"))), MALFORMED),
        (hello_with_extensions(sni_ext((0, b"caf\xc3\xa9.test"))), MALFORMED),
        (hello_with_extensions(sni_ext((0, b""))), MALFORMED),
        (hello_with_extensions(b"\x00\x00\x00\x05\x00\x03\x00\x00\x00"), MALFORMED),  # lens lie
        (hello_with_extensions(ext(0x000A, b"\x00\x02\x00\x1d")), NO_SNI),
        (hello_with_extensions(ext(0)), NO_SNI),  # empty server_name
        (hello_with_extensions(sni_ext((1, b"other-type"))), NO_SNI),
    ],
)
def test_tls_statuses(data: bytes, status: str) -> None:
    assert sniff_tls_sni(data).status == status


def test_sni_trailing_dot_and_case() -> None:
    data = hello_with_extensions(sni_ext((1, b"skipped"), (0, b"API.Allowed.TEST.")))
    assert sniff_tls_sni(data).host == "api.allowed.test"


def test_trailing_handshake_bytes_in_record_are_malformed() -> None:
    data = bytearray(hello_with_extensions(sni_ext((0, b"a.test"))))
    data += b"\x0b\x00\x00\x00"
    length = struct.unpack("!H", data[3:5])[0] + 4
    data[3:5] = struct.pack("!H", length)
    assert sniff_tls_sni(bytes(data)).status == MALFORMED


# --- HTTP -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "status", "host"),
    [
        (b"GET / HTTP/1.1\r\nHost: api.allowed.test\r\n\r\n", OK, "api.allowed.test"),
        (b"GET / HTTP/1.1\r\nhOsT:API.Allowed.Test:8080 \r\n\r\n", OK, "api.allowed.test"),
        (b"POST /x HTTP/1.0\r\nContent-Length: 3\r\nHost: a.test.\r\n\r\nabc", OK, "a.test"),
        (b"GET / HTTP/1.1\r\nHost: 203.0.113.10:80\r\n\r\n", OK, "203.0.113.10"),
        (b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n", OK, "[2001:db8::1]"),
        (b"GET http://a.test/x HTTP/1.1\r\nHost: a.test\r\n\r\n", OK, "a.test"),
        (b"GET http://a.test:81/x HTTP/1.1\r\n\r\n", OK, "a.test"),
        (b"GET / HTTP/1.0\r\n\r\n", NO_HOST, None),
        (b"GET / HTTP/1.1\r\nHost:\r\n\r\n", NO_HOST, None),
        (b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: a.test\r\n\r\n", MALFORMED, None),
        (b"GET / HTTP/1.1\r\nHost: a.test\r\nhost: b.test\r\n\r\n", MALFORMED, None),
        (b"GET / HTTP/1.1\r\nHost : a.test\r\n\r\n", MALFORMED, None),
        (b"GET / HTTP/1.1\r\nX: y\r\n folded\r\nHost: a.test\r\n\r\n", MALFORMED, None),
        (b"GET / HTTP/1.1\r\nno colon\r\n\r\n", MALFORMED, None),
        (b"GET / HTTP/1.1\r\nHost: a.test:http\r\n\r\n", MALFORMED, None),
        (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", MALFORMED, None),
        (b"GET http://b.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n", MALFORMED, None),
        (b"GET http://u@a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n", MALFORMED, None),
        (b"GET / HTTP/1.1\nHost: a.test\n\n", MALFORMED, None),
        (b"GET  / HTTP/1.1\r\nHost: a.test\r\n\r\n", MALFORMED, None),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", NOT_HTTP, None),
        (b"GET / HTTP/2\r\nHost: a.test\r\n\r\n", NOT_HTTP, None),
        (b"SSH-2.0-OpenSSH_9.2\r\n", NOT_HTTP, None),
        (b"\x16\x03\x01\x02\x00\x01", NOT_HTTP, None),
        (b"GET / HTTP/1.1\r\nHost: a.test\r\n", INCOMPLETE, None),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nAccept", MALFORMED, None),
        (b"GE", INCOMPLETE, None),
        (b"", INCOMPLETE, None),
    ],
)
def test_http_host(data: bytes, status: str, host: str | None) -> None:
    result = sniff_http_host(data)
    assert (result.status, result.host) == (status, host)


def test_http_every_truncation_is_incomplete() -> None:
    data = (
        b"GET /path?q=1 HTTP/1.1\r\nUser-Agent: x\r\nHost: api.allowed.test\r\nAccept: */*\r\n\r\n"
    )
    for end in range(len(data) - 1):
        assert sniff_http_host(data[:end]).status == INCOMPLETE, data[:end]
    assert sniff_http_host(data).host == "api.allowed.test"


def test_http_headers_too_large() -> None:
    data = b"GET / HTTP/1.1\r\nX: " + b"a" * 20000
    assert sniff_http_host(data).status == MALFORMED
    assert sniff_http_host(data[:1000]).status == INCOMPLETE


# --- classification -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"", "incomplete"),
        (b"\x16", "incomplete"),
        (b"\x16\x03", "tls"),
        (b"\x16\x01", "unknown"),
        (b"G", "incomplete"),
        (b"GET", "incomplete"),
        (b"GET ", "http"),
        (b"OPTIONS * HTTP/1.1", "http"),
        (b"get / HTTP/1.1", "unknown"),
        (b"SSH-2.0", "unknown"),
        (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", "unknown"),  # PostgreSQL SSLRequest
        (b"A" * 40, "unknown"),
    ],
)
def test_classify(data: bytes, kind: str) -> None:
    assert classify_first_bytes(data) == kind


# --- never raise ----------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2048))
def test_fuzz_never_raises(data: bytes) -> None:
    for result in (sniff_tls_sni(data), sniff_http_host(data)):
        assert result.status in {OK, INCOMPLETE, NOT_TLS, NOT_HTTP, MALFORMED, NO_SNI, NO_HOST}
        assert (result.host is not None) == (result.status == OK)
    assert classify_first_bytes(data) in {"tls", "http", "unknown", "incomplete"}


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_mutated_client_hello(data: st.DataObject) -> None:
    base = bytearray(client_hello("api.allowed.test"))
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(base) - 1))
        base[pos] = data.draw(st.integers(0, 255))
    result = sniff_tls_sni(bytes(base))
    assert result.status in {OK, INCOMPLETE, NOT_TLS, MALFORMED, NO_SNI}


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.binary(max_size=200))
def test_fuzz_http_like(head: bytes, tail: bytes) -> None:
    data = b"GET / HTTP/1.1\r\n" + head + b"\r\nHost: " + tail + b"\r\n\r\n"
    result = sniff_http_host(data)
    assert result.status in {OK, MALFORMED, NO_HOST, INCOMPLETE}


def test_scapy_client_hello() -> None:
    """An independent encoder (scapy's TLS layer) as an oracle."""
    tls = pytest.importorskip("scapy.layers.tls.all")
    hello = tls.TLS(
        msg=[
            tls.TLSClientHello(
                ext=[
                    tls.TLS_Ext_SupportedGroups(groups=["x25519"]),
                    tls.TLS_Ext_ServerName(
                        servernames=[tls.ServerName(servername=b"Scapy.Allowed.Test")]
                    ),
                ]
            )
        ]
    )
    data = bytes(hello)
    assert sniff_tls_sni(data).host == "scapy.allowed.test"
    assert {sniff_tls_sni(data[:end]).status for end in range(len(data))} == {INCOMPLETE}
