"""A DNS answer larger than a datagram, through the whole fleet (issue 15).

A sandbox (gVisor, glibc) resolves `many.data.allowed.test`, which has 150 A
records at the "internet"'s DNS server: over UDP the proxy answers TC with the
records that fit, glibc asks again over TCP (through tier 1, GENEVE and the
proxy's TCP responder) and gets all 150. Before the fix, a client that did
not retry over TCP saw NOERROR with no answer at all.

Brings the fleet up: run under the e2e lock (`flock /tmp/egressd-e2e.lock`).
"""

from __future__ import annotations

from pathlib import Path

from egressd_harness.topology.dnsserver import MANY_COUNT, MANY_NAME, many_addresses
from egressd_harness.topology.fleet import Fleet
from tests.support.fleet import LimitedJob, dns_events, run_checks


def test_150_records_reach_a_sandbox(fleet: Fleet, tmp_path: Path) -> None:
    job = LimitedJob(fleet, "node1", [{"host": "*.data.allowed.test", "ports": [443]}]).sign()
    got = run_checks(
        fleet,
        job,
        tmp_path,
        [
            {"id": "gai", "kind": "getaddrinfo", "name": MANY_NAME, "timeout": 10},
            {"id": "udp", "kind": "dns", "name": MANY_NAME, "qtype": "A"},
        ],
    )
    expected = {str(ip) for ip in many_addresses(fleet.layout)}
    assert len(expected) == MANY_COUNT
    gai = got["gai"]
    assert gai["outcome"] == "ok", gai
    assert set(gai["addresses"]) == expected
    udp = got["udp"]
    assert (udp["outcome"], udp["rcode_text"], udp["tc"]) == ("answer", "NOERROR", True), udp
    assert 0 < udp["ancount"] < MANY_COUNT and udp["size"] <= 512, udp
    events = dns_events(fleet, job, MANY_NAME, "A")
    answers = [e["answers"] for e in events]
    assert answers and all(len(a) == MANY_COUNT for a in answers), events
