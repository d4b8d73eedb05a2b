"""Golden bytes, every rejection reason, and the zero-copy contract of the codec."""

from __future__ import annotations

import array
import struct
import uuid

import pytest

from egressd.errors import EgressdError
from egressd.geneve import (
    DECODE_REASONS,
    GENEVE_PORT,
    JOB_OPTION_CLASS,
    JOB_OPTION_TYPE,
    PROTO_IPV4,
    PROTO_IPV6,
    GeneveError,
    GeneveOption,
    JobOption,
    decode,
    encode,
    header_for,
)

JOB_UUID = uuid.UUID("2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2")
JOB = JobOption(JOB_UUID.bytes, bytes.fromhex("0102030405060708"))

# IPv4/UDP 100.96.1.5:40000 -> 203.0.113.10:53, id 1, ttl 64, no payload.
GOLDEN_INNER = bytes.fromhex(
    "4500001c 00010000 4011d960 64600105 cb00710a"  # IPv4 header, checksum 0xd960
    "9c400035 0008c1f8"  # UDP header
)
# Written by hand from RFC 8926 section 3.
GOLDEN = (
    bytes.fromhex(
        "07"  # version 0, Opt Len 7 words (28 bytes)
        "40"  # O=0, C=1
        "0800"  # protocol IPv4
        "000001 00"  # VNI 1, reserved
        "ff01 81 06"  # class 0xFF01, type 0x81 (critical), length 6 words
        "2b5c1c647c1e4a9a9f551f0c5ac1d3e2"  # job id
        "0102030405060708"  # policy digest
    )
    + GOLDEN_INNER
)


def ipv4(payload: bytes = b"", *, options: bytes = b"", proto: int = 17) -> bytes:
    """A well-formed IPv4 packet with a correct header checksum."""
    ihl = 5 + len(options) // 4
    total = ihl * 4 + len(payload)
    head = (
        struct.pack(
            "!BBHHHBBH4s4s",
            0x40 | ihl,
            0,
            total,
            7,
            0,
            64,
            proto,
            0,
            bytes([100, 96, 1, 5]),
            bytes([203, 0, 113, 10]),
        )
        + options
    )
    return head[:10] + struct.pack("!H", inet_checksum(head)) + head[12:] + payload


def inet_checksum(data: bytes) -> int:
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def raw_option(opt_class: int, opt_type: int, data: bytes, length: int | None = None) -> bytes:
    words = len(data) // 4 if length is None else length
    return struct.pack("!HBB", opt_class, opt_type, words) + data


JOB_RAW = raw_option(JOB_OPTION_CLASS, JOB_OPTION_TYPE, JOB.job_id + JOB.digest)


def raw_geneve(
    options: bytes = JOB_RAW,
    inner: bytes = GOLDEN_INNER,
    *,
    version: int = 0,
    opt_words: int | None = None,
    flags: int = 0x40,
    proto: int = PROTO_IPV4,
    vni: int = 1,
) -> bytes:
    """A datagram with every header field under the test's control."""
    words = len(options) // 4 if opt_words is None else opt_words
    return struct.pack("!BBHI", version << 6 | words, flags, proto, vni << 8) + options + inner


def reason_of(buf: bytes | bytearray | memoryview) -> str:
    with pytest.raises(GeneveError) as info:
        decode(buf)
    return info.value.reason


# --- golden bytes ------------------------------------------------------------------------


def test_constants() -> None:
    assert (GENEVE_PORT, PROTO_IPV4, PROTO_IPV6) == (6081, 0x0800, 0x86DD)
    assert (JOB_OPTION_CLASS, JOB_OPTION_TYPE) == (0xFF01, 0x81)


def test_golden_inner_checksum_is_right() -> None:
    assert inet_checksum(GOLDEN_INNER[:20]) == 0
    assert inet_checksum(ipv4(options=b"\x01\x01\x01\x00")[:24]) == 0


def test_decode_golden() -> None:
    pkt = decode(GOLDEN)
    assert pkt.vni == 1
    assert pkt.protocol == PROTO_IPV4
    assert pkt.oam is False
    assert pkt.critical is True
    assert pkt.job == JOB
    assert pkt.job.job_uuid == JOB_UUID
    assert pkt.options == ()
    assert bytes(pkt.inner) == GOLDEN_INNER


