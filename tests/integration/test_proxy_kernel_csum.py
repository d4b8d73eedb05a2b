"""`nodes_decap_in_kernel` through a real kernel-path proxy process and real nodes.

The fleet is test_proxy_dataplane's (tests/support/proxy_fleet.py, a fresh prefix for this
module). What is checked on the proxy's underlay (u0 in the proxy namespace):

* unset (the safe default): transmit checksum offload is off while the proxy runs and back
  on after SIGTERM, and a 2 MiB download reaches a userspace node (the mini agent: GENEVE
  read from a UDP socket, written to a TUN) intact;
* set: the offload stays on, and the same download reaches a sandbox behind a real
  ``egressd agent serve`` with ``"datapath": "kernel"`` (tc decapsulates and redirects to
  the sandbox veth, whose receiver accepts a partial checksum) intact, by SHA-256;
* set, with a userspace node: the node's TCP gets partial inner checksums and drops every
  segment, so nothing arrives -- why the statement is the operator's, and false by default.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import Ethtool

from egressd.agent.client import AgentClient, SandboxInfo
from egressd.layout import CONTROL_ADDR
from egressd.metrics_text import metric_value, parse
from egressd.net import netns as kn
from egressd.policy.jws import policy_digest
from egressd_harness.topology.network import UNDERLAY_IF
from tests.support.processes import tear_down_node
from tests.support.proxy_fleet import (
    ADMIN_PORT,
    JOB,
    NODE,
    PROXY,
    REPO,
    SITE,
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    Fleet,
    ProxyProcess,
    agent_for,
    http,
    sandbox_get,
)
from tests.support.root import AGENT_NEEDS, NETNS_TOOLS
from tests.support.tier1 import in_netns
from tests.support.waits import wait_for

pytestmark = pytest.mark.root(*NETNS_TOOLS, *AGENT_NEEDS, "clang", "bpftool", "tc")

BULK = bytes(range(256)) * 8192  # 2 MiB: many 64 KB super-packets


@pytest.fixture(scope="module")
def fleet(proxy_fleet: Fleet) -> Fleet:
    (proxy_fleet.root / "www" / "bulk.bin").write_bytes(BULK)
    return proxy_fleet


@contextlib.contextmanager
def kernel_proxy(fleet: Fleet, **overrides: object) -> Iterator[ProxyProcess]:
    proxy = ProxyProcess(
        fleet,
        datapath="kernel",
        state_dir=str(fleet.root / f"kstate-{fleet.prefix}"),
        **overrides,
    )
    try:
        proxy.wait_ready()
        yield proxy
    finally:
        proxy.kill()
        ns = fleet.proxy_ns
        kn.run_in_netns(ns, ["nft", "delete", "table", "inet", "egressd"], check=False)
        kn.run_in_netns(ns, ["tc", "qdisc", "del", "dev", UNDERLAY_IF, "clsact"], check=False)


def proxy_tx_checksum(fleet: Fleet) -> bool:
    """The underlay's ``tx-checksum-ip-generic`` (the veth's one checksum offload; the legacy
    ETHTOOL_GTXCSUM also reports ``tx-checksum-sctp``, which the proxy does not touch)."""
    with in_netns(fleet.proxy_ns), contextlib.closing(Ethtool()) as tool:
        return bool(tool.get_features(UNDERLAY_IF).features["tx-checksum-ip-generic"].enable)


def loaded_event(proxy: ProxyProcess) -> dict[str, Any]:
    events = [json.loads(line) for line in proxy.log().splitlines() if line.startswith("{")]
    (event,) = [e for e in events if e.get("event") == "kernel_datapath_loaded"]
    return event


def get_bulk(ns: str, bind: str, timeout: float = 20.0) -> bytes:
    """The body of an HTTP/1.0 GET of SITE's /bulk.bin from `bind` in `ns`."""
    with contextlib.closing(kn.netns_socket(ns)) as sock:
        sock.settimeout(timeout)
        sock.bind((bind, 0))
        sock.connect((SITE, 80))
        sock.sendall(b"GET /bulk.bin HTTP/1.0\r\nHost: api.allowed.test\r\n\r\n")
        chunks = []
        while chunk := sock.recv(1 << 20):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head[:200]
    return body


def policy_jws(fleet: Fleet) -> str:
    _, body = http(fleet.ctl, "GET", str(CONTROL_ADDR), 8080, f"/v1/jobs/{JOB}/policy")
    return str(json.loads(body)["jws"])


