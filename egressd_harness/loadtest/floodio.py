"""The I/O of the flood scenarios (issue 15): the flooder process, tier 1's
per-sandbox counters on the attacker's node, and a count of the attacker's
packets that reach each proxy.

- `FloodRun`: `python -m egressd_harness.loadtest.flood KIND ...` in the attacker's
  namespace, the same life cycle as a `LocustRun` (start, wait, stop, read);
- `tier1_counts`: the attacker's veth's counters by reason, read from the
  agent's pinned `t1_counters` map (per-CPU hash {ifindex, reason}) with the
  agent's own reader (`egressd.agent.tier1.read_counters`), read only (no write
  to the map): the agent's /metrics sums every sandbox, and a victim
  on the same node shares its veth with nothing but itself;
- `ProxyTap`: a table of the load test's own in each proxy's namespace
  (`ip egd_loadtest`, a prerouting chain that only counts: the attacker's
  UDP to port 53 and its bare SYNs), so that what got past tier 1 is counted
  where the proxy's stack first sees it, before TPROXY, the DNS responder and
  the listener's SYN queue. The proxy's own table is not touched; the tap
  goes with the fleet's namespaces.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import structlog

from egressd.agent.tier1 import read_counters
from egressd.ebpf import syscall as bpf
from egressd.ebpf.build import EbpfError
from egressd.net import netns as kn

log = structlog.get_logger("egressd_harness.loadtest")

FLOOD_GRACE_S = 15.0
TAP_TABLE = "egd_loadtest"
TAP_COUNTERS = ("attacker_dns", "attacker_syn")


class FloodRun:
    """The attacker's flooder through the whole schedule (bounded by itself)."""

    def __init__(
        self,
        python: str,
        netns: str,
        kind: str,
        schedule: str,
        seconds: float,
        rate: float,
        max_flood_s: float,
        workdir: Path,
        role: str,
        *,
        src: IPv4Address | None = None,
        dst: IPv4Address | None = None,
        port: int = 80,
    ) -> None:
        self.role = role
        self.summary_path = workdir / f"{role}_summary.json"
        self.output = workdir / f"{role}_flood.log"
        self.argv = [
            "ip",
            "netns",
            "exec",
            netns,
            python,
            "-m",
            "egressd_harness.loadtest.flood",
            kind,
            "--schedule",
            schedule,
            "--rate",
            f"{rate:g}",
            "--max-seconds",
            f"{max_flood_s:g}",
            "--summary",
            str(self.summary_path),
        ]
        if kind == "syn":
            assert src is not None and dst is not None
            self.argv += ["--src", str(src), "--dst", str(dst), "--port", str(port)]
        self.timeout_s = seconds + FLOOD_GRACE_S
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.output, "wb") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        log.info("flood_started", role=self.role, pid=self.proc.pid)

    def wait(self) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            log.error("flood_overran", role=self.role)
            self.stop()
            return -1

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def read(self) -> dict[str, Any]:
        with contextlib.suppress(OSError, ValueError):
            out = json.loads(self.summary_path.read_text())
            if isinstance(out, dict):
                return out
        return {}

    def tail(self, lines: int = 5) -> str:
        with contextlib.suppress(OSError):
            return " | ".join(self.output.read_text(errors="replace").splitlines()[-lines:])
        return ""


# --- tier 1 ---------------------------------------------------------------------------------


def link_index(ns: str, ifname: str) -> int:
    done = kn.run_in_netns(ns, ["ip", "-j", "link", "show", "dev", ifname])
    try:
        return int(json.loads(done.stdout)[0]["ifindex"])
    except (ValueError, IndexError, KeyError, TypeError) as exc:
        raise kn.NetError("link_failed", f"{ifname} in {ns}: {exc}") from exc


def tier1_counts(pin_dir: Path, ifindex: int) -> dict[str, int]:
    """Packets by reason that tier 1 counted on the veth `ifindex` (read-only)."""
    fd = bpf.obj_get(pin_dir / "maps" / "t1_counters")
    try:
        counts = read_counters(fd, skip_unknown=True)  # another checkout's agent may know more
    finally:
        os.close(fd)
    return {str(reason): c.packets for (index, reason), c in counts.items() if index == ifindex}


@dataclass(frozen=True, slots=True)
class Tier1Probe:
    """Where to read the attacker's tier-1 counters."""

    pin_dir: Path
    node_ns: str
    host_veth: str

    def read(self) -> dict[str, int] | None:
        try:
            return tier1_counts(self.pin_dir, link_index(self.node_ns, self.host_veth))
        except (OSError, EbpfError, kn.NetError) as exc:
            log.error("tier1_counters_unreadable", pin_dir=str(self.pin_dir), error=str(exc))
            return None


# --- the proxies' tap ------------------------------------------------------------------------


def tap_script(attacker: IPv4Address) -> str:
    """The nft script of the tap (a fresh table: created, flushed, filled)."""
    return f"""table ip {TAP_TABLE}
delete table ip {TAP_TABLE}
table ip {TAP_TABLE} {{
    counter attacker_dns {{ }}
    counter attacker_syn {{ }}
    chain pre {{
        type filter hook prerouting priority -300; policy accept;
        ip saddr {attacker} udp dport 53 counter name "attacker_dns"
        ip saddr {attacker} tcp flags & (syn | ack) == syn counter name "attacker_syn"
    }}
}}
"""


def parse_tap(text: str) -> dict[str, int]:
    """`nft -j list counters table ip egd_loadtest`: {counter name: packets}."""
    out = {}
    for item in json.loads(text).get("nftables", []):
        counter = item.get("counter") if isinstance(item, dict) else None
        if isinstance(counter, dict) and counter.get("name") in TAP_COUNTERS:
            out[str(counter["name"])] = int(counter.get("packets", 0))
    return out


class ProxyTap:
    def __init__(self, namespaces: dict[str, str]) -> None:
        self.namespaces = namespaces  # proxy -> its namespace

    def install(self, attacker: IPv4Address) -> None:
        for ns in self.namespaces.values():
            kn.run_in_netns(ns, ["nft", "-f", "-"], stdin_text=tap_script(attacker))

    def read(self) -> dict[str, dict[str, int] | None]:
        out: dict[str, dict[str, int] | None] = {}
        for proxy, ns in self.namespaces.items():
            try:
                done = kn.run_in_netns(
                    ns, ["nft", "-j", "list", "counters", "table", "ip", TAP_TABLE]
                )
                out[proxy] = parse_tap(done.stdout)
            except (kn.NetError, ValueError, TypeError) as exc:
                log.error("tap_unreadable", proxy=proxy, error=str(exc))
                out[proxy] = None
        return out

    def remove(self) -> None:
        for ns in self.namespaces.values():
            with contextlib.suppress(kn.NetError):
                kn.run_in_netns(ns, ["nft", "delete", "table", "ip", TAP_TABLE], check=False)
