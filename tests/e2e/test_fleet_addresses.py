"""The fleet's own addresses through the real fleet: never reachable (`fleet_address`).

The proxies' egress addresses (203.0.113.21, .22) lie inside the test
internet 203.0.113.0/24, which is not an always-denied range. A job whose
cidr rule covers all of it, and whose host rules allow names that resolve to
them (`<proxy>.fleet.test` in the fleet's DNS), still never reaches them: each
connection is reset and logged with reason ``fleet_address`` (the proxies
learn each other's addresses from the control plane's registry), DNS answers
with them are filtered, and report mode does not open them. A connection to
the first source port a proxy binds shows there is no TCP self-connect.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from egressd.limits.ports import DEFAULT_SOURCE_PORTS
from egressd_harness.topology.fleet import Fleet
from tests.support.fleet import (
    API,
    API_IP,
    LimitedJob,
    conn_events,
    dns_events,
    metric_sum,
    metrics,
    run_checks,
)

SELF_PORT = DEFAULT_SOURCE_PORTS[0]  # the first source port a proxy binds
PORTS = (80, 443, SELF_PORT)


def fleet_job(fleet: Fleet, mode: str = "enforce") -> LimitedJob:
    names = [f"{p.name}.fleet.test" for p in fleet.layout.proxies]
    return LimitedJob(
        fleet,
        "node1",
        [
            {"cidr": "203.0.113.0/24", "ports": list(PORTS)},
            *({"host": name, "ports": [80]} for name in names),
        ],
        mode=mode,
    ).sign()


def fleet_denies(fleet: Fleet) -> float:
    return sum(
        metric_sum(
            metrics(fleet, p.name),
            "egressd_connections_total",
            verdict="deny",
            reason="fleet_address",
        )
        for p in fleet.layout.proxies
    )


def test_proxy_egress_addresses_are_never_reachable(fleet: Fleet, tmp_path: Path) -> None:
    egress = [str(p.egress) for p in fleet.layout.proxies]
    assert egress == ["203.0.113.21", "203.0.113.22"]
    job = fleet_job(fleet)
    checks: list[Mapping[str, object]] = [
        {
            "id": f"{ip}:{port}",
            "kind": "tcp",
            "host": ip,
            "port": port,
            "http_host": API,
            "timeout": 3,
        }
        for ip in egress
        for port in PORTS
    ]
    checks += [
        # The rest of the cidr rule is reachable: the deny is about the fleet only.
        {"id": "site", "kind": "tcp", "host": API_IP, "port": 80, "http_host": API},
        *(
            {"id": f"gai:{p.name}", "kind": "getaddrinfo", "name": f"{p.name}.fleet.test"}
            for p in fleet.layout.proxies
        ),
        *(
            {"id": f"dns:{p.name}", "kind": "dns", "name": f"{p.name}.fleet.test", "qtype": "A"}
            for p in fleet.layout.proxies
        ),
    ]
    before = fleet_denies(fleet)
    got = run_checks(fleet, job, tmp_path, checks)

    assert got["site"]["outcome"] == "data", got["site"]
    for ip in egress:
        for port in PORTS:
            result = got[f"{ip}:{port}"]
            # Reset by the proxy (tier 1 passed it; the reset of a deny made
            # before any byte is read may beat connect() back to the sandbox):
            # never an answer, and never the client's own bytes echoed back.
            assert result["outcome"] == "reset", result
            events = conn_events(fleet, job, dst=ip, port=port)
            assert len(events) == 1, events
            assert (events[0]["verdict"], events[0]["reason"]) == ("deny", "fleet_address")
    assert fleet_denies(fleet) - before >= len(egress) * len(PORTS)

    for proxy in fleet.layout.proxies:
        assert got[f"gai:{proxy.name}"]["outcome"] == "gaierror", got[f"gai:{proxy.name}"]
        raw = got[f"dns:{proxy.name}"]
        assert (raw["rcode_text"], raw["ancount"]) == ("NXDOMAIN", 0), raw  # a name refused
        events = dns_events(fleet, job, f"{proxy.name}.fleet.test", "A")
        assert events, proxy.name
        for event in events:
            assert (event["verdict"], event["reason"]) == ("deny", "rebinding"), event
            assert event["dropped"] == [{"address": str(proxy.egress), "reason": "fleet_address"}]


def test_report_mode_does_not_open_the_fleet(fleet: Fleet, tmp_path: Path) -> None:
    job = fleet_job(fleet, mode="report")
    target = str(fleet.layout.proxies[1].egress)
    got = run_checks(
        fleet,
        job,
        tmp_path,
        [
            {"id": "egress", "kind": "tcp", "host": target, "port": 80, "http_host": API},
        ],
    )
    assert got["egress"]["outcome"] == "reset", got["egress"]
    events = conn_events(fleet, job, dst=target, port=80)
    assert len(events) == 1, events
    event = events[0]
    assert (event["verdict"], event["reason"], event["would_deny"]) == (
        "deny",
        "fleet_address",
        False,
    )
