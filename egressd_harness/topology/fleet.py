"""`egressd topology up | down | status`: the whole local fleet.

`up` is idempotent: it makes the run directory (keys, test CA, admin token),
builds the namespaces and links, starts every daemon that is not already
running (internet, control plane, proxies, node agents), registers nodes and
proxies with the control plane, and waits until each answers `/readyz`.
`down` stops every daemon (agents first, so they unregister their sandboxes
and detach tier 1; proxies remove their nftables tables), removes leftover
runsc containers, sandbox bundles and runsc logs (of launchers that were
killed), and every namespace of the fleet.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import structlog

from egressd.errors import EgressdError
from egressd.layout import (
    ADMIN_PORT,
    CONTROL_ADDR,
    CONTROL_PORT,
    CTL_NS,
    INET_NS,
    Layout,
    NodeSpec,
    ProxySpec,
)
from egressd.net import netns as kn
from egressd.policy import keys
from egressd.sandbox import SandboxError
from egressd.sandbox.rootfs import remove_bundle
from egressd_harness.topology import ca, interception, network, procs, proxy_secrets
from egressd_harness.topology.probe import ProbeError, http_request, is_ready

log = structlog.get_logger("egressd_harness.topology")

READY_TIMEOUT_S = 30.0


class FleetError(EgressdError):
    """The fleet could not be brought up or down."""


@dataclass(frozen=True, slots=True)
class Component:
    name: str
    netns: str
    argv: tuple[str, ...]
    # Where `/readyz` answers: (address, port); None for the internet daemon.
    ready_at: tuple[str, int] | None

    @property
    def spec(self) -> procs.DaemonSpec:
        return procs.DaemonSpec(self.name, self.netns, self.argv)


@dataclass(frozen=True, slots=True)
class ComponentStatus:
    name: str
    netns: str
    pid: int | None
    ready: bool | None

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "netns": self.netns, "pid": self.pid, "ready": self.ready}


#: The local fleet's data path (agents and proxies): "kernel" (issue 10: tc programs move the
#: packets, Python decides per connection). "userspace" stays a tested fallback: `make test`
#: runs the traffic e2e files again on it (docs/decisions.md, "Which data path the local
#: fleet runs").
DEFAULT_DATAPATH: Final = "kernel"


class Fleet:
    def __init__(
        self, layout: Layout, *, python: str = sys.executable, datapath: str = DEFAULT_DATAPATH
    ) -> None:
        self.layout = layout
        self.run_dir = layout.run_dir
        self.python = python
        # The whole fleet's data path ("userspace" or "kernel": egressd.agent.config and
        # egressd.proxy.config). The kernel node path drops the fragmented GENEVE that a
        # userspace proxy with TUN offload sends: with it, no member of the fleet uses offload.
        self.datapath = datapath

    # --- paths -------------------------------------------------------------

    @property
    def keys_dir(self) -> Path:
        return self.run_dir / "keys"

    @property
    def signing_key(self) -> Path:
        return self.keys_dir / "signing.key"

    @property
    def ca_dir(self) -> Path:
        return self.run_dir / "ca"

    @property
    def admin_token_file(self) -> Path:
        return self.run_dir / "admin-token"

    @property
    def control_url(self) -> str:
        return f"http://{CONTROL_ADDR}:{CONTROL_PORT}"

    def agent_socket(self, node: str) -> Path:
        return self.run_dir / "agents" / f"{node}.sock"

    def config_path(self, name: str) -> Path:
        return self.run_dir / "config" / f"{name}.json"

    def admin_token(self) -> str:
        return self.admin_token_file.read_text().strip()

    # --- the components ------------------------------------------------------

    def ns(self, layout_name: str) -> str:
        """The namespace of a layout member (`egd-node1`) under this fleet's prefix."""
        return network.netns_name(layout_name, self.layout.prefix)

    def _egressd(self, *args: str) -> tuple[str, ...]:
        return (self.python, "-m", "egressd", *args)

    def components(self) -> list[Component]:
        """Every daemon, in start order."""
        out = [
            Component(
                "inet",
                self.ns(INET_NS),
                self._egressd("inet", "serve", "--run-dir", str(self.run_dir)),
                None,
            ),
            Component(
                "control",
                self.ns(CTL_NS),
                self._egressd(
                    "control",
                    "serve",
                    "--state-dir",
                    str(self.run_dir / "control"),
                    "--key",
                    str(self.signing_key),
                    "--admin-token-file",
                    str(self.admin_token_file),
                    "--listen",
                    f"{CONTROL_ADDR}:{CONTROL_PORT}",
                ),
                (str(CONTROL_ADDR), CONTROL_PORT),
            ),
        ]
        for proxy in self.layout.proxies:
            argv = self._egressd("proxy", "serve", "--config", str(self.config_path(proxy.name)))
            out.append(
                Component(proxy.name, self.ns(proxy.netns), argv, (str(proxy.underlay), ADMIN_PORT))
            )
        for node in self.layout.nodes:
            argv = self._egressd("agent", "serve", "--config", str(self.config_path(node.name)))
            out.append(
                Component(node.name, self.ns(node.netns), argv, (str(node.underlay), ADMIN_PORT))
            )
        return out

    def proxy_config(self, proxy: ProxySpec) -> dict[str, object]:
        return {
            "name": proxy.name,
            "underlay": str(proxy.underlay),
            "egress": str(proxy.egress),
            "vni": self.layout.vni,
            "control_url": self.control_url,
            "keys_dir": str(self.keys_dir),
            "fleet_ranges": [str(r) for r in self.layout.fleet_ranges],
            "offload": self.datapath == "userspace",
            "datapath": self.datapath,
            # One data path for every node of the fleet: on the kernel one they all
            # decapsulate in tc, so the proxy keeps its underlay's checksum offload and TSO.
            "nodes_decap_in_kernel": self.datapath == "kernel",
            # The kernel path's bpffs and object: per fleet, so two fleets (e2e, bench)
            # never share /run/egressd/proxy/NAME.
            "state_dir": str(self.run_dir / "proxies" / proxy.name),
            **interception.proxy_settings(self.run_dir),
            **proxy_secrets.proxy_settings(self.run_dir),
        }

    def agent_config(self, node: NodeSpec) -> dict[str, object]:
        return {
            "name": node.name,
            "underlay": str(node.underlay),
            "sandbox_cidr": str(node.sandbox_cidr),
            "vni": self.layout.vni,
            "proxies": [{"name": p.name, "underlay": str(p.underlay)} for p in self.layout.proxies],
            "keys_dir": str(self.keys_dir),
            "api_socket": str(self.agent_socket(node.name)),
            "state_dir": str(self.run_dir / "agents" / node.name),
            "fleet_ranges": [str(r) for r in self.layout.fleet_ranges],
            "sandbox_netns_prefix": f"{self.layout.prefix}sbx-",
            "offload": self.datapath == "userspace",
            "datapath": self.datapath,
            # Live policies: registrations are checked against the control plane's
            # copy and the agent follows its watch (egressd.agent.policy_watch).
            "discovery": {"control_url": self.control_url},
        }

    # --- up ------------------------------------------------------------------

    def prepare_run_dir(self) -> None:
        for sub in ("logs", "pids", "config", "agents", "control"):
            (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
        self.run_dir.chmod(0o755)
        if not self.signing_key.exists():
            keys.write_key_dir(self.keys_dir, keys.generate_signing_key())
        ca.ensure_ca(self.ca_dir, self.layout)
        interception.ensure(self.run_dir)  # before the control plane: see topology.interception
        proxy_secrets.ensure(self.run_dir)
        if not self.admin_token_file.exists():
            self.admin_token_file.touch(mode=0o600)
            self.admin_token_file.write_text(secrets.token_urlsafe(32) + "\n")
        for proxy in self.layout.proxies:
            _write_json(self.config_path(proxy.name), self.proxy_config(proxy))
        for node in self.layout.nodes:
            _write_json(self.config_path(node.name), self.agent_config(node))

    def up(self) -> list[ComponentStatus]:
        self.prepare_run_dir()
        network.build(self.layout, self.layout.prefix)
        for component in self.components():
            procs.start(component.spec, self.run_dir)
            self._wait_ready(component)
            if component.name == "control":
                self.register_members()
        return self.status()

    def _wait_ready(self, component: Component) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if procs.exited_early(self.run_dir, component.name):
                raise FleetError("component_exited", self._died(component))
            if self._ready(component):
                log.info("component_ready", component=component.name)
                return
            time.sleep(0.1)
        raise FleetError("not_ready", f"{component.name} not ready after {READY_TIMEOUT_S:.0f}s")

    def _died(self, component: Component) -> str:
        last = " | ".join(procs.tail(self.run_dir, component.name, 3))
        return f"{component.name} exited; last log lines: {last}"

    def _ready(self, component: Component) -> bool:
        if component.ready_at is None:
            # The internet daemon has no admin port: its first site answering is enough.
            return tcp_open(component.netns, str(self.layout.sites[0].address), 443)
        host, port = component.ready_at
        return is_ready(component.netns, host, port)

    def control_put(self, path: str, body: dict[str, object]) -> dict[str, object]:
        reply = http_request(
            self.ns(CTL_NS),
            "PUT",
            str(CONTROL_ADDR),
            CONTROL_PORT,
            path,
            body=json.dumps(body).encode(),
            headers={
                "Authorization": f"Bearer {self.admin_token()}",
                "Content-Type": "application/json",
            },
        )
        if reply.status != 200:
            raise FleetError("control_rejected", f"PUT {path}: {reply.status} {reply.body[:200]!r}")
        result = reply.json()
        assert isinstance(result, dict)
        return result

    def register_members(self) -> None:
        for node in self.layout.nodes:
            self.control_put(
                f"/v1/nodes/{node.name}",
                {"underlay": str(node.underlay), "sandbox_cidr": str(node.sandbox_cidr)},
            )
        for proxy in self.layout.proxies:
            self.control_put(
                f"/v1/proxies/{proxy.name}",
                {"underlay": str(proxy.underlay), "egress": str(proxy.egress)},
            )

    def sign_policy(self, payload: dict[str, object]) -> str:
        """Have the control plane sign a job policy (payload without timestamps)."""
        job_id = payload["job_id"]
        return str(self.control_put(f"/v1/jobs/{job_id}/policy", payload)["jws"])

    # --- down ----------------------------------------------------------------

    def down(self) -> list[str]:
        stopped = []
        for component in reversed(self.components()):
            if procs.stop(self.run_dir, component.name):
                stopped.append(component.name)
        self._remove_sandbox_leftovers()
        removed = network.destroy(self.layout, self.layout.prefix)
        return stopped + [f"netns {name}" for name in removed]

    def _remove_sandbox_leftovers(self) -> None:
        runsc_root = self.run_dir / "runsc"
        if not runsc_root.exists():
            return
        listing = subprocess.run(
            ["runsc", "--root", str(runsc_root), "list", "-quiet"],
            capture_output=True,
            text=True,
            check=False,
        )
        for container in listing.stdout.split():
            subprocess.run(
                ["runsc", "--root", str(runsc_root), "delete", "-force", container],
                capture_output=True,
                check=False,
            )
        bundles = self.run_dir / "sandboxes"
        for bundle in sorted(bundles.iterdir()) if bundles.is_dir() else []:
            try:
                remove_bundle(bundle)
            except SandboxError as exc:
                log.warning("bundle_not_removed", bundle=str(bundle), detail=exc.detail)
        shutil.rmtree(self.run_dir / "logs" / "runsc", ignore_errors=True)

    # --- status ----------------------------------------------------------------

    def status(self) -> list[ComponentStatus]:
        out = []
        for component in self.components():
            pid = procs.running_pid(self.run_dir, component.name)
            ready = None
            if pid is not None and kn.netns_exists(component.netns):
                ready = self._ready(component)
            out.append(ComponentStatus(component.name, component.netns, pid, ready))
        return out


def _write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def tcp_open(ns: str, host: str, port: int) -> bool:
    try:
        sock = kn.netns_socket(ns)
    except kn.NetError:
        return False
    with sock:
        sock.settimeout(1.0)
        try:
            sock.connect((host, port))
        except OSError:
            return False
    return True


def wait_for(check: Callable[[], bool], timeout_s: float, interval_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval_s)
    return check()


__all__ = ["ComponentStatus", "Fleet", "FleetError", "ProbeError", "wait_for"]


def down_logged(fleet: Fleet) -> None:
    """`fleet.down()` for a clean-up path: a failure is logged, not raised
    (it must not hide the error that is unwinding)."""
    log.info("fleet_down")
    try:
        fleet.down()
    except EgressdError as exc:
        log.error("fleet_down_failed", reason=exc.reason, detail=exc.detail)
