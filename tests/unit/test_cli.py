"""`egressd.cli`: each verb imports only its own module; errors are one line, printed once.

The import probes run the real command (`python -m egressd ...`) in a fresh
interpreter and read its `sys.modules` at exit: `egressd policy verify` must not
load a daemon (proxy, agent, the control plane's server), aiohttp or pyroute2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import pytest

from egressd import cli
from egressd.cliutil import CliError
from egressd.control.jobcli import JobCliError
from egressd.errors import EgressdError
from egressd.policy.jws import sign_policy
from egressd.policy.keys import generate_signing_key, write_key_dir
from egressd.policy.model import parse_policy

#: What a policy command must never load: daemons, their libraries, the harness.
FORBIDDEN = (
    "egressd.proxy",
    "egressd.agent",
    "egressd.control.service",
    "egressd.control.app",
    "egressd_harness.topology.fleet",
    "egressd_harness.bench",
    "egressd_harness.loadtest",
    "egressd_harness.demo",
    "aiohttp",
    "pyroute2",
    "uvloop",
    "scapy",
    "matplotlib",
)

# Runs `egressd ARGS` as `python -m egressd` does, then writes sys.modules to OUT.
PROBE = """
import json, runpy, sys
out, args = sys.argv[1], json.loads(sys.argv[2])
sys.argv = ["egressd", *args]
code = 0
try:
    runpy.run_module("egressd", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code
with open(out, "w") as fh:
    json.dump(sorted(sys.modules), fh)
sys.exit(code)
"""


def probe(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    out = tmp_path / "modules.json"
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(out), json.dumps(args)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done, set(json.loads(out.read_text()))


def forbidden(modules: set[str]) -> list[str]:
    return sorted(m for m in modules for p in FORBIDDEN if m == p or m.startswith(p + "."))


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(key directory, a JWS file) for `policy verify`."""
    base = tmp_path_factory.mktemp("signed")
    key = generate_signing_key()
    write_key_dir(base / "keys", key)
    now = int(time.time())
    policy = parse_policy(
        {
            "v": 1,
            "job_id": "2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2",
            "account": "acme",
            "nodes": ["node1"],
            "egress": [{"host": "api.allowed.test", "ports": [443]}],
            "iat": now,
            "nbf": now,
            "exp": now + 3600,
        },
        require_timestamps=True,
    )
    token = base / "policy.jws"
    token.write_text(sign_policy(policy, key) + "\n")
    return base / "keys", token


def test_policy_verify_help_loads_no_daemon(tmp_path: Path) -> None:
    done, modules = probe(tmp_path, "policy", "verify", "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: egressd policy verify ")
    assert "egressd.policy.cli" in modules  # the probe saw the command's own module
    assert forbidden(modules) == []


def test_policy_verify_loads_no_daemon(tmp_path: Path, signed: tuple[Path, Path]) -> None:
    keys, token = signed
    done, modules = probe(tmp_path, "policy", "verify", "--keys", str(keys), str(token))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["job_id"] == "2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2"
    assert forbidden(modules) == []


def test_a_rejected_policy_is_one_line_and_loads_no_daemon(
    tmp_path: Path, signed: tuple[Path, Path]
) -> None:
    keys, _ = signed
    bad = tmp_path / "bad.jws"
    bad.write_text("a.b.c\n")
    done, modules = probe(tmp_path, "policy", "verify", "--keys", str(keys), str(bad))
    assert done.returncode == 2
    assert done.stderr.startswith("egressd: error: policy rejected: ")
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert forbidden(modules) == []


def test_keys_generate_loads_no_daemon(tmp_path: Path) -> None:
    done, modules = probe(tmp_path, "keys", "generate", "--out", str(tmp_path / "k"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "k" / "signing.key").exists()
    assert forbidden(modules) == []


def test_the_top_level_help_still_lists_every_verb(tmp_path: Path) -> None:
    done, modules = probe(tmp_path, "--help")
    assert done.returncode == 0, done.stderr
    for verb in cli.COMMANDS:
        assert f"\n    {verb} " in done.stdout, verb
    assert set(cli.COMMANDS.values()) <= modules


# --- the table of verbs ---------------------------------------------------------------


def _verbs(parser: argparse.ArgumentParser) -> list[str]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


@pytest.mark.parametrize("module", sorted(set(cli.COMMANDS.values())))
def test_each_module_registers_exactly_the_verbs_the_table_gives_it(module: str) -> None:
    parser = argparse.ArgumentParser()
    importlib.import_module(module).register(parser.add_subparsers())
    assert set(_verbs(parser)) == {v for v, m in cli.COMMANDS.items() if m == module}


def test_the_full_parser_has_every_verb_in_the_tables_order() -> None:
    assert _verbs(cli.build_parser()) == list(cli.COMMANDS)
    assert _verbs(cli.build_parser("no-such-verb")) == list(cli.COMMANDS)


def test_a_verbs_parser_has_only_its_modules_verbs() -> None:
    assert _verbs(cli.build_parser("policy")) == ["keys", "policy"]
    assert _verbs(cli.build_parser("audit")) == ["audit"]


# --- errors: translated once, in main -----------------------------------------------------


@pytest.fixture
def fake_verb(monkeypatch: pytest.MonkeyPatch) -> Callable[[Callable[..., int]], None]:
    """Installs `egressd fake` whose handler is the given function."""

    def install(handler: Callable[..., int]) -> None:
        module = types.ModuleType("egressd_fake_verb")

        def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
            sub.add_parser("fake").set_defaults(handler=handler)

        module.register = register  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "egressd_fake_verb", module)
        monkeypatch.setitem(cli.COMMANDS, "fake", "egressd_fake_verb")

    return install


def _raise(exc: BaseException) -> Callable[[argparse.Namespace], int]:
    def handler(_args: argparse.Namespace) -> int:
        raise exc

    return handler


@pytest.mark.parametrize(
    ("exc", "line", "code"),
    [
        (CliError("--x: bad"), "egressd: error: --x: bad", 2),
        (CliError("no answer", exit_code=1), "egressd: error: no answer", 1),
        (JobCliError("get j: HTTP 500"), "egressd: error: get j: HTTP 500", 1),
        (
            EgressdError("bind_failed", "port 80:\n  in use"),
            "egressd: error: bind_failed: port 80: in use",
            2,
        ),
    ],
)
def test_a_failure_is_one_line_on_stderr(
    fake_verb: Callable[[Callable[..., int]], None],
    capsys: pytest.CaptureFixture[str],
    exc: EgressdError,
    line: str,
    code: int,
) -> None:
    fake_verb(_raise(exc))
    assert cli.main(["fake"]) == code
    out, err = capsys.readouterr()
    assert (out, err) == ("", line + "\n")


def test_ctrl_c_exits_130(fake_verb: Callable[[Callable[..., int]], None]) -> None:
    fake_verb(_raise(KeyboardInterrupt()))
    assert cli.main(["fake"]) == 130


def test_a_handlers_exit_code_is_mains(
    fake_verb: Callable[[Callable[..., int]], None], capsys: pytest.CaptureFixture[str]
) -> None:
    fake_verb(lambda _args: 7)
    assert cli.main(["fake"]) == 7
    assert capsys.readouterr() == ("", "")


def test_job_with_no_control_plane_is_one_line_exit_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Port 9 on loopback: nothing listens, the connection is refused at once.
    code = cli.main(["job", "list", "--control", "http://127.0.0.1:9", "--netns", ""])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert err.startswith("egressd: error: control plane http://127.0.0.1:9 unreachable: ")
    assert len(err.splitlines()) == 1
