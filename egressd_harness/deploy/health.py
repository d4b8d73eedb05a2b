"""The compose fleet's healthchecks (`python -m egressd_harness.deploy health ROLE`), and the
few container facts they share with the roles (`entry`).

Kept apart from `entry` so that a healthcheck imports the standard library, the settings and
the metrics parser only: `entry` pulls in pyroute2, dnspython and the topology (0.7 s idle,
3 s on a loaded 2-core host), which a 5 s healthcheck timeout cannot afford.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from egressd import metrics_text
from egressd.layout import ADMIN_PORT, UNDERLAY
from egressd_harness.deploy import settings

JOBS_PORT = 8070
#: The demo service's exit code, for its healthcheck (`egressd_harness.demo.compose`).
DEMO_RESULT = Path("/tmp/egressd-demo.result")
WAIT_S = 60.0


@functools.cache
def env() -> settings.DeploySettings:
    """This container's settings, read from the environment once (at a role's start)."""
    try:
        return settings.from_env(os.environ)
    except settings.SettingsError as exc:
        raise SystemExit(f"entry: {exc}") from None


def addresses() -> list[tuple[str, ipaddress.IPv4Interface]]:
    out = subprocess.run(
        ["ip", "-j", "-4", "addr", "show"], capture_output=True, text=True, check=True
    )
    result = []
    for link in json.loads(out.stdout):
        for info in link.get("addr_info", []):
            result.append(
                (link["ifname"], ipaddress.IPv4Interface(f"{info['local']}/{info['prefixlen']}"))
            )
    return result


def address_in(network: ipaddress.IPv4Network) -> tuple[str, ipaddress.IPv4Address]:
    """(interface, address) of this container on `network`; waits for docker to attach it."""
    deadline = time.monotonic() + WAIT_S
    while True:
        for ifname, iface in addresses():
            if iface.ip in network and iface.network == network:
                return ifname, iface.ip
        if time.monotonic() > deadline:
            raise SystemExit(f"entry: no address in {network} on any interface")
        time.sleep(0.2)


def underlay_address() -> ipaddress.IPv4Address:
    """EGRESSD_UNDERLAY_ADDRESS, else this container's address on DESIGN.md's underlay."""
    return env().underlay or address_in(UNDERLAY)[1]


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def health(role: str) -> int:
    if role == "control":
        status, _ = http_get(f"{env().control_url}/readyz")
        return 0 if status == 200 else 1
    if role == "inet":
        with socket.create_connection(("203.0.113.10", 443), timeout=2):
            return 0
    if role == "proxy":
        underlay = underlay_address()
        status, _ = http_get(f"http://{underlay}:{ADMIN_PORT}/readyz")
        return 0 if status == 200 else 1
    if role in ("node", "loadgen"):
        # Ready, and at least one proxy healthy: a sandbox started now has a path out.
        underlay = underlay_address()
        status, _ = http_get(f"http://{underlay}:{ADMIN_PORT}/readyz")
        if status != 200:
            return 1
        _, metrics = http_get(f"http://{underlay}:{ADMIN_PORT}/metrics")
        try:
            samples = metrics_text.parse(metrics.decode())
        except metrics_text.MetricsTextError:
            return 1
        if not any(s.value == 1 for s in metrics_text.matching(samples, "egressd_proxy_up")):
            return 1
        if role == "node":
            status, _ = http_get(f"http://{underlay}:{JOBS_PORT}/healthz")
            return 0 if status == 200 else 1
        return 0
    if role == "demo":
        return 0 if DEMO_RESULT.exists() and DEMO_RESULT.read_text().strip() == "0" else 1
    raise SystemExit(f"unknown role {role!r}")
