"""The deploy settings' directories and the load generator's run (issue 9, item 4): read once
through `env()` like the fleet's addresses, never at import, never from os.environ elsewhere."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from egressd_harness.deploy import entry, jobs, settings
from egressd_harness.deploy.settings import DeploySettings, SettingsError, from_env

ROOT = Path(__file__).resolve().parents[4]
DEPLOY = Path(entry.__file__).parent


def test_unset_are_the_images_paths_and_the_compose_load_run() -> None:
    got = from_env({"PATH": "/usr/bin"})
    assert got.run_dir == Path("/run/egressd")
    assert got.fleet_dir == Path("/fleet")
    assert got.log_dir == Path("/var/log/egressd")
    assert got.udfs == Path("/opt/egressd/app/sandbox/udfs")
    assert got.locustfile == Path("/opt/egressd/loadtests/locustfile.py")
    assert (got.load_users, got.load_run_time, got.load_class) == (10, "60s", "Steady")
    assert got.given == frozenset()


def test_set_values_are_taken_and_remembered_as_given() -> None:
    env = {
        "EGRESSD_RUN_DIR": "/tmp/r",
        "EGRESSD_FLEET_DIR": "/tmp/f",
        "EGRESSD_LOG_DIR": " /tmp/l ",
        "EGRESSD_UDFS": "/tmp/u",
        "EGRESSD_LOCUSTFILE": "/tmp/locustfile.py",
        "EGRESSD_LOAD_USERS": "250",
        "EGRESSD_LOAD_RUN_TIME": "1h30m",
        "EGRESSD_LOAD_CLASS": "BandwidthHog",
        "EGRESSD_NODE_NAME": "loadgen",
        "HOME": "/root",
    }
    got = from_env(env)
    assert (got.run_dir, got.fleet_dir, got.log_dir, got.udfs) == (
        Path("/tmp/r"),
        Path("/tmp/f"),
        Path("/tmp/l"),
        Path("/tmp/u"),
    )
    assert got.locustfile == Path("/tmp/locustfile.py")
    assert (got.load_users, got.load_run_time, got.load_class) == (250, "1h30m", "BandwidthHog")
    assert got.given == frozenset(k for k in env if k.startswith("EGRESSD_"))
    # Which variables were set is not part of the value: the defaults spelled out are equal.
    assert from_env({"EGRESSD_FLEET_DIR": "/fleet"}) == DeploySettings()
    assert from_env({"EGRESSD_FLEET_DIR": "/fleet"}).given == {"EGRESSD_FLEET_DIR"}


@pytest.mark.parametrize("run_time", ["60", "60s", "5m", "2h", "1h30m", "3h30m10s"])
def test_locust_run_times_are_accepted(run_time: str) -> None:
    assert from_env({settings.LOAD_RUN_TIME: run_time}).load_run_time == run_time


@pytest.mark.parametrize(
    ("var", "value", "why"),
    [
        ("EGRESSD_RUN_DIR", "run/egressd", "absolute path"),
        ("EGRESSD_FLEET_DIR", "", "set but empty"),
        ("EGRESSD_LOG_DIR", "logs", "absolute path"),
        ("EGRESSD_UDFS", "./udfs", "absolute path"),
        ("EGRESSD_LOCUSTFILE", "locustfile.py", "absolute path"),
        ("EGRESSD_LOAD_USERS", "0", "from 1 to 1000"),
        ("EGRESSD_LOAD_USERS", "1001", "from 1 to 1000"),
        ("EGRESSD_LOAD_USERS", "ten", "from 1 to 1000"),
        ("EGRESSD_LOAD_USERS", "-5", "from 1 to 1000"),
        ("EGRESSD_LOAD_USERS", "\u00b2", "from 1 to 1000"),
        ("EGRESSD_LOAD_RUN_TIME", "0s", "above zero"),
        ("EGRESSD_LOAD_RUN_TIME", "forever", "above zero"),
        ("EGRESSD_LOAD_RUN_TIME", "30m1h", "above zero"),
        ("EGRESSD_LOAD_CLASS", "Steady --users 1000000", "class name"),
        ("EGRESSD_LOAD_CLASS", "1Steady", "class name"),
    ],
)
def test_a_bad_value_is_refused_naming_its_variable(var: str, value: str, why: str) -> None:
    with pytest.raises(SettingsError, match="bad_environment") as caught:
        from_env({var: value})
    assert f"{var}={value!r}" in str(caught.value) and why in str(caught.value)


def test_every_bad_variable_is_in_the_one_error() -> None:
    bad = {"EGRESSD_LOG_DIR": "x", "EGRESSD_LOAD_USERS": "0", "EGRESSD_NODE_NAME": "A.b"}
    with pytest.raises(SettingsError) as caught:
        from_env(bad)
    assert all(var in str(caught.value) for var in bad)


def _environ_reads(path: Path) -> list[tuple[str, int]]:
    """(enclosing function or <module>, line) of each os.environ / os.getenv in `path`."""
    found = []

    def visit(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            scope = child.name if isinstance(child, ast.FunctionDef) else where
            if isinstance(child, ast.Attribute) and child.attr in ("environ", "getenv"):
                found.append((where, child.lineno))
            if isinstance(child, ast.Name) and child.id in ("environ", "getenv"):
                found.append((where, child.lineno))
            visit(child, scope)

    visit(ast.parse(path.read_text()), "<module>")
    return found


def test_only_env_reads_the_environment() -> None:
    reads = {p.name: _environ_reads(p) for p in sorted(DEPLOY.glob("*.py"))}
    assert {name for name, r in reads.items() if r} == {"health.py"}, reads
    assert [where for where, _ in reads["health.py"]] == ["env"]


def _run(code: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**base, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_importing_reads_nothing_and_a_role_is_refused_on_its_first_read(tmp_path: Path) -> None:
    imports = "from egressd_harness.deploy import entry, jobs, loadgen"
    bad = {"EGRESSD_LOG_DIR": "relative/logs", "EGRESSD_LOAD_USERS": "0"}
    assert _run(imports, bad, tmp_path).returncode == 0
    done = _run(f"{imports}\nentry.supervise('t', ['true'])", bad, tmp_path)
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("entry: bad_environment: ")
    assert "EGRESSD_LOG_DIR='relative/logs'" in last and "EGRESSD_LOAD_USERS='0'" in last
    assert not (tmp_path / "relative").exists()


def test_a_daemons_log_goes_to_the_configured_log_dir(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    child = [sys.executable, "-c", "import sys; sys.stderr.write('a log line\\n')"]
    code = f"from egressd_harness.deploy import entry\nraise SystemExit(entry.supervise('t', {child!r}))"
    done = _run(code, {"EGRESSD_LOG_DIR": str(log_dir)}, tmp_path)
    assert done.returncode == 0, done.stderr
    assert (log_dir / "t.log").read_text() == "a log line\n"


def test_the_job_api_mounts_the_configured_udfs(
    monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    monkeypatch.setenv(settings.UDFS, str(tmp_path / "udfs"))
    entry.env.cache_clear()
    request.addfinalizer(entry.env.cache_clear)
    argv = jobs.sandbox_argv("node1", tmp_path, tmp_path / "p.jws", "probe.py", [], 10)
    assert argv[argv.index("--mount") + 1] == f"{tmp_path / 'udfs'}:/udfs"
