"""Tier-1 denial events, pure parts: the t1_event record, the ring buffer walk, the log fields."""

from __future__ import annotations

import ipaddress
import re
import struct
import uuid

import pytest

from egressd.agent.ringbuf import BUSY_BIT, DISCARD_BIT, HEADER_LEN, consume, record_len
from egressd.agent.sandboxes import Sandbox
from egressd.agent.tier1 import DEFAULT_SOURCE
from egressd.agent.tier1_events import denial_event
from egressd.agent.tier1_maps import (
    EVENT_BUCKET,
    EVENT_RST,
    EVENT_SIZE,
    MAPS,
    Reason,
    Tier1Error,
    Tier1Event,
    pack_event,
    unpack_event,
)

A = ipaddress.IPv4Address
SOURCE = DEFAULT_SOURCE.read_text()


def _event(**over: object) -> Tier1Event:
    fields: dict[str, object] = {
        "ts_ns": 123,
        "ifindex": 7,
        "reason": Reason.PORT_NOT_ALLOWED,
        "dst": A("198.51.100.7"),
        "port": 8443,
        "proto": 6,
        "rst": True,
        "suppressed": 0,
    }
    fields.update(over)
    return Tier1Event(**fields)  # type: ignore[arg-type]


def test_event_golden_layout() -> None:
    raw = pack_event(_event(suppressed=41))
    assert len(raw) == EVENT_SIZE == 32
    assert raw == (
        struct.pack("=QII", 123, 7, Reason.PORT_NOT_ALLOWED.code)
        + bytes([198, 51, 100, 7])
        + (8443).to_bytes(2, "big")  # be16, as on the wire
        + bytes([6, EVENT_RST])
        + struct.pack("=II", 41, 0)
    )
    assert unpack_event(raw) == _event(suppressed=41)


def test_event_without_ip_header_has_no_destination() -> None:
    raw = struct.pack("=QII4s2sBBII", 5, 9, Reason.IPV6.code, bytes(4), bytes(2), 0, 0, 3, 0)
    event = unpack_event(raw)
    assert (event.dst, event.port, event.proto_name, event.rst) == (None, 0, None, False)
    assert event.suppressed == 3


@pytest.mark.parametrize("raw", [bytes(31), bytes(33), b""])
def test_event_of_wrong_size_is_an_abi_mismatch(raw: bytes) -> None:
    with pytest.raises(Tier1Error) as info:
        unpack_event(raw)
    assert info.value.reason == "abi_mismatch"


def test_event_with_unknown_reason_is_an_abi_mismatch() -> None:
    raw = bytearray(pack_event(_event()))
    raw[12:16] = struct.pack("=I", len(Reason))
    with pytest.raises(Tier1Error):
        unpack_event(bytes(raw))


def test_c_event_constants_match() -> None:
    assert re.search(r"#define\s+T1_EVENT_RST\s+1u", SOURCE)
    size = re.search(r"#define\s+T1_EVENTS_BYTES\s+\((\d+) \* 1024\)", SOURCE)
    assert size is not None
    assert int(size[1]) * 1024 & (int(size[1]) * 1024 - 1) == 0  # a power of two
    assert "t1_events" in {spec.name for spec in MAPS}


def test_event_bucket_is_a_few_a_second() -> None:
    assert EVENT_BUCKET.rate_per_s == 5
    assert EVENT_BUCKET.burst == 20


# -- the ring buffer walk ---------------------------------------------------------------