def test_encode_golden() -> None:
    assert encode(1, JOB, GOLDEN_INNER) == GOLDEN


def test_header_for_is_the_constant_prefix() -> None:
    head = header_for(1, JOB)
    assert len(head) == 36
    assert head + GOLDEN_INNER == GOLDEN
    assert header_for(0xABCDEF, JOB)[4:8] == bytes.fromhex("abcdef00")


def test_encode_accepts_memoryview_inner() -> None:
    assert encode(1, JOB, memoryview(GOLDEN_INNER)) == GOLDEN


def test_decode_result_is_frozen() -> None:
    pkt = decode(GOLDEN)
    with pytest.raises(AttributeError):
        pkt.vni = 2  # type: ignore[misc]


# --- zero copy ---------------------------------------------------------------------------


def test_inner_is_a_view_of_bytes_input() -> None:
    pkt = decode(GOLDEN)
    assert isinstance(pkt.inner, memoryview)
    assert pkt.inner.obj is GOLDEN


def test_inner_shares_memory_with_bytearray() -> None:
    buf = bytearray(GOLDEN)
    pkt = decode(buf)
    buf[36 + 20] = 0xEE  # first byte of the inner UDP header
    assert pkt.inner[20] == 0xEE


def test_memoryview_input_shares_memory() -> None:
    backing = bytearray(b"\xaa" * 5 + GOLDEN)
    pkt = decode(memoryview(backing)[5:])
    assert pkt.job == JOB
    assert bytes(pkt.inner) == GOLDEN_INNER
    backing[-1] = 0x55
    assert pkt.inner[-1] == 0x55
    assert pkt.inner.obj is backing


def test_memoryview_of_other_item_format() -> None:
    words = array.array("H", GOLDEN + b"\x00" * (len(GOLDEN) % 2))
    pkt = decode(memoryview(words))
    assert bytes(pkt.inner) == GOLDEN_INNER


def test_non_contiguous_memoryview_is_decoded() -> None:
    doubled = bytes(b for byte in GOLDEN for b in (byte, 0))
    pkt = decode(memoryview(doubled)[::2])
    assert bytes(pkt.inner) == GOLDEN_INNER


# --- flags, options, inner shapes ----------------------------------------------------------


def test_oam_flag_round_trips() -> None:
    buf = encode(7, JOB, GOLDEN_INNER, oam=True)
    assert buf[1] == 0xC0  # O and C
    pkt = decode(buf)
    assert pkt.oam is True
    assert pkt.vni == 7


def test_extra_non_critical_option_is_kept() -> None:
    extra = GeneveOption(0x0102, 0x05, b"abcdefgh")
    buf = encode(1, JOB, GOLDEN_INNER, options=[extra])
    assert buf[0] == (28 + 12) // 4
    pkt = decode(buf)
    assert pkt.options == (extra,)
    assert pkt.job == JOB
    assert bytes(pkt.inner) == GOLDEN_INNER


def test_non_critical_option_before_job_option() -> None:
    opts = raw_option(0x0101, 0x01, b"") + JOB_RAW + raw_option(0xFFFF, 0x7F, b"1234")
    pkt = decode(raw_geneve(opts))
    assert pkt.job == JOB
    assert pkt.options == (GeneveOption(0x0101, 1, b""), GeneveOption(0xFFFF, 0x7F, b"1234"))


def test_job_class_with_non_critical_type_is_just_another_option() -> None:
    opts = JOB_RAW + raw_option(JOB_OPTION_CLASS, 0x01, b"zzzz")
    pkt = decode(raw_geneve(opts))
    assert pkt.options == (GeneveOption(JOB_OPTION_CLASS, 0x01, b"zzzz"),)


def test_reserved_bits_are_ignored_on_receipt() -> None:
    # RFC 8926: reserved fields MUST be ignored by the receiver.
    opts = (
        struct.pack("!HBB", JOB_OPTION_CLASS, JOB_OPTION_TYPE, 0xE0 | 6) + JOB.job_id + JOB.digest
    )
    buf = bytearray(raw_geneve(opts, flags=0x40 | 0x3F))
    buf[7] = 0xFF
    pkt = decode(bytes(buf))
    assert pkt.job == JOB
    assert pkt.vni == 1


