"""The compose fleet's data path (EGRESSD_DATAPATH, kernel by default) and the images'
prebuilt eBPF objects (`egressd_harness.deploy.bpf_objects`): built with the daemons' own
`build_object`, seeded into a daemon's cache so that it never runs clang."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from egressd.agent.node import DEFAULT_HEADERS as NODE_HEADERS
from egressd.agent.node import DEFAULT_SOURCE as NODE_SOURCE
from egressd.agent.tier1 import DEFAULT_SOURCE as TIER1_SOURCE
from egressd.ebpf.build import EbpfError, build_object
from egressd.proxy.kernel import DEFAULT_SOURCE as PROXY_SOURCE
from egressd_harness.deploy import bpf_objects, settings
from tests.support.deploy import ROOT

NO_CLANG = "/nonexistent/clang"


@pytest.mark.parametrize(
    ("env", "datapath"),
    [
        ({}, "kernel"),
        ({"EGRESSD_DATAPATH": "kernel"}, "kernel"),
        ({"EGRESSD_DATAPATH": "userspace"}, "userspace"),
    ],
)
def test_the_datapath_is_kernel_unless_userspace_is_asked(
    env: dict[str, str], datapath: str
) -> None:
    assert settings.from_env(env).datapath == datapath


@pytest.mark.parametrize("raw", ["ebpf", "Kernel", "", "  "])
def test_a_bad_datapath_is_named(raw: str) -> None:
    with pytest.raises(settings.SettingsError) as err:
        settings.from_env({"EGRESSD_DATAPATH": raw, "EGRESSD_NODE_NAME": "BAD"})
    assert "EGRESSD_DATAPATH=" in err.value.detail
    assert "EGRESSD_NODE_NAME=" in err.value.detail  # every bad variable at once


def test_compose_gives_every_member_that_carries_packets_the_same_datapath() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    services = compose["services"]
    for name in ("proxy", "node", "locust"):
        assert services[name]["environment"]["EGRESSD_DATAPATH"] == "${EGRESSD_DATAPATH:-kernel}"
    # The proxy loads tc programs into a bpffs of its own: SYS_ADMIN (mount, and bpf(2)
    # where docker does not know CAP_BPF), NET_ADMIN (tc).
    assert {"NET_ADMIN", "SYS_ADMIN"} <= set(services["proxy"]["cap_add"])
    assert "apparmor:unconfined" in services["proxy"]["security_opt"]


def test_kubernetes_names_its_datapath_in_the_fleet_config() -> None:
    docs = yaml.safe_load_all((ROOT / "deploy/kubernetes/base/fleet-config.yaml").read_text())
    (config,) = [d for d in docs if d and d.get("kind") == "ConfigMap"]
    assert config["data"]["datapath"] == "userspace"
    settings.from_env({"EGRESSD_DATAPATH": config["data"]["datapath"]})


def _touch(path: Path, mtime_ns: int) -> None:
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_seed_copies_newer_objects_with_their_times(tmp_path: Path) -> None:
    prebuilt, cache = tmp_path / "prebuilt", tmp_path / "state" / "cache"
    prebuilt.mkdir()
    for name, t in (("tier1.o", 2_000), ("node.o", 3_000)):
        (prebuilt / name).write_bytes(name.encode())
        _touch(prebuilt / name, t * 10**9)
    (prebuilt / "notes.txt").write_text("not an object")
    assert bpf_objects.seed(prebuilt, cache) == ["node.o", "tier1.o"]
    assert (cache / "tier1.o").stat().st_mtime_ns == 2_000 * 10**9
    assert sorted(p.name for p in cache.iterdir()) == ["node.o", "tier1.o"]
    # Current copies stay; an older one is replaced.
    assert bpf_objects.seed(prebuilt, cache) == []
    _touch(cache / "node.o", 1_000 * 10**9)
    assert bpf_objects.seed(prebuilt, cache) == ["node.o"]


def test_seed_without_prebuilt_objects_copies_nothing(tmp_path: Path) -> None:
    assert bpf_objects.seed(tmp_path / "absent", tmp_path / "cache") == []
    assert not (tmp_path / "cache").exists()


def test_build_without_a_compiler_is_tool_missing(tmp_path: Path) -> None:
    (tmp_path / "a.c").write_text("int x;\n")
    with pytest.raises(EbpfError) as err:
        bpf_objects.build_all(tmp_path / "out", tmp_path, clang=NO_CLANG)
    assert err.value.reason == "tool_missing"
    with pytest.raises(EbpfError, match=r"no \*\.c"):
        bpf_objects.build_all(tmp_path / "out", tmp_path / "empty")


def test_prebuilt_objects_spare_every_daemon_its_compiler(tmp_path: Path) -> None:
    """What the images do: build every bpf/*.c once (clang), seed a daemon's cache, and the
    daemons' own `build_object` calls (tier 1, the node's and the proxy's kernel path) find
    their object current there without a compiler."""
    prebuilt = tmp_path / "bpf-cache"
    assert bpf_objects.main(["build", str(prebuilt)]) == 0
    assert bpf_objects.main(["check", str(prebuilt)]) == 0
    cache = tmp_path / "state" / "cache"
    assert set(bpf_objects.seed(prebuilt, cache)) >= {"tier1.o", "node.o", "proxy.o"}
    assert build_object(TIER1_SOURCE, cache, clang=NO_CLANG) == cache / "tier1.o"
    assert build_object(NODE_SOURCE, cache, clang=NO_CLANG, deps=NODE_HEADERS) == cache / "node.o"
    proxy_deps = (PROXY_SOURCE.with_name("geneve.h"),)
    assert build_object(PROXY_SOURCE, cache, clang=NO_CLANG, deps=proxy_deps) == cache / "proxy.o"
    # An object older than its source is stale: `check` fails, it does not compile.
    stale = (TIER1_SOURCE.stat().st_mtime_ns // 10**9 - 60) * 10**9
    _touch(prebuilt / "tier1.o", stale)
    assert bpf_objects.main(["check", str(prebuilt)]) == 1
