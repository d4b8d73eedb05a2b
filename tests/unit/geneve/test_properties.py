"""Properties: encode/decode round-trip, and decode of any bytes fails only with GeneveError."""

from __future__ import annotations

import struct

from hypothesis import example, given, settings
from hypothesis import strategies as st

from egressd.geneve import (
    DECODE_REASONS,
    JOB_OPTION_CLASS,
    GeneveError,
    GeneveOption,
    GenevePacket,
    JobOption,
    decode,
    encode,
    header_for,
)
from egressd.geneve.codec import _decode_general

jobs = st.builds(JobOption, st.binary(min_size=16, max_size=16), st.binary(min_size=8, max_size=8))
vnis = st.integers(min_value=0, max_value=0xFFFFFF)


@st.composite
def ipv4_packets(draw: st.DrawFn) -> bytes:
    """A well-formed IPv4 packet: any IHL, correct total length and header checksum."""
    ihl = draw(st.integers(min_value=5, max_value=15))
    ip_options = draw(st.binary(min_size=(ihl - 5) * 4, max_size=(ihl - 5) * 4))
    payload = draw(st.binary(max_size=300))
    fields = (
        0x40 | ihl,
        draw(st.integers(0, 0xFF)),  # TOS
        ihl * 4 + len(payload),
        draw(st.integers(0, 0xFFFF)),  # id
        draw(st.integers(0, 0xFFFF)),  # flags + fragment offset
        draw(st.integers(0, 0xFF)),  # TTL
        draw(st.integers(0, 0xFF)),  # protocol
        0,  # checksum, filled below
        draw(st.binary(min_size=4, max_size=4)),
        draw(st.binary(min_size=4, max_size=4)),
    )
    head = struct.pack("!BBHHHBBH4s4s", *fields) + ip_options
    return head[:10] + struct.pack("!H", inet_checksum(head)) + head[12:] + payload


def inet_checksum(data: bytes) -> int:
    """RFC 1071, the slow obvious way, as the reference for the codec's shortcut."""
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@st.composite
def extra_options(draw: st.DrawFn) -> list[GeneveOption]:
    """Non-critical options that fit next to the job option (<= 224 bytes together)."""
    options: list[GeneveOption] = []
    room = 252 - 28
    for _ in range(draw(st.integers(0, 6))):
        if room < 4:
            break
        words = draw(st.integers(0, min(31, room // 4 - 1)))
        opt_class = draw(st.integers(0, 0xFFFF).filter(lambda c: c != JOB_OPTION_CLASS))
        data = draw(st.binary(min_size=words * 4, max_size=words * 4))
        options.append(GeneveOption(opt_class, draw(st.integers(0, 0x7F)), data))
        room -= 4 + words * 4
    return options


@st.composite
def valid_datagrams(draw: st.DrawFn) -> bytes:
    return encode(
        draw(vnis),
        draw(jobs),
        draw(ipv4_packets()),
        options=draw(extra_options()),
        oam=draw(st.booleans()),
    )


def decode_or_reason(buf: bytes) -> GenevePacket | str:
    try:
        return decode(buf)
    except GeneveError as exc:
        assert exc.reason in DECODE_REASONS
        return exc.reason


def general_or_reason(buf: bytes) -> GenevePacket | str:
    try:
        return _decode_general(memoryview(buf))
    except GeneveError as exc:
        return exc.reason


def check_invariants(buf: bytes, pkt: GenevePacket) -> None:
    """What every accepted datagram guarantees to the proxy."""
    inner = bytes(pkt.inner)
    header_len = (inner[0] & 0x0F) * 4
    assert inner[0] >> 4 == 4 and header_len >= 20
    assert int.from_bytes(inner[2:4], "big") == len(inner) >= header_len
    assert inet_checksum(inner[:header_len]) == 0
    assert inner in buf
    assert len(pkt.job.job_id) == 16 and len(pkt.job.digest) == 8
    assert all(not opt.opt_type & 0x80 for opt in pkt.options)


@given(vnis, jobs, ipv4_packets(), extra_options(), st.booleans())
def test_round_trip(
    vni: int, job: JobOption, inner: bytes, options: list[GeneveOption], oam: bool
) -> None:
    buf = encode(vni, job, inner, options=options, oam=oam)
    pkt = decode(buf)
    assert pkt.vni == vni
    assert pkt.job == job
    assert pkt.options == tuple(options)
    assert pkt.oam is oam
    assert pkt.critical is True  # the job option is critical
    assert bytes(pkt.inner) == inner
    assert pkt == _decode_general(memoryview(buf))
    check_invariants(buf, pkt)


@given(vnis, jobs, ipv4_packets(), st.binary(max_size=64))
def test_hot_path_prefix_and_trailing_bytes(
    vni: int, job: JobOption, inner: bytes, trailer: bytes
) -> None:
    pkt = decode(bytearray(header_for(vni, job) + inner + trailer))
    assert (pkt.vni, pkt.job, bytes(pkt.inner)) == (vni, job, inner)


@settings(max_examples=500)
@given(st.binary(max_size=400))
@example(b"")
@example(b"\x07\x40\x08\x00\x00\x00\x01\x00")
def test_arbitrary_bytes_raise_only_geneve_error(buf: bytes) -> None:
    result = decode_or_reason(buf)
    assert result == general_or_reason(buf)
    if isinstance(result, GenevePacket):
        check_invariants(buf, result)


@st.composite
def mutated_datagrams(draw: st.DrawFn) -> bytes:
    buf = bytearray(draw(valid_datagrams()))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
        pos = draw(st.integers(0, max(0, len(buf) - 1)))
        if kind == "flip" and buf:
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and buf:
            buf[pos] = draw(st.integers(0, 0xFF))
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del buf[pos : pos + draw(st.integers(1, 8))]
    return bytes(buf)


@settings(max_examples=500)
@given(mutated_datagrams())
def test_mutated_datagrams_raise_only_geneve_error(buf: bytes) -> None:
    result = decode_or_reason(buf)
    assert result == general_or_reason(buf)
    if isinstance(result, GenevePacket):
        check_invariants(buf, result)


@given(valid_datagrams(), st.integers(0, 55))
def test_header_byte_mutations_decide_the_same_on_both_paths(buf: bytes, pos: int) -> None:
    # Every byte the fast path reads, changed: the fast path must accept only what
    # the general parser accepts, and reject with the general parser's reason.
    for value in (0x00, 0xFF, buf[pos % len(buf)] ^ 0x80):
        mutant = bytearray(buf)
        mutant[pos % len(buf)] = value
        assert decode_or_reason(bytes(mutant)) == general_or_reason(bytes(mutant))
