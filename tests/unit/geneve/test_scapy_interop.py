"""Scapy as an independent oracle: it must read what egressd writes, and vice versa."""

from __future__ import annotations

import uuid

import pytest
from scapy.contrib.geneve import GENEVE, GeneveOptions
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Packet, Raw

from egressd.geneve import (
    GENEVE_PORT,
    JOB_OPTION_CLASS,
    JOB_OPTION_TYPE,
    PROTO_IPV4,
    GeneveError,
    GeneveOption,
    JobOption,
    decode,
    encode,
    header_for,
)

JOB = JobOption(uuid.UUID("2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2").bytes, b"\x11" * 8)
SRC, DST = "100.96.1.5", "203.0.113.10"

INNERS: dict[str, Packet] = {
    "tcp_syn": IP(src=SRC, dst=DST, id=1234) / TCP(sport=40000, dport=443, flags="S", seq=1),
    "tcp_data": IP(src=SRC, dst=DST, ttl=63) / TCP(sport=40001, dport=80, flags="PA") / b"GET /",
    "tcp_mss": IP(src=SRC, dst=DST) / TCP(sport=40002, dport=443, options=[("MSS", 1360)]),
    "udp_dns": IP(src=SRC, dst="100.100.100.53") / UDP(sport=5353, dport=53) / (b"\x00" * 12),
    "icmp": IP(src=SRC, dst=DST) / ICMP(),
    "ip_options": IP(src=SRC, dst=DST, options=b"\x01\x01\x01\x00") / UDP(sport=1, dport=2),
    "fragment": IP(src=SRC, dst=DST, flags="MF", frag=0) / UDP(sport=1, dport=2) / (b"z" * 64),
}


def job_option() -> GeneveOptions:
    return GeneveOptions(
        classid=JOB_OPTION_CLASS, type=JOB_OPTION_TYPE, data=JOB.job_id + JOB.digest
    )


# --- egressd writes, scapy reads ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(INNERS))
def test_scapy_reads_egressd(name: str) -> None:
    inner = bytes(INNERS[name])
    parsed = GENEVE(encode(42, JOB, inner))
    assert (parsed.version, parsed.optionlen, parsed.oam, parsed.critical) == (0, 7, 0, 1)
    assert parsed.proto == PROTO_IPV4
    assert parsed.vni == 42
    (opt,) = parsed.options
    assert (opt.classid, opt.type, opt.length) == (JOB_OPTION_CLASS, JOB_OPTION_TYPE, 6)
    assert opt.data == JOB.job_id + JOB.digest
    ip = parsed[IP]
    expected = IP(inner)
    assert (ip.src, ip.dst, ip.len, ip.id, ip.ttl, ip.proto) == (
        expected.src,
        expected.dst,
        expected.len,
        expected.id,
        expected.ttl,
        expected.proto,
    )
    assert bytes(ip) == inner


def test_scapy_reads_extra_option_and_oam() -> None:
    extra = GeneveOption(0x0103, 0x02, b"int-telemetry...")
    inner = bytes(INNERS["tcp_data"])
    parsed = GENEVE(encode(0xABCDEF, JOB, inner, options=[extra], oam=True))
    assert (parsed.oam, parsed.critical, parsed.vni, parsed.optionlen) == (1, 1, 0xABCDEF, 12)
    job_opt, other = parsed.options
    assert (job_opt.classid, job_opt.type, job_opt.data) == (
        JOB_OPTION_CLASS,
        JOB_OPTION_TYPE,
        JOB.job_id + JOB.digest,
    )
    assert (other.classid, other.type, other.length, other.data) == (0x0103, 0x02, 4, extra.data)
    assert parsed[TCP].dport == 80
    assert bytes(parsed[TCP].payload) == b"GET /"


def test_scapy_dissects_egressd_on_the_geneve_port() -> None:
    datagram = header_for(1, JOB) + bytes(INNERS["tcp_syn"])
    wire = IP(src="198.18.0.11", dst="198.18.0.21") / UDP(sport=51234, dport=GENEVE_PORT)
    outer = IP(bytes(wire / Raw(datagram)))
    assert outer[UDP].dport == 6081
    assert outer[GENEVE].vni == 1
    assert outer[GENEVE][TCP].sport == 40000
    assert outer[GENEVE][IP].src == SRC


# --- scapy writes, egressd reads ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(INNERS))
def test_egressd_reads_scapy(name: str) -> None:
    built = GENEVE(vni=7, proto=PROTO_IPV4, critical=1, options=[job_option()]) / INNERS[name]
    buf = bytes(built)
    pkt = decode(buf)
    assert pkt.vni == 7
    assert pkt.protocol == PROTO_IPV4
    assert pkt.critical is True
    assert pkt.job == JOB
    assert pkt.options == ()
    assert bytes(pkt.inner) == bytes(built[IP])
    assert IP(bytes(pkt.inner))[IP].src == SRC


def test_egressd_reads_scapy_extra_options() -> None:
    options = [
        GeneveOptions(classid=0x0102, type=0x01, data=b"ovn!"),
        job_option(),
        GeneveOptions(classid=0xFFFF, type=0x7F, data=b""),
    ]
    built = GENEVE(vni=0x123456, proto=PROTO_IPV4, oam=1, options=options) / INNERS["tcp_mss"]
    pkt = decode(bytes(built))
    assert (pkt.vni, pkt.oam, pkt.critical) == (0x123456, True, False)
    assert pkt.job == JOB
    assert pkt.options == (GeneveOption(0x0102, 0x01, b"ovn!"), GeneveOption(0xFFFF, 0x7F, b""))
    assert bytes(pkt.inner) == bytes(built[IP])


def test_egressd_rejects_scapy_unknown_critical_option() -> None:
    options = [job_option(), GeneveOptions(classid=0x0104, type=0x81, data=b"\x00" * 4)]
    built = GENEVE(proto=PROTO_IPV4, critical=1, options=options) / INNERS["tcp_syn"]
    with pytest.raises(GeneveError) as info:
        decode(bytes(built))
    assert info.value.reason == "unknown_critical_option"


def test_egressd_rejects_scapy_without_job_option() -> None:
    built = GENEVE(proto=PROTO_IPV4) / INNERS["tcp_syn"]
    with pytest.raises(GeneveError) as info:
        decode(bytes(built))
    assert info.value.reason == "missing_job_option"


def test_egressd_rejects_scapy_ipv6() -> None:
    built = (
        GENEVE(proto=0x86DD, options=[job_option()]) / IPv6(src="fd00::1", dst="fd00::2") / UDP()
    )
    with pytest.raises(GeneveError) as info:
        decode(bytes(built))
    assert info.value.reason == "unsupported_protocol"


def test_egressd_rejects_scapy_bad_inner_checksum() -> None:
    built = GENEVE(proto=PROTO_IPV4, options=[job_option()]) / IP(src=SRC, dst=DST, chksum=0x1234)
    with pytest.raises(GeneveError) as info:
        decode(bytes(built))
    assert info.value.reason == "inner_bad_checksum"
