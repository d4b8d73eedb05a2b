"""The compose entry points' pure parts (no docker): the configs they write are
the daemons' own valid configs, proxy names, and the node's job API."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from egressd.agent.config import parse_config as parse_agent_config
from egressd.layout import NodeSpec, ProxySpec
from egressd.proxy.config import config_from_mapping
from egressd_harness.deploy import entry, jobs

UDFS = Path(__file__).resolve().parents[2] / "sandbox" / "udfs"


@pytest.fixture
def datapath_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str | None], None]]:
    """Sets (a value) or unsets (None) EGRESSD_DATAPATH for `entry.env()`."""

    def use(value: str | None) -> None:
        if value is None:
            monkeypatch.delenv("EGRESSD_DATAPATH", raising=False)
        else:
            monkeypatch.setenv("EGRESSD_DATAPATH", value)
        entry.env.cache_clear()

    yield use
    entry.env.cache_clear()


# None: the compose default (kernel). Userspace offloads (TUN GSO); the kernel path
# excludes offload (a kernel node drops the fragmented GENEVE offload makes).
@pytest.mark.parametrize(
    ("given", "datapath", "offload"),
    [(None, "kernel", False), ("kernel", "kernel", False), ("userspace", "userspace", True)],
)
def test_agent_config_discovers_proxies_from_the_control_plane(
    datapath_env: Callable[[str | None], None], given: str | None, datapath: str, offload: bool
) -> None:
    datapath_env(given)
    spec = NodeSpec("node1", IPv4Address("198.18.0.11"), IPv4Network("100.96.1.0/24"))
    fleet = entry.member_fleet(entry.layout(nodes=(spec,)))
    config = parse_agent_config(json.loads(json.dumps(entry.agent_config(fleet, spec))))
    assert config.proxies == ()
    assert config.discovery is not None
    assert config.discovery.proxies_url == "http://198.18.0.2:8080/v1/proxies"
    assert config.datapath == datapath
    assert config.offload is offload


@pytest.mark.parametrize(
    ("given", "datapath", "offload"),
    [(None, "kernel", False), ("userspace", "userspace", True)],
)
def test_proxy_config_is_valid(
    datapath_env: Callable[[str | None], None], given: str | None, datapath: str, offload: bool
) -> None:
    datapath_env(given)
    spec = ProxySpec(
        entry.proxy_name(IPv4Address("198.18.0.130")),
        IPv4Address("198.18.0.130"),
        IPv4Address("203.0.113.130"),
    )
    fleet = entry.member_fleet(entry.layout(proxies=(spec,)))
    config = config_from_mapping(fleet.proxy_config(spec))
    assert config.name == "proxy-130"
    assert config.datapath == datapath
    assert config.offload is offload
    # One data path for the whole compose fleet: kernel nodes take partial checksums.
    assert config.nodes_decap_in_kernel is (datapath == "kernel")
    # The kernel path's bpffs and prebuilt objects live under it (entry.seed_bpf_cache).
    assert config.kernel_state_dir == entry.env().run_dir / "proxies" / "proxy-130"


def test_a_bad_datapath_stops_the_role(datapath_env: Callable[[str | None], None]) -> None:
    datapath_env("ebpf")
    with pytest.raises(SystemExit, match="EGRESSD_DATAPATH='ebpf': must be one of kernel"):
        entry.member_fleet(entry.layout())


class Recorder:
    def __init__(self) -> None:
        self.argv: list[str] = []

    def __call__(self, argv: list[str], **_kw: Any) -> subprocess.CompletedProcess[str]:
        self.argv = argv
        return subprocess.CompletedProcess(argv, 0, stdout='{"ok": true}\n', stderr="")


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Recorder]]:
    monkeypatch.setenv("EGRESSD_UDFS", str(UDFS))
    entry.env.cache_clear()
    recorder = Recorder()
    monkeypatch.setattr(jobs.subprocess, "run", recorder)
    (tmp_path / "config").mkdir()
    spec = NodeSpec("node1", IPv4Address("127.0.0.1"), IPv4Network("100.96.1.0/24"))
    srv = jobs.start_in_thread(spec, tmp_path, ("127.0.0.1", 0), "s3cret")
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", recorder
    finally:
        srv.shutdown()
        srv.server_close()
        entry.env.cache_clear()


def test_job_api_runs_a_shipped_udf_in_a_sandbox(server: tuple[str, Recorder]) -> None:
    url, recorder = server
    answer = jobs.run_udf(
        url, "s3cret", "eyJ.a.b", "probe.py", ["https://api.allowed.test/"], timeout=10
    )
    assert answer["exit_code"] == 0 and answer["stdout"] == '{"ok": true}\n'
    argv = recorder.argv
    assert argv[argv.index("--node") + 1] == "node1"
    assert argv[argv.index("--mount") + 1] == f"{UDFS}:/udfs"
    assert argv[argv.index("--") + 1 :] == [
        "python3",
        "/udfs/probe.py",
        "https://api.allowed.test/",
    ]


@pytest.mark.parametrize(
    ("token", "body", "status"),
    [
        ("wrong", {"policy": "x", "udf": "probe.py"}, 401),
        ("s3cret", {"policy": "x", "udf": "../../etc/passwd"}, 400),
        ("s3cret", {"policy": "x", "udf": "nope.py"}, 400),
        ("s3cret", {"policy": "x", "udf": "probe.py", "args": [1]}, 400),
        ("s3cret", {"policy": "x", "udf": "probe.py", "timeout": 10_000}, 400),
        ("s3cret", {"udf": "probe.py"}, 400),
    ],
)
def test_job_api_refuses(
    server: tuple[str, Recorder], token: str, body: dict[str, Any], status: int
) -> None:
    url, recorder = server
    req = urllib.request.Request(url + "/v1/run", data=json.dumps(body).encode(), method="POST")
    req.add_header("Authorization", f"Bearer {token}")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=5)
    assert err.value.code == status
    assert recorder.argv == []
