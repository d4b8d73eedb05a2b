"""Sniffing names from first bytes: real ClientHellos, HTTP requests, garbage."""

from __future__ import annotations

import ssl
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egressd.proxy.sniff import (
    INCOMPLETE,
    MALFORMED,
    MAX_CLIENT_HELLO,
    MAX_HTTP_HEAD,
    NO_HOST,
    NO_SNI,
    NOT_HTTP,
    NOT_TLS,
    OK,
    TOO_LARGE,
    ClientHelloReader,
    HostResult,
    HttpHeadReader,
    SniResult,
    classify_first_bytes,
    pending_kind,
    sniff_http_host,
    sniff_tls_sni,
)
from tests.support import tls_hellos


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
        # HTTP the proxy cannot read is refused, not waved through as "not HTTP".
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", MALFORMED, None),
        (b"GET / HTTP/2\r\nHost: a.test\r\n\r\n", MALFORMED, None),
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
    data = b"GET / HTTP/1.1\r\nX: " + b"a" * (MAX_HTTP_HEAD + 10)
    assert sniff_http_host(data).status == TOO_LARGE
    assert sniff_http_host(data[:20000]).status == INCOMPLETE  # 16 KiB is no bound any more


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
        (b"get / HTTP/1.1", "http"),  # a method is any token: Go serves "get"
        (b"SSH-2.0", "incomplete"),  # a token so far; "SSH-2.0-x y\r\n" is then not HTTP
        (b"\r\nGET / HTTP/1.1", "http"),  # empty lines before the request line
        (b"\x80\x2e\x01\x03\x01", "tls"),  # an SSLv2-compatible ClientHello
        (b"\x80\x2e", "incomplete"),
        (b"\x80\x2e\x02", "unknown"),
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
        assert result.status in {
            OK,
            INCOMPLETE,
            TOO_LARGE,
            NOT_TLS,
            NOT_HTTP,
            MALFORMED,
            NO_SNI,
            NO_HOST,
        }
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
    assert result.status in {OK, INCOMPLETE, TOO_LARGE, NOT_TLS, MALFORMED, NO_SNI}


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.binary(max_size=200))
def test_fuzz_http_like(head: bytes, tail: bytes) -> None:
    data = b"GET / HTTP/1.1\r\n" + head + b"\r\nHost: " + tail + b"\r\n\r\n"
    result = sniff_http_host(data)
    assert result.status in {OK, MALFORMED, NO_HOST, INCOMPLETE}
    assert result == HttpHeadReader().update(data)


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


# --- reassembly, bounds, ECH (fail closed: issue 15) ----------------------------------


def feed_bytewise(reader: ClientHelloReader | HttpHeadReader, data: bytes) -> list[str]:
    """Statuses seen feeding `data` one byte at a time into one growing buffer."""
    buf = bytearray()
    seen = []
    for byte in data:
        buf.append(byte)
        seen.append(reader.update(buf).status)
    return seen


def test_post_quantum_hello_of_3kb() -> None:
    data = tls_hellos.client_hello("api.allowed.test")
    assert 2500 < len(data) < 3500
    assert sniff_tls_sni(data) == SniResult(OK, "api.allowed.test")


def test_many_one_byte_records_in_linear_time() -> None:
    """A ClientHello of ~60 KB in 1-byte records, arriving a byte at a time:
    each byte is looked at a bounded number of times, no rescan per segment."""
    data = tls_hellos.client_hello("evil.test", total=60_000, record_size=1)
    started = time.perf_counter()
    seen = feed_bytewise(ClientHelloReader(), data)
    elapsed = time.perf_counter() - started
    assert seen[-1] == OK and set(seen[:-1]) == {INCOMPLETE}
    assert elapsed < 5.0, elapsed  # ~0.3 s; a rescan per byte would take minutes
    assert sniff_tls_sni(data).host == "evil.test"


@pytest.mark.parametrize("record_size", [tls_hellos.RECORD, 4000, 700])
def test_client_hello_bound_counts_bytes_read(record_size: int) -> None:
    at = tls_hellos.client_hello("evil.test", total=MAX_CLIENT_HELLO, record_size=record_size)
    assert sniff_tls_sni(at) == SniResult(OK, "evil.test")
    over = tls_hellos.client_hello("evil.test", total=MAX_CLIENT_HELLO + 1, record_size=record_size)
    assert sniff_tls_sni(over).status == TOO_LARGE
    # Over the bound is known from the record headers, before the bytes arrive.
    reader = ClientHelloReader()
    first_too_large = feed_bytewise(reader, over).index(TOO_LARGE)
    assert first_too_large < len(over) - 100, (first_too_large, len(over))


