"""Files the daemons read at run time are package data, found with importlib.resources.

`Path(__file__).parents[N]` finds a file only in a checkout; an installed
egressd (a wheel) has no `bpf/` beside its package. The wheel's content was
checked once by building it (docs/decisions.md); here: the checkout's link,
the agent's default, and pyproject.toml's package-data.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path

import egressd

ROOT = Path(egressd.__file__).resolve().parents[1]
#: Packages of the daemons and their libraries (harness code may read a checkout's files).
DAEMON_PACKAGES = ("agent", "proxy", "control", "policy", "geneve", "limits", "net", "audit")


def test_tier1_source_is_package_data_with_the_checkouts_content() -> None:
    found = resources.files("egressd.agent").joinpath("bpf", "tier1.c")
    assert found.is_file()
    assert found.read_bytes() == (ROOT / "bpf" / "tier1.c").read_bytes()


def test_the_agent_builds_the_packaged_source() -> None:
    from egressd.agent.tier1 import DEFAULT_SOURCE

    assert Path(str(resources.files("egressd.agent").joinpath("bpf", "tier1.c"))) == DEFAULT_SOURCE
    assert DEFAULT_SOURCE.is_file()


def test_pyproject_ships_every_data_file_the_package_reads() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    shipped = config["tool"]["setuptools"]["package-data"]["egressd"]
    assert {"agent/bpf/tier1.c", "policy/schema.json", "py.typed"} <= set(shipped)
    for name in shipped:
        assert (ROOT / "egressd" / name).is_file(), name


def test_no_daemon_module_finds_files_relative_to_its_own_path() -> None:
    offenders = [
        str(path.relative_to(ROOT))
        for package in DAEMON_PACKAGES
        for path in sorted((ROOT / "egressd" / package).rglob("*.py"))
        if "__file__" in path.read_text()
    ]
    assert offenders == []
