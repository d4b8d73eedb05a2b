"""`python -m egressd_harness.deploy ROLE`: the dispatch (in `egressd_harness/deploy/__main__.py`, so that
`entry` does not import `demo`/`loadgen` back) and the load generator's node identity,
which comes from the environment like any node's, never written into it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from egressd_harness.deploy import entry, health, loadgen, settings
from egressd_harness.deploy.__main__ import main
from tests.support.deploy import ROOT, compose


def test_no_role_is_a_usage_line() -> None:
    with pytest.raises(
        SystemExit, match=r"^usage: python -m egressd_harness.deploy ROLE \| health ROLE$"
    ):
        main([])


def test_an_unknown_role_names_the_known_ones() -> None:
    with pytest.raises(SystemExit, match=r"unknown role 'bogus' \(one of control, inet, node, pro"):
        main(["bogus"])


def test_health_of_a_role_reports_unhealthy_as_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def down(role: str) -> int:
        raise OSError(f"{role}: connection refused")

    monkeypatch.setattr(health, "health", down)
    assert main(["health", "proxy"]) == 1
    assert capsys.readouterr().err == "unhealthy: proxy: connection refused\n"


def test_a_healthcheck_imports_neither_entry_nor_pyroute2() -> None:
    # The compose healthcheck has 5 s; entry's imports alone took 3 s on a loaded host.
    probe = (
        "import sys\n"
        "from egressd_harness.deploy.__main__ import main\n"
        "main(['health', 'demo'])\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('pyroute2', 'dns') "
        "or m == 'egressd_harness.deploy.entry')\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_each_role_runs_its_entry_function(monkeypatch: pytest.MonkeyPatch) -> None:
    for role in ("control", "inet", "proxy", "node"):
        monkeypatch.setattr(entry, f"role_{role}", lambda role=role: len(role))
        assert main([role]) == len(role)


def test_the_module_runs_as_a_program() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "egressd_harness.deploy", "bogus"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("unknown role 'bogus'")


@pytest.mark.parametrize("unset", [settings.NODE_NAME, settings.SANDBOX_CIDR])
def test_loadgen_without_its_own_name_and_cidr_starts_nothing(
    monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest, unset: str
) -> None:
    monkeypatch.setenv(settings.NODE_NAME, "loadgen")
    monkeypatch.setenv(settings.SANDBOX_CIDR, "100.96.9.0/24")
    monkeypatch.delenv(unset)
    entry.env.cache_clear()
    request.addfinalizer(entry.env.cache_clear)
    monkeypatch.setattr(entry, "start_node", lambda: pytest.fail("started a node"))
    before = dict(os.environ)
    with pytest.raises(SystemExit, match=f"loadgen: {unset} must be set"):
        loadgen.main([])
    assert dict(os.environ) == before  # nothing written into the environment


def test_compose_gives_the_load_generator_a_node_identity_of_its_own() -> None:
    services = compose()["services"]
    mine = services["locust"]["environment"]
    node = services["node"]["environment"]
    assert mine[settings.NODE_NAME] == "loadgen" != node[settings.NODE_NAME]

    def literal(env: dict[str, object]) -> dict[str, str]:
        # Values compose interpolates (EGRESSD_DATAPATH: ${EGRESSD_DATAPATH:-kernel}) are not
        # the container's yet.
        return {k: str(v) for k, v in env.items() if k in settings.VARIABLES and "${" not in str(v)}

    parsed = settings.from_env(literal(mine))
    assert parsed.node_name == "loadgen"
    mine_cidr, node_cidr = parsed.sandbox_cidr, settings.from_env(literal(node)).sandbox_cidr
    assert mine_cidr is not None and node_cidr is not None
    assert not mine_cidr.overlaps(node_cidr)
