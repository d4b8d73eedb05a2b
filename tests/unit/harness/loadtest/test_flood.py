"""The flooders' pure parts: packets, pacing, windows; and a short paced run with a fake sender."""

from __future__ import annotations

import random
import time
from ipaddress import IPv4Address

import dns.message
import dns.rdatatype
import pytest
from scapy.layers.inet import IP, TCP

from egressd_harness.loadtest import flood as f
from egressd_harness.loadtest.scenarios import Window, schedule_text


def test_dns_query_is_a_standard_query() -> None:
    wire = f.dns_query("f0123.data.allowed.test", 0xBEEF)
    msg = dns.message.from_wire(wire)
    assert msg.id == 0xBEEF
    assert str(msg.question[0].name) == "f0123.data.allowed.test."
    assert msg.question[0].rdtype == dns.rdatatype.A
    assert msg.flags & dns.flags.RD and not msg.flags & dns.flags.QR
    with pytest.raises(ValueError):
        f.dns_query("x" * 64 + ".test", 1)


def test_flood_names_alternate_denied_and_allowed_and_never_repeat() -> None:
    rng = random.Random(7)
    names = [f.flood_name(i, rng) for i in range(1000)]
    assert len(set(names)) == 1000
    assert all(n.endswith(".evil.test") for n in names[::2])
    # exactly one label under the wildcard *.data.allowed.test
    assert all(n.endswith(".data.allowed.test") and n.count(".") == 3 for n in names[1::2])


def test_dns_rcode() -> None:
    reply = dns.message.make_response(dns.message.make_query("a.test", "A"))
    reply.set_rcode(dns.rcode.REFUSED)
    assert f.dns_rcode(reply.to_wire()) == 5
    assert f.dns_rcode(f.dns_query("a.test", 1)) is None  # a query, not a reply
    assert f.dns_rcode(b"\x00" * 5) is None


def test_syn_packet_is_well_formed_with_both_checksums() -> None:
    src, dst = IPv4Address("100.96.1.2"), IPv4Address("203.0.113.10")
    raw = f.syn_packet(src, dst, 40000, 80, 123456789, 77)
    pkt = IP(raw)
    assert (pkt.src, pkt.dst, pkt.ttl, pkt.flags.DF, pkt.id) == (str(src), str(dst), 64, True, 77)
    assert pkt.len == len(raw) == 20 + 24
    tcp = pkt[TCP]
    assert (tcp.sport, tcp.dport, tcp.seq, str(tcp.flags)) == (40000, 80, 123456789, "S")
    assert tcp.options == [("MSS", 1460)]
    # scapy recomputes both checksums when they are deleted: they must agree.
    fresh = IP(raw)
    del fresh.chksum, fresh[TCP].chksum
    rebuilt = IP(bytes(fresh))
    assert (rebuilt.chksum, rebuilt[TCP].chksum) == (pkt.chksum, tcp.chksum)
    assert f.checksum(raw[:20]) == 0  # a header with its checksum sums to zero


def test_due_paces_without_catch_up_bursts() -> None:
    assert f.due(0.0, 1000, 0) == 0
    assert f.due(0.01, 1000, 0) == 10
    assert f.due(0.01, 1000, 10) == 0
    assert f.due(10.0, 1000, 0) == f.MAX_BATCH  # behind after a stall: one batch at a time
    assert f.due(0.0, 0, 5) == f.MAX_BATCH  # unpaced


def test_stress_spans_from_schedule() -> None:
    windows = (
        Window(0, 5, "baseline"),
        Window(5, 10, "stress"),
        Window(10, 11, "settle"),
        Window(11, 16, "baseline"),
        Window(16, 21, "stress"),
        Window(21, 22, "settle"),
    )
    sched = f.parse_schedule(schedule_text(windows, 100.0))
    assert f.stress_spans(sched) == [(105.0, 110.0), (116.0, 121.0)]


def _schedule(*parts: tuple[float, str]) -> list[tuple[float, str]]:
    now = time.time()
    return [(now + t, phase) for t, phase in parts]


def test_run_floods_only_in_stress_windows_at_its_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(f, "DRAIN_S", 0.05)
    sent_at: list[float] = []
    polls = 0

    def poll() -> None:
        nonlocal polls
        polls += 1

    sched = _schedule((0.0, "baseline"), (0.2, "stress"), (0.7, "settle"), (0.8, "end"))
    stats = f.run(
        f.FloodStats("dns", 2000),
        lambda i: sent_at.append(time.time()),
        poll,
        sched,
        max_packets=100_000,
        max_seconds=10,
    )
    start, end = sched[1][0], sched[2][0]
    assert stats.stopped_by == "schedule" and len(stats.spans) == 1
    assert stats.sent == len(sent_at)
    assert all(start <= t < end + 0.01 for t in sent_at)
    assert 700 <= stats.sent <= 1010  # 2000/s for 0.5 s, on a busy machine too
    assert polls > 0
    doc = stats.to_dict()
    assert doc["sent"] == stats.sent and doc["kind"] == "dns" and len(doc["spans"]) == 1


def test_run_stops_at_its_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(f, "DRAIN_S", 0.0)
    sched = _schedule((0.0, "stress"), (5.0, "end"))
    t0 = time.monotonic()
    stats = f.run(
        f.FloodStats("syn", 0), lambda i: None, lambda: None, sched, max_packets=5000, max_seconds=5
    )
    assert (stats.sent, stats.stopped_by) == (5000, "max_packets")
    stats = f.run(
        f.FloodStats("syn", 100),
        lambda i: None,
        lambda: None,
        sched,
        max_packets=10**6,
        max_seconds=0.2,
    )
    assert stats.stopped_by == "max_seconds" and stats.flood_seconds < 0.5
    assert time.monotonic() - t0 < 3


def test_send_errors_are_counted_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(f, "DRAIN_S", 0.0)

    def refuse(_i: int) -> None:
        raise OSError(105, "No buffer space available")

    sched = _schedule((0.0, "stress"), (0.2, "end"))
    stats = f.run(f.FloodStats("syn", 1000), refuse, lambda: None, sched, 10**6, 5)
    # paced like sends (1000/s for 0.2 s), not a spin of errors
    assert stats.sent == 0 and 50 < stats.errors["ENOBUFS"] <= 260


def test_main_rejects_bad_arguments() -> None:
    sched = schedule_text((Window(0, 1, "stress"),), time.time())
    with pytest.raises(SystemExit):
        f.main(["syn", "--schedule", sched, "--rate", "10", "--summary", "/dev/null"])  # no --src
    with pytest.raises(SystemExit):
        f.main(["dns", "--schedule", sched, "--rate", "-1", "--summary", "/dev/null"])
    with pytest.raises(SystemExit):
        f.main(
            ["dns", "--schedule", sched, "--rate", "1", "--max-seconds", "600", "--summary", "x"]
        )