def test_declared_length_past_the_bound_is_too_large_at_once() -> None:
    header = b"\x16\x03\x01\x40\x00" + b"\x01" + (200_000).to_bytes(3, "big")
    assert sniff_tls_sni(header).status == TOO_LARGE
    assert sniff_tls_sni(header[:8]).status == INCOMPLETE


def test_padded_past_16k_still_read() -> None:
    data = tls_hellos.client_hello("evil.test", total=20_000)
    assert sniff_tls_sni(data[: 16 * 1024]).status == INCOMPLETE
    assert sniff_tls_sni(data).host == "evil.test"


def test_reader_agrees_with_one_shot_on_every_split() -> None:
    data = hello_with_extensions(sni_ext((0, b"split.allowed.test")), record_split=7)
    for cut in range(1, len(data)):
        reader = ClientHelloReader()
        assert reader.update(data[:cut]).status == INCOMPLETE
        assert reader.update(data).host == "split.allowed.test", cut
        assert reader.update(data + b"more").host == "split.allowed.test"  # final stays final


def test_ech_is_flagged_with_the_outer_sni() -> None:
    data = tls_hellos.client_hello("public.front.test", ech=True)
    assert sniff_tls_sni(data) == SniResult(OK, "public.front.test", ech=True)
    bare = hello_with_extensions(ext(0xFE0D, b"\x00\x00\x01\x00\x01\x07\x00\x00\x00\x00"))
    assert sniff_tls_sni(bare) == SniResult(NO_SNI, None, ech=True)
    assert sniff_tls_sni(tls_hellos.client_hello("a.test")).ech is False


def test_sslv2_compatible_hello_is_malformed() -> None:
    # msg_type 1, version 3.1, cipher specs, no extensions: nothing to read a name from.
    body = b"\x01\x03\x01\x00\x03\x00\x00\x00\x10" + b"\x00\x00\x2f" + b"\x22" * 16
    data = bytes([0x80 | (len(body) >> 8), len(body) & 0xFF]) + body
    assert classify_first_bytes(data) == "tls"
    assert sniff_tls_sni(data).status == MALFORMED


@pytest.mark.parametrize(
    ("data", "kind"),
    [(b"", "unknown"), (b"\x16", "tls"), (b"\x80\x2e", "tls"), (b"GE", "http"), (b"SSH-2", "http")],
)
def test_pending_kind(data: bytes, kind: str) -> None:
    assert pending_kind(data) == kind


