"""The compose fleet's Prometheus (profile `monitoring`): it scrapes every member that
exports metrics, by compose service name, at the port that member serves /metrics
on (control: the API port; proxies, nodes, the load generator: the admin port 9090),
over the underlay network it shares with them; its image is Debian's prometheus on
the fleet's base image."""

from __future__ import annotations

import re
from typing import Any

import yaml

from egressd.layout import ADMIN_PORT, CONTROL_PORT
from tests.support.deploy import DEPLOY, ROOT, compose

# compose service -> the port its daemon serves /metrics on (entry.py's roles)
METRICS_PORT = {
    "control": CONTROL_PORT,
    "proxy": ADMIN_PORT,
    "node": ADMIN_PORT,
    "locust": ADMIN_PORT,
}


def scrape_targets(config: dict[str, Any]) -> dict[str, tuple[str, int]]:
    """job name -> (the DNS name it resolves, port)."""
    out = {}
    for job in config["scrape_configs"]:
        (sd,) = job["dns_sd_configs"]
        assert sd["type"] == "A"
        (name,) = sd["names"]
        out[job["job_name"]] = (name, int(sd["port"]))
    return out


def test_every_member_with_metrics_is_scraped_at_its_port() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    services = compose()["services"]
    targets = scrape_targets(config)
    scraped = dict(targets.values())
    assert scraped == METRICS_PORT
    for name in scraped:
        assert name in services, name
        assert "underlay" in services[name]["networks"], name
    # The members that export no metrics are the fake internet and the demo client.
    daemons = {
        n
        for n, s in services.items()
        if s.get("command", [None])[0] in ("control", "proxy", "node", "loadgen")
    }
    assert daemons == set(METRICS_PORT)


def test_prometheus_service_is_a_profile_on_the_underlay() -> None:
    services = compose()["services"]
    prometheus = services["prometheus"]
    assert prometheus["profiles"] == ["monitoring"]
    assert list(prometheus["networks"]) == ["underlay"]
    address = prometheus["networks"]["underlay"]["ipv4_address"]
    fixed = {
        s["networks"]["underlay"]["ipv4_address"]
        for n, s in services.items()
        if n != "prometheus"
        and isinstance(s.get("networks", {}).get("underlay"), dict)
        and "ipv4_address" in s["networks"]["underlay"]
    }
    assert address not in fixed
    # Below the dynamic range (198.18.0.128/26) the proxies' addresses come from.
    assert int(address.rsplit(".", 1)[1]) < 128
    build = prometheus["build"]
    assert (build["dockerfile"], build["target"]) == ("deploy/Dockerfile", "prometheus")
    dockerfile = (ROOT / build["dockerfile"]).read_text()
    stage = dockerfile.split("AS prometheus", 1)[1]
    assert re.search(r"^FROM \$\{BASE_IMAGE\} AS prometheus$", dockerfile, re.MULTILINE)
    assert re.search(r"apt-get install .*\bprometheus\b", stage)
    assert "COPY deploy/prometheus/prometheus.yml /etc/prometheus/prometheus.yml" in stage