def test_critical_flag_reflects_the_header() -> None:
    assert decode(raw_geneve(flags=0)).critical is False


def test_inner_with_ip_options() -> None:
    inner = ipv4(b"payload!", options=b"\x01\x01\x01\x00")  # NOP NOP NOP EOL
    pkt = decode(encode(1, JOB, inner))
    assert bytes(pkt.inner) == inner


def test_trailing_bytes_after_inner_are_trimmed() -> None:
    pkt = decode(GOLDEN + b"\x00" * 6)
    assert bytes(pkt.inner) == GOLDEN_INNER


# --- rejections ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 7])
def test_truncated(size: int) -> None:
    assert reason_of(GOLDEN[:size]) == "truncated"


@pytest.mark.parametrize("version", [1, 2, 3])
def test_bad_version(version: int) -> None:
    assert reason_of(raw_geneve(version=version)) == "bad_version"


def test_options_past_end() -> None:
    assert reason_of(GOLDEN[:30]) == "options_past_end"
    assert reason_of(raw_geneve(opt_words=63, inner=b"")) == "options_past_end"


def test_option_overruns_the_option_area() -> None:
    opts = raw_option(0x0102, 0x01, b"abcd", length=2)
    assert reason_of(raw_geneve(JOB_RAW + opts)) == "bad_option_length"


def test_job_option_with_wrong_length() -> None:
    opts = raw_option(JOB_OPTION_CLASS, JOB_OPTION_TYPE, JOB.job_id + JOB.digest + b"\x00" * 4)
    assert reason_of(raw_geneve(opts)) == "bad_option_length"
    short = raw_option(JOB_OPTION_CLASS, JOB_OPTION_TYPE, JOB.job_id)
    assert reason_of(raw_geneve(short)) == "bad_option_length"


def test_unknown_critical_option() -> None:
    opts = JOB_RAW + raw_option(0x0102, 0x80, b"")
    assert reason_of(raw_geneve(opts)) == "unknown_critical_option"
    buf = encode(1, JOB, GOLDEN_INNER, options=[GeneveOption(0xFFFF, 0xFE, b"1234")])
    assert reason_of(buf) == "unknown_critical_option"


def test_missing_job_option() -> None:
    assert reason_of(raw_geneve(b"")) == "missing_job_option"
    assert reason_of(raw_geneve(raw_option(0x0102, 0x01, b"abcd"))) == "missing_job_option"


def test_duplicate_job_option() -> None:
    assert reason_of(raw_geneve(JOB_RAW + JOB_RAW)) == "duplicate_job_option"


def test_ipv6_protocol_rejected() -> None:
    assert reason_of(raw_geneve(proto=PROTO_IPV6)) == "unsupported_protocol"


def test_ethernet_protocol_rejected() -> None:
    assert reason_of(raw_geneve(proto=0x6558)) == "unsupported_protocol"


def test_inner_not_ipv4() -> None:
    ipv6ish = b"\x60" + GOLDEN_INNER[1:]
    assert reason_of(raw_geneve(inner=ipv6ish)) == "inner_not_ipv4"
    ihl4 = b"\x44" + GOLDEN_INNER[1:]
    assert reason_of(raw_geneve(inner=ihl4)) == "inner_not_ipv4"


@pytest.mark.parametrize(
    "inner",
    [
        b"",  # no inner packet at all
        GOLDEN_INNER[:19],  # shorter than an IPv4 header
        GOLDEN_INNER[:27],  # total length says 28
        ipv4(options=b"\x01\x01\x01\x00")[:20],  # IHL 6, only 20 bytes
    ],
)
def test_inner_truncated(inner: bytes) -> None:
    assert reason_of(raw_geneve(inner=inner)) == "inner_truncated"


def test_inner_total_length_below_header_length() -> None:
    head = bytearray(GOLDEN_INNER[:20])
    head[2:4] = (19).to_bytes(2, "big")
    head[10:12] = b"\x00\x00"
    head[10:12] = inet_checksum(bytes(head)).to_bytes(2, "big")
    assert reason_of(raw_geneve(inner=bytes(head))) == "inner_truncated"


