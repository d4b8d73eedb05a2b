"""The compose entry points' pure parts (no docker): the configs they write are
the daemons' own valid configs, proxy names, and the node's job API."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from egressd.agent.config import parse_config as parse_agent_config
from egressd.layout import NodeSpec, ProxySpec
from egressd.proxy.config import config_from_mapping
from egressd_harness.deploy import entry, jobs
from egressd_harness.topology.fleet import Fleet

UDFS = Path(__file__).resolve().parents[2] / "sandbox" / "udfs"


def test_agent_config_discovers_proxies_from_the_control_plane() -> None:
    spec = NodeSpec("node1", IPv4Address("198.18.0.11"), IPv4Network("100.96.1.0/24"))
    fleet = Fleet(entry.layout(nodes=(spec,)))
    config = parse_agent_config(json.loads(json.dumps(entry.agent_config(fleet, spec))))
    assert config.proxies == ()
    assert config.discovery is not None
    assert config.discovery.proxies_url == "http://198.18.0.2:8080/v1/proxies"
    assert config.offload is True


def test_proxy_config_is_valid() -> None:
    spec = ProxySpec(
        entry.proxy_name(IPv4Address("198.18.0.130")),
        IPv4Address("198.18.0.130"),
        IPv4Address("203.0.113.130"),
    )
    config = config_from_mapping(Fleet(entry.layout(proxies=(spec,))).proxy_config(spec))
    assert config.name == "proxy-130"


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