@pytest.mark.parametrize(
    ("data", "status", "host", "port"),
    [
        (b"CONNECT evil.test:443 HTTP/1.1\r\n\r\n", OK, "evil.test", 443),
        (b"CONNECT Evil.Test:443 HTTP/1.1\r\nHost: evil.test:443\r\n\r\n", OK, "evil.test", 443),
        (b"CONNECT evil.test:443 HTTP/1.1\r\nHost: evil.test\r\n\r\n", OK, "evil.test", 443),
        (b"CONNECT 203.0.113.66:22 HTTP/1.1\r\n\r\n", OK, "203.0.113.66", 22),
        # The tunnel's target is the claim: a Host naming anything else is refused.
        (
            b"CONNECT evil.test:443 HTTP/1.1\r\nHost: api.allowed.test\r\n\r\n",
            MALFORMED,
            None,
            None,
        ),
        (b"CONNECT evil.test:443 HTTP/1.1\r\nHost: evil.test:80\r\n\r\n", MALFORMED, None, None),
        (b"CONNECT evil.test HTTP/1.1\r\nHost: evil.test\r\n\r\n", MALFORMED, None, None),
        (b"CONNECT evil.test:0 HTTP/1.1\r\n\r\n", MALFORMED, None, None),
        (b"CONNECT evil.test:70000 HTTP/1.1\r\n\r\n", MALFORMED, None, None),
        (b"CONNECT u@evil.test:443 HTTP/1.1\r\n\r\n", MALFORMED, None, None),
        (b"CONNECT http://evil.test:443/ HTTP/1.1\r\n\r\n", MALFORMED, None, None),
        # Absolute form: the target decides, with its port; a Host naming another host is refused.
        (b"GET http://evil.test/ HTTP/1.1\r\n\r\n", OK, "evil.test", None),
        (b"GET http://evil.test:8080/x HTTP/1.1\r\nHost: evil.test\r\n\r\n", OK, "evil.test", 8080),
        (
            b"GET http://evil.test/ HTTP/1.1\r\nHost: api.allowed.test\r\n\r\n",
            MALFORMED,
            None,
            None,
        ),
        # Readable but unusual forms.
        (b"\r\n\r\nGET / HTTP/1.1\r\nHost: a.test\r\n\r\n", OK, "a.test", None),
        (b"get / HTTP/1.1\r\nHost: a.test\r\n\r\n", OK, "a.test", None),
        (b"OPTIONS * HTTP/1.1\r\nHost: a.test\r\n\r\n", OK, "a.test", None),
        # HTTP that cannot be read is never "not HTTP".
        (b"GET / HTTP/1.2\r\nHost: a.test\r\n\r\n", MALFORMED, None, None),
        (b"GET / http/1.1\r\nHost: a.test\r\n\r\n", MALFORMED, None, None),
        (b"GET /index.html\r\n", MALFORMED, None, None),  # HTTP/0.9
        (b"GET a.test:80 HTTP/1.1\r\nHost: a.test\r\n\r\n", MALFORMED, None, None),
        (b"GET / HTTP/1.1\r\nHost: a.test\n\r\n", MALFORMED, None, None),  # bare LF, early
        (b"GET / HTTP/1.1\r\nHost: a.test\r\n\n", MALFORMED, None, None),
        # Text protocols that merely start like a request line.
        (b"SET key value\r\n", NOT_HTTP, None, None),
        (b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n", NOT_HTTP, None, None),
    ],
)
def test_http_targets(data: bytes, status: str, host: str | None, port: int | None) -> None:
    result = sniff_http_host(data)
    assert (result.status, result.host, result.port) == (status, host, port)
    assert result == HttpHeadReader().update(data)


def test_http_head_bound_exactly() -> None:
    request = b"GET / HTTP/1.1\r\nHost: evil.test\r\nX-Pad: "
    at = request + b"a" * (MAX_HTTP_HEAD - len(request) - 4) + b"\r\n\r\n"
    assert len(at) == MAX_HTTP_HEAD
    assert sniff_http_host(at) == HostResult(OK, "evil.test")
    over = request + b"a" * (MAX_HTTP_HEAD - len(request) - 3) + b"\r\n\r\n"
    assert sniff_http_host(over).status == TOO_LARGE
    assert sniff_http_host(over[:MAX_HTTP_HEAD]).status == TOO_LARGE
    assert sniff_http_host(over[: MAX_HTTP_HEAD - 1]).status == INCOMPLETE


def test_http_head_bytewise_in_linear_time() -> None:
    lines = b"".join(b"X-%d: %s\r\n" % (i, b"v" * 50) for i in range(1000))
    data = b"GET / HTTP/1.1\r\n" + lines + b"Host: evil.test\r\n\r\n"
    started = time.perf_counter()
    seen = feed_bytewise(HttpHeadReader(), data)
    assert time.perf_counter() - started < 5.0
    assert seen[-1] == OK and set(seen[:-1]) == {INCOMPLETE}


def test_second_host_header_fails_before_the_head_ends() -> None:
    reader = HttpHeadReader()
    assert reader.update(b"GET / HTTP/1.1\r\nHost: a.test\r\n").status == INCOMPLETE
    assert reader.update(b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n").status == MALFORMED


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_incremental_equals_one_shot(data: st.DataObject) -> None:
    """Fed in any chunks, the readers end where the one-shot parse of the whole ends."""
    base = bytearray(
        data.draw(
            st.sampled_from(
                [
                    client_hello("api.allowed.test"),
                    hello_with_extensions(sni_ext((0, b"a.test")), record_split=9),
                    b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test\r\n\r\n",
                    b"\r\nGET http://a.test/ HTTP/1.1\r\nX: y\r\nHost: a.test\r\n\r\nbody",
                ]
            )
        )
    )
    for _ in range(data.draw(st.integers(0, 4))):
        base[data.draw(st.integers(0, len(base) - 1))] = data.draw(st.integers(0, 255))
    cuts = sorted(data.draw(st.lists(st.integers(1, len(base)), max_size=8)))
    for reader, one_shot in (
        (ClientHelloReader(), sniff_tls_sni(bytes(base))),
        (HttpHeadReader(), sniff_http_host(bytes(base))),
    ):
        for cut in [*cuts, len(base)]:
            result = reader.update(base[:cut])
        assert result == one_shot