def test_inner_bad_checksum() -> None:
    bad = bytearray(GOLDEN_INNER)
    bad[11] ^= 0x01
    assert reason_of(raw_geneve(inner=bytes(bad))) == "inner_bad_checksum"
    bad_opts = bytearray(ipv4(options=b"\x01\x01\x01\x00"))
    bad_opts[22] = 0x02  # an IP option byte changed after the checksum was computed
    assert reason_of(raw_geneve(inner=bytes(bad_opts))) == "inner_bad_checksum"


def test_every_reason_is_listed() -> None:
    assert len(set(DECODE_REASONS)) == len(DECODE_REASONS) == 11


def test_geneve_error_is_an_egressd_error() -> None:
    err = GeneveError("truncated", "3 bytes")
    assert isinstance(err, EgressdError)
    assert (err.reason, err.detail) == ("truncated", "3 bytes")


def test_non_buffer_argument_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        decode("not bytes")  # type: ignore[arg-type]


# --- encode argument checks -------------------------------------------------------------------


@pytest.mark.parametrize("vni", [-1, 1 << 24, True, 1.0, "1"])
def test_encode_bad_vni(vni: object) -> None:
    with pytest.raises(GeneveError) as info:
        encode(vni, JOB, GOLDEN_INNER)  # type: ignore[arg-type]
    assert info.value.reason == "bad_vni"
    with pytest.raises(GeneveError):
        header_for(vni, JOB)  # type: ignore[arg-type]


def test_encode_max_vni() -> None:
    assert decode(encode(0xFFFFFF, JOB, GOLDEN_INNER)).vni == 0xFFFFFF


@pytest.mark.parametrize(
    "options",
    [
        [GeneveOption(0x0102, 1, b"abc")],  # not a multiple of 4
        [GeneveOption(0x0102, 1, b"a" * 128)],  # longer than 124
        [GeneveOption(0x0102, 1, b"a" * 124)] * 2,  # area 28 + 256 > 252
    ],
)
def test_encode_bad_option_length(options: list[GeneveOption]) -> None:
    with pytest.raises(GeneveError) as info:
        encode(1, JOB, GOLDEN_INNER, options=options)
    assert info.value.reason == "bad_option_length"


def test_encode_largest_option_area() -> None:
    options = [GeneveOption(0x0102, 1, b"a" * 124), GeneveOption(0x0102, 2, b"b" * 92)]
    pkt = decode(encode(1, JOB, GOLDEN_INNER, options=options))
    assert pkt.options == tuple(options)


@pytest.mark.parametrize("opt", [GeneveOption(0x10000, 1, b""), GeneveOption(1, 256, b"")])
def test_encode_bad_option_class_or_type(opt: GeneveOption) -> None:
    with pytest.raises(GeneveError) as info:
        encode(1, JOB, GOLDEN_INNER, options=[opt])
    assert info.value.reason == "bad_option"


def test_encode_refuses_a_second_job_option() -> None:
    dup = GeneveOption(JOB_OPTION_CLASS, JOB_OPTION_TYPE, JOB.job_id + JOB.digest)
    with pytest.raises(GeneveError) as info:
        encode(1, JOB, GOLDEN_INNER, options=[dup])
    assert info.value.reason == "duplicate_job_option"


# --- JobOption ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("job_id", "digest"), [(b"x" * 15, b"d" * 8), (b"x" * 16, b"d" * 9)])
def test_job_option_lengths_are_checked(job_id: bytes, digest: bytes) -> None:
    with pytest.raises(GeneveError) as info:
        JobOption(job_id, digest)
    assert info.value.reason == "bad_option_length"


def test_job_option_normalises_to_bytes() -> None:
    job = JobOption(bytearray(JOB.job_id), memoryview(JOB.digest))  # type: ignore[arg-type]
    assert job == JOB
    assert type(job.job_id) is bytes and type(job.digest) is bytes
    assert hash(job) == hash(JOB)


def test_job_option_from_jws() -> None:
    job = JobOption.from_jws(str(JOB_UUID), "x")
    assert job.job_id == JOB_UUID.bytes
    assert job.digest == bytes.fromhex("2d711642b726b044")  # sha256(b"x")[:8]
    assert JobOption.from_jws(JOB_UUID, "x") == job
