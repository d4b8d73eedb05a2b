"""The GENEVE offload option and the virtio-net header: encoding and validation (pure)."""

from __future__ import annotations

import struct
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.packet import Raw

from egressd.geneve import (
    OFFLOAD_OPTION_CLASS,
    OFFLOAD_OPTION_LEN,
    OFFLOAD_OPTION_TYPE,
    OFFLOAD_REASON,
    GeneveError,
    GeneveOption,
    JobOption,
    decode,
    encode,
    header_for,
    offload_option,
    offload_vnet_header,
    pack_offload_option,
)
from egressd.geneve.codec import MIN_GSO_SIZE
from egressd.net.tun import (
    NO_VNET_HDR,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VNET_HDR_LEN,
    TunError,
    open_tun,
    vnet_header,
)

JOB = JobOption(uuid.UUID("2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2").bytes, bytes(range(8)))
MSS = 1396
NEEDS_CSUM = VIRTIO_NET_HDR_F_NEEDS_CSUM
TCPV4 = VIRTIO_NET_HDR_GSO_TCPV4


def super_tcp(payload: int = 20 * MSS, **tcp: object) -> bytes:
    """A TCP super-packet as the kernel hands it up (whole IPv4 total length)."""
    return bytes(
        IP(src="100.96.1.2", dst="203.0.113.10", flags="DF")
        / TCP(sport=40000, dport=80, flags="A", **tcp)  # type: ignore[arg-type]
        / Raw(b"d" * payload)
    )


def small_udp() -> bytes:
    return bytes(
        IP(src="100.96.1.2", dst="100.100.100.53") / UDP(sport=5353, dport=53) / Raw(b"q" * 12)
    )


def gso_option(gso_size: int = MSS, **over: int) -> GeneveOption:
    fields = {
        "flags": NEEDS_CSUM,
        "gso_type": TCPV4,
        "gso_size": gso_size,
        "csum_start": 20,
        "csum_offset": 16,
    }
    fields.update(over)
    return offload_option(**fields)


# --- encoding ---------------------------------------------------------------------------


def test_the_option_bytes() -> None:
    opt = gso_option()
    assert (opt.opt_class, opt.opt_type, opt.critical) == (0xFF01, 0x02, False)
    assert opt.data == bytes([1, 1]) + struct.pack("!HHH", MSS, 20, 16)
    buf = bytearray(OFFLOAD_OPTION_LEN)
    pack_offload_option(buf, 0, NEEDS_CSUM, TCPV4, MSS, 20, 16)
    assert bytes(buf) == bytes.fromhex("ff01 0202") + opt.data


def test_a_datagram_with_both_options_golden_prefix() -> None:
    inner = super_tcp(3 * MSS)
    data = encode(1, JOB, inner, options=[gso_option()])
    # Opt Len 10 words (job 28 + offload 12), C bit (the job option is critical).
    assert data[:4] == bytes([10, 0x40, 0x08, 0x00])
    assert data[8:36] == header_for(1, JOB)[8:]
    assert data[36:48] == bytes.fromhex("ff01 0202 0101") + struct.pack("!HHH", MSS, 20, 16)
    assert data[48:] == inner


def test_decode_fast_and_general_paths_agree() -> None:
    inner = super_tcp(3 * MSS)
    fast = decode(encode(1, JOB, inner, options=[gso_option()]))
    assert fast.options == (gso_option(),)
    assert bytes(fast.inner) == inner
    # Another non-critical option after it takes the general path: same offload option.
    general = decode(encode(1, JOB, inner, options=[gso_option(), GeneveOption(0x0102, 1, b"")]))
    assert general.options[0] == gso_option()
    assert bytes(general.inner) == inner


def test_vnet_header_layout() -> None:
    assert NO_VNET_HDR == bytes(VNET_HDR_LEN) == vnet_header()
    hdr = vnet_header(NEEDS_CSUM, TCPV4, 52, MSS, 20, 16)
    assert hdr == bytes([1, 1]) + struct.pack("<HHHH", 52, MSS, 20, 16)


def test_offloads_need_a_vnet_header() -> None:
    with pytest.raises(TunError) as exc:
        open_tun("egrx0", vnet_hdr=False, offload=1)
    assert exc.value.reason == "configure_failed"
    with pytest.raises(TunError):
        open_tun("egrx0", vnet_hdr=True, offload=0x10)  # UFO: not one we use


# --- validation ---------------------------------------------------------------------------


def vnet_for(inner: bytes, *options: GeneveOption) -> bytes | None:
    pkt = decode(encode(1, JOB, inner, options=list(options)))
    return offload_vnet_header(pkt.options, pkt.inner)


def test_no_option_is_a_plain_packet() -> None:
    assert vnet_for(super_tcp(100)) is None
    assert vnet_for(super_tcp(100), GeneveOption(0x0102, 1, b"")) is None


