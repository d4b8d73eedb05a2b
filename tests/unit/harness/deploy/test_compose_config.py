"""`docker compose up`, as typed on a fresh clone: `docker-compose -f deploy/compose.yaml
config` passes in a copy of the repository with nothing prepared (no deploy/.build, no
deploy/.env, no EGRESSD_* variables), builds from the repository root with the public
base image and the package index by default, and every file the Dockerfiles copy is
in the build context that /.dockerignore lets through."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.deploy import ROOT

COMPOSE = (os.environ.get("EGRESSD_COMPOSE") or "docker-compose").split()
PROFILES = ["--profile", "images", "--profile", "load", "--profile", "monitoring"]
EXPECTED_BUILDS = {
    # service: (Dockerfile, target, image name)
    "sandbox": ("deploy/Dockerfile", "sandbox", "egressd-sandbox"),
    "control": ("deploy/Dockerfile", "egressd", "egressd"),
    "node": ("deploy/Dockerfile", "node", "egressd-node"),
    "locust": ("deploy/Dockerfile", "loadgen", "egressd-loadgen"),
    "prometheus": ("deploy/Dockerfile", "prometheus", "egressd-prometheus"),
}


def fresh_copy(dest: Path) -> Path:
    """The files a clone would have: tracked and new (not ignored) files of the work tree."""
    listed = (
        subprocess.run(
            [
                "git",
                "-C",
                str(ROOT),
                "ls-files",
                "-z",
                "--cached",
                "--others",
                "--exclude-standard",
            ],
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        src = ROOT / name
        if not src.is_file():  # deleted in the work tree, not yet committed
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which(COMPOSE[0]) is None:
        pytest.fail(f"{COMPOSE[0]} missing: `make deps` installs docker-compose")
    root = fresh_copy(tmp_path_factory.mktemp("clone"))
    assert not (root / "deploy" / ".build").exists()
    assert not (root / "deploy" / ".env").exists()
    return root


def config(root: Path, *args: str, cwd: Path | None = None) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EGRESSD_", "COMPOSE_"))}
    done = subprocess.run(
        [*COMPOSE, *args, "config"],
        cwd=cwd or root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    data = yaml.safe_load(done.stdout)
    assert isinstance(data, dict)
    return data


def test_config_passes_on_a_fresh_clone(clone: Path) -> None:
    data = config(clone, "-f", "deploy/compose.yaml")
    # `config` lists every service (compose v1 with the profiles too); `up` starts these:
    default = sorted(n for n, s in data["services"].items() if not s.get("profiles"))
    assert default == ["control", "demo", "inet", "node", "proxy"]
    for name in ("control", "node"):
        build = data["services"][name]["build"]
        assert Path(build["context"]) == clone
        assert build["args"] == {
            "BASE_IMAGE": "debian:bookworm-slim",
            "WHEELHOUSE": "deploy/docker/no-wheelhouse",
        }


def test_config_inside_deploy_finds_compose_yaml(clone: Path) -> None:
    data = config(clone, cwd=clone / "deploy")
    assert "proxy" in data["services"]
    assert Path(data["services"]["control"]["build"]["context"]) == clone


def test_every_build_names_an_existing_dockerfile_and_stage(clone: Path) -> None:
    data = config(clone, "-f", "deploy/compose.yaml", *PROFILES)
    builds = {name: s["build"] for name, s in data["services"].items() if "build" in s}
    assert set(builds) == set(EXPECTED_BUILDS)
    for name, build in builds.items():
        dockerfile, target, image = EXPECTED_BUILDS[name]
        assert (build["dockerfile"], build["target"]) == (dockerfile, target)
        assert data["services"][name]["image"] == f"{image}:latest"
        text = (clone / dockerfile).read_text()
        assert re.search(rf"^FROM \S+ AS {target}$", text, re.MULTILINE), (
            f"{dockerfile}: no {target}"
        )
        assert (clone / build["args"]["WHEELHOUSE"]).is_dir()
    # Services without a build use an image that one of the builds makes.
    built = {f"{image}:latest" for _, _, image in EXPECTED_BUILDS.values()}
    for name, service in data["services"].items():
        assert service["image"] in built, name


def test_the_offline_route_is_build_arguments(clone: Path) -> None:
    env = {
        "EGRESSD_BASE_IMAGE": "egressd-base:bookworm-x",
        "EGRESSD_WHEELHOUSE": "deploy/.build/wheels",
        "EGRESSD_TAG": "abc",
    }
    (clone / "deploy" / ".env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    try:
        data = config(clone, "-f", "deploy/compose.yaml")
    finally:
        (clone / "deploy" / ".env").unlink()
    build = data["services"]["node"]["build"]
    assert build["args"] == {
        "BASE_IMAGE": "egressd-base:bookworm-x",
        "WHEELHOUSE": "deploy/.build/wheels",
    }
    assert data["services"]["node"]["image"] == "egressd-node:abc"


def dockerignore_allows(patterns: list[str], path: str) -> bool:
    """Docker's rule for our whitelist: the last matching pattern wins; `!` re-includes."""
    allowed = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
        if re.fullmatch(rf"{regex}(/.*)?", path):
            allowed = negate
    return allowed


def test_dockerignore_lets_in_everything_the_dockerfiles_copy() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not dockerignore_allows(patterns, ".venv/bin/python")
    assert not dockerignore_allows(patterns, ".git/HEAD")
    assert not dockerignore_allows(patterns, "egressd/__pycache__/cli.cpython-311.pyc")
    assert dockerignore_allows(patterns, "deploy/.build/wheels/pip-24.0-py3-none-any.whl")
    sources = []
    for dockerfile in ("deploy/Dockerfile",):
        for line in (ROOT / dockerfile).read_text().splitlines():
            if line.startswith("COPY ") and "--from=" not in line:
                sources += line.split()[1:-1]
    assert "egressd" in sources and "pyproject.toml" in sources
    for source in sources:
        if source == "${WHEELHOUSE}":
            source = "deploy/docker/no-wheelhouse"
        assert (ROOT / source).exists(), source
        assert dockerignore_allows(patterns, source), source