def test_unset_turns_the_offload_off_and_a_userspace_node_gets_the_download(fleet: Fleet) -> None:
    assert proxy_tx_checksum(fleet), "the veth starts with its offload on"
    with kernel_proxy(fleet) as proxy:
        assert loaded_event(proxy)["underlay_tx_checksum"] == "off"
        assert not proxy_tx_checksum(fleet)
        with agent_for(fleet, JOB, digest=_digest(fleet), tun="sbx1"):
            body = get_bulk(fleet.node_ns, "100.96.1.5")
        assert hashlib.sha256(body).digest() == hashlib.sha256(BULK).digest(), len(body)
        assert proxy.terminate() == 0, proxy.log()
    assert proxy_tx_checksum(fleet), "the device's setting is back"


def test_set_keeps_the_offload_and_a_kernel_node_gets_the_download(
    fleet: Fleet, tmp_path: Path
) -> None:
    with kernel_proxy(fleet, nodes_decap_in_kernel=True) as proxy:
        assert loaded_event(proxy)["underlay_tx_checksum"] == "kept"
        assert proxy_tx_checksum(fleet)
        with kernel_agent(fleet, tmp_path) as (register, stderr):
            info = register("sbx-csum", policy_jws(fleet))
            for _ in range(2):  # the slow path programs the job, then the fast path
                body = get_bulk(info.netns, str(info.ip))
                assert hashlib.sha256(body).digest() == hashlib.sha256(BULK).digest(), (
                    len(body),
                    stderr()[-2000:],
                )

        def returned() -> float:
            m = proxy.metrics()
            return m.get(("egressd_kernel_packets_total", (("path", "return"),)), 0.0)

        # The kernel's counters reach /metrics at the datapath's next sync (once a second).
        wait_for(lambda: returned() > 0, 10, "the return path's packets counted")
        assert proxy_tx_checksum(fleet)
        assert proxy.terminate() == 0, proxy.log()
    assert proxy_tx_checksum(fleet), "left as it was found"


def test_set_with_a_userspace_node_delivers_nothing(fleet: Fleet) -> None:
    with (
        kernel_proxy(fleet, nodes_decap_in_kernel=True),
        agent_for(fleet, JOB, digest=_digest(fleet), tun="sbx1"),
        pytest.raises(OSError),  # no SYN-ACK passes the node's checksum check
    ):
        sandbox_get(fleet, "/hello.txt", timeout=4)


def _digest(fleet: Fleet) -> bytes:
    return policy_digest(policy_jws(fleet))


@contextlib.contextmanager
def kernel_agent(fleet: Fleet, root: Path) -> Iterator[Any]:
    """A real `egressd agent serve` on the kernel data path in the fleet's node namespace;
    yields (register(sandbox_id, jws) -> SandboxInfo, stderr())."""
    state = root / "agent-state"
    api = root / "agent.sock"
    config = {
        "name": NODE.name,
        "underlay": str(NODE.underlay),
        "sandbox_cidr": str(NODE.sandbox_cidr),
        "proxies": [{"name": PROXY.name, "underlay": str(PROXY.underlay)}],
        "keys_dir": str(fleet.keys_dir),
        "api_socket": str(api),
        "state_dir": str(state),
        "sandbox_netns_prefix": f"{fleet.prefix}s-",
        "datapath": "kernel",
    }
    path = root / "agent.json"
    path.write_text(json.dumps(config))
    log_path = root / "agent.log"
    agent = kn.popen_in_netns(
        fleet.node_ns,
        [sys.executable, "-m", "egressd", "agent", "serve", "--config", str(path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=log_path.open("wb"),
        cwd=str(REPO),
    )

    def stderr() -> str:
        return log_path.read_text(errors="replace")

    def ready() -> bool:
        if agent.poll() is not None:
            raise AssertionError(f"agent exited {agent.returncode}:\n{stderr()[-4000:]}")
        with contextlib.suppress(OSError):
            _, text = http(fleet.node_ns, "GET", str(NODE.underlay), ADMIN_PORT, "/metrics")
            up = metric_value(parse(text.decode()), "egressd_proxy_up", proxy=PROXY.name)
            return up == 1
        return False

    def register(sandbox_id: str, jws: str) -> SandboxInfo:
        async def go() -> SandboxInfo:
            async with AgentClient(api, timeout_s=30) as client:
                return await client.register(sandbox_id, jws)

        return asyncio.run(go())

    try:
        wait_for(ready, START_TIMEOUT_S, "the kernel agent up with its proxy healthy")
        yield register, stderr
    finally:
        tear_down_node(
            [agent],
            timeout_s=STOP_TIMEOUT_S,
            namespaces=[],
            leftovers=[f"{fleet.prefix}s-"],
            mounts=[state / "bpffs", state / "bpffs-node"],
        )
