"""`sandbox run`'s launcher options: runsc's platform (flag or configuration) and stdin."""

from __future__ import annotations

import argparse

import pytest

from egressd.sandbox import cli


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    return parser.parse_args(["sandbox", "run", "--node", "n", "--policy", "p", *argv])


def test_platform_defaults_to_runscs_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cli.PLATFORM_ENV, raising=False)
    args = _parse(["--", "true"])
    assert args.platform is None and args.interactive is False


def test_platform_from_the_environment_and_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cli.PLATFORM_ENV, "kvm")
    assert _parse(["--", "true"]).platform == "kvm"
    assert _parse(["--platform", "ptrace", "--", "true"]).platform == "ptrace"
    monkeypatch.setenv(cli.PLATFORM_ENV, "")
    assert _parse(["--", "true"]).platform is None


def test_interactive() -> None:
    assert _parse(["-i", "--", "cat"]).interactive is True
    assert _parse(["--interactive", "--", "cat"]).command == ["--", "cat"]