def test_a_super_packet_gets_a_gso_header_with_its_own_hdr_len() -> None:
    inner = super_tcp(options=[("Timestamp", (1, 2))])  # 12 bytes of TCP options
    assert vnet_for(inner, gso_option()) == vnet_header(NEEDS_CSUM, TCPV4, 20 + 32, MSS, 20, 16)


def test_partial_checksums_without_gso() -> None:
    assert vnet_for(super_tcp(10), gso_option(0, gso_type=0)) == vnet_header(
        NEEDS_CSUM, 0, 0, 0, 20, 16
    )
    udp = small_udp()
    assert vnet_for(udp, gso_option(0, gso_type=0, csum_offset=6)) == vnet_header(
        NEEDS_CSUM, 0, 0, 0, 20, 6
    )
    assert vnet_for(udp, offload_option(0, 0, 0, 0, 0)) == NO_VNET_HDR


def test_one_segment_is_written_as_a_plain_packet() -> None:
    assert vnet_for(super_tcp(MSS), gso_option()) == vnet_header(NEEDS_CSUM, 0, 0, 0, 20, 16)


@pytest.mark.parametrize(
    ("inner", "option"),
    [
        (super_tcp(), gso_option(flags=NEEDS_CSUM | 2)),  # DATA_VALID never crosses
        (super_tcp(), gso_option(flags=0x80)),
        (super_tcp(), gso_option(flags=0)),  # GSO needs NEEDS_CSUM
        (super_tcp(), gso_option(gso_type=3)),  # UDP (UFO)
        (super_tcp(), gso_option(gso_type=4)),  # TCPv6
        (super_tcp(), gso_option(gso_type=TCPV4 | 0x80)),  # ECN: not offered
        (super_tcp(), gso_option(MIN_GSO_SIZE - 1)),
        (super_tcp(), gso_option(1)),
        (super_tcp(), gso_option(csum_start=0)),
        (super_tcp(), gso_option(csum_start=24)),
        (super_tcp(), gso_option(csum_offset=6)),
        (super_tcp(), gso_option(csum_offset=0xFFFF)),
        (super_tcp(), gso_option(0, gso_type=0, flags=0)),  # offsets without NEEDS_CSUM
        (super_tcp(), offload_option(0, 0, MSS, 0, 0)),  # gso_size without gso_type
        (small_udp(), gso_option(csum_offset=6)),  # GSO for UDP
        (small_udp(), gso_option(0, gso_type=0)),  # TCP's checksum offset in UDP
        (
            bytes(IP(src="100.96.1.2", dst="203.0.113.10", proto=47) / Raw(b"g" * 40)),
            gso_option(0, gso_type=0),
        ),
        (super_tcp(), GeneveOption(OFFLOAD_OPTION_CLASS, OFFLOAD_OPTION_TYPE, bytes(4))),
        (super_tcp(), GeneveOption(OFFLOAD_OPTION_CLASS, OFFLOAD_OPTION_TYPE, bytes(12))),
    ],
)
def test_bogus_options_are_refused(inner: bytes, option: GeneveOption) -> None:
    with pytest.raises(GeneveError) as exc:
        vnet_for(inner, option)
    assert exc.value.reason == OFFLOAD_REASON


def test_a_duplicate_option_is_refused() -> None:
    with pytest.raises(GeneveError) as exc:
        vnet_for(super_tcp(), gso_option(), gso_option())
    assert exc.value.reason == OFFLOAD_REASON


def test_a_fragment_cannot_be_a_super_packet() -> None:
    inner = bytes(
        IP(src="100.96.1.2", dst="203.0.113.10", flags="MF")
        / TCP(sport=40000, dport=80, flags="A")
        / Raw(b"d" * 20 * MSS)
    )
    with pytest.raises(GeneveError) as exc:
        vnet_for(inner, gso_option())
    assert exc.value.reason == OFFLOAD_REASON


def test_a_gso_packet_needs_a_whole_tcp_header() -> None:
    inner = bytearray(super_tcp())
    inner[32] = 0x40  # TCP data offset 16 bytes: less than a TCP header
    with pytest.raises(GeneveError):
        vnet_for(bytes(inner), gso_option())


@given(st.binary(min_size=8, max_size=8), st.binary(min_size=20, max_size=200))
def test_arbitrary_option_bytes_never_raise_anything_else(data: bytes, tail: bytes) -> None:
    inner = super_tcp(len(tail))
    opt = GeneveOption(OFFLOAD_OPTION_CLASS, OFFLOAD_OPTION_TYPE, data)
    pkt = decode(encode(1, JOB, inner, options=[opt]))
    try:
        hdr = offload_vnet_header(pkt.options, pkt.inner)
    except GeneveError as exc:
        assert exc.reason == OFFLOAD_REASON
    else:
        assert hdr is not None and len(hdr) == VNET_HDR_LEN
        assert hdr[0] in (0, NEEDS_CSUM) and hdr[1] in (0, TCPV4)