class _Ring:
    """A data area written the way the kernel's producer writes it."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.data = bytearray(2 * size)  # the kernel maps the data pages twice
        self.prod = 0

    def put(self, sample: bytes, flags: int = 0) -> None:
        header = struct.pack("=II", len(sample) | flags, 0)
        record = header + sample + bytes(record_len(len(sample)) - HEADER_LEN - len(sample))
        for i, byte in enumerate(record):
            pos = (self.prod + i) & (self.size - 1)
            self.data[pos] = self.data[pos + self.size] = byte
        self.prod += len(record)

    def header(self, offset: int) -> int:
        return int(struct.unpack_from("=I", self.data, offset)[0])

    def sample(self, offset: int, length: int) -> bytes:
        return bytes(self.data[offset : offset + length])


def test_consume_reads_in_order_skips_discarded_and_wraps() -> None:
    ring = _Ring(128)
    ring.put(b"a" * 60)
    ring.put(b"gone", DISCARD_BIT)
    ring.put(b"b" * 27)
    got, cons = consume(ring, 0, ring.prod, ring.size - 1, 100)
    assert got == [b"a" * 60, b"b" * 27]
    assert cons == ring.prod == 72 + 16 + 40
    # The next record starts 8 bytes before the end of the data area and wraps.
    cons -= 8
    ring.prod -= 8
    ring.put(b"c" * 24)
    got, cons = consume(ring, cons, ring.prod, ring.size - 1, 100)
    assert got == [b"c" * 24]
    assert cons == ring.prod == 120 + 32


def test_consume_stops_at_a_busy_record_and_at_the_limit() -> None:
    ring = _Ring(256)
    ring.put(b"1" * 8)
    ring.put(b"2" * 8, BUSY_BIT)
    ring.put(b"3" * 8)
    got, cons = consume(ring, 0, ring.prod, ring.size - 1, 100)
    assert (got, cons) == ([b"1" * 8], 16)
    got, cons = consume(ring, 0, ring.prod, ring.size - 1, 0)
    assert (got, cons) == ([], 0)


@pytest.mark.parametrize(("length", "span"), [(0, 8), (1, 16), (8, 16), (32, 40), (33, 48)])
def test_record_len_rounds_header_plus_sample_to_8(length: int, span: int) -> None:
    assert record_len(length) == span
    assert record_len(length | BUSY_BIT | DISCARD_BIT) == span


# -- log fields ---------------------------------------------------------------------------

JOB = uuid.UUID("3f1c2b0e-0000-4000-8000-00000000abcd")


def _sandbox() -> Sandbox:
    return Sandbox(
        sandbox_id="sbx-1",
        job_id=JOB,
        digest=bytes(32),
        kid="k",
        exp=0,
        ip=A("100.96.1.2"),
        gateway=A("100.96.1.1"),
        prefixlen=24,
        netns="egd-sbx-x",
        host_veth="sbx",
        peer_veth="eth0",
        ifindex=7,
        mac="02:00:00:00:01:02",
        tcp_ports=(),
        exemptions=(),
    )


def test_denial_event_fields() -> None:
    fields = denial_event(_event(suppressed=12), _sandbox(), "node1")
    assert fields == {
        "job_id": str(JOB),
        "sandbox_id": "sbx-1",
        "node": "node1",
        "source": "100.96.1.2",
        "dst": "198.51.100.7",
        "port": 8443,
        "proto": "tcp",
        "verdict": "deny",
        "reason": "port_not_allowed",
        "action": "rst",
        "suppressed": 12,
    }


def test_denial_event_of_a_gone_sandbox_and_a_non_ip_frame() -> None:
    event = _event(reason=Reason.NOT_IPV4, dst=None, port=0, proto=0, rst=False)
    fields = denial_event(event, None, "node2")
    assert (fields["job_id"], fields["sandbox_id"], fields["source"]) == (None, None, None)
    assert (fields["dst"], fields["port"], fields["proto"]) == (None, None, None)
    assert (fields["reason"], fields["action"]) == ("not_ipv4", "drop")


def test_denial_event_port_only_for_tcp_and_udp() -> None:
    fields = denial_event(_event(proto=1, port=0, rst=False), _sandbox(), "n")
    assert (fields["proto"], fields["port"]) == ("icmp", None)
    fields = denial_event(_event(proto=47, port=0, rst=False), _sandbox(), "n")
    assert (fields["proto"], fields["port"]) == ("47", None)
