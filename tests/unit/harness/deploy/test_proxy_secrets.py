"""The proxies' secrets in the compose fleet and on Kubernetes: credentials
(`secrets_dir`) and the TLS interception CA (`interception_ca`), from
EGRESSD_* variables (egressd_harness.deploy.settings) into the proxy's configuration,
mounted from Secret volumes / compose secrets by proxies only; the key never
reaches node agents (hence sandboxes)."""

from __future__ import annotations

import datetime as dt
import re
import stat
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from egressd.control.interception_ca import CERT_FILE, KEY_FILE, ca_dir, usable
from egressd.layout import ProxySpec
from egressd.proxy.config import config_from_mapping
from egressd_harness.deploy import entry
from egressd_harness.deploy.settings import (
    DeploySettings,
    SettingsError,
    from_env,
    proxy_secret_keys,
)
from egressd_harness.topology.fleet import Fleet
from tests.support.deploy import DEPLOY, compose
from tests.support.kubernetes import TARGETS, one

PROXY = {"name": "proxy-130", "underlay": "198.18.0.130", "egress": "203.0.113.130"}
SECRET_VARS = {
    "EGRESSD_SECRETS_DIR": "/etc/egressd/credentials",
    "EGRESSD_INTERCEPTION_CA_CERT": "/etc/egressd/interception-ca/ca.pem",
    "EGRESSD_INTERCEPTION_CA_KEY": "/etc/egressd/interception-ca/ca.key",
    "EGRESSD_UPSTREAM_CA_FILE": "system",
}


# --- settings -> proxy configuration (pure) --------------------------------------------


def test_unset_are_the_compose_fleets_paths() -> None:
    got = from_env({})
    assert got.secrets_dir == Path("/run/secrets/egressd-credentials")
    assert got.interception_ca_cert == Path("/interception-ca/ca.pem")
    assert got.interception_ca_key == Path("/interception-ca/ca.key")
    assert got.upstream_ca_file == Path("/fleet/ca/ca.pem")


def test_cluster_paths_and_the_system_trust_store() -> None:
    got = from_env(SECRET_VARS)
    assert got.secrets_dir == Path("/etc/egressd/credentials")
    assert got.interception_ca_key == Path("/etc/egressd/interception-ca/ca.key")
    assert got.upstream_ca_file is None
    keys = proxy_secret_keys(got, exists=lambda _p: True)
    assert keys == {
        "secrets_dir": "/etc/egressd/credentials",
        "interception_ca": {
            "cert": "/etc/egressd/interception-ca/ca.pem",
            "key": "/etc/egressd/interception-ca/ca.key",
        },
    }
    config = config_from_mapping({**PROXY, **keys})
    assert config.secrets_dir == Path("/etc/egressd/credentials")
    assert config.interception_ca is not None
    assert config.interception_ca.key == Path("/etc/egressd/interception-ca/ca.key")
    assert config.upstream_ca_file is None


@pytest.mark.parametrize("present", [(), ("cert",), ("key",)])
def test_no_interception_ca_unless_both_files_exist(present: tuple[str, ...]) -> None:
    """A missing half would stop the proxy at start: without the pair, intercepted rules
    are denied (tls_interception_unavailable), and everything else still works."""
    s = DeploySettings()
    there = {
        p
        for p, name in ((s.interception_ca_cert, "cert"), (s.interception_ca_key, "key"))
        if name in present
    }
    keys = proxy_secret_keys(s, exists=there.__contains__)
    assert "interception_ca" not in keys
    assert keys["secrets_dir"] == "/run/secrets/egressd-credentials"
    assert keys["upstream_ca_file"] == "/fleet/ca/ca.pem"
    config = config_from_mapping({**PROXY, **keys})
    assert config.interception_ca is None and config.secrets_dir is not None


@pytest.mark.parametrize(
    ("var", "value", "words"),
    [
        ("EGRESSD_SECRETS_DIR", "credentials", "absolute path"),
        ("EGRESSD_INTERCEPTION_CA_CERT", "ca.pem", "absolute path"),
        ("EGRESSD_INTERCEPTION_CA_KEY", " ", "empty"),
        ("EGRESSD_UPSTREAM_CA_FILE", "System", "absolute path or 'system'"),
    ],
)
def test_a_bad_path_is_named(var: str, value: str, words: str) -> None:
    with pytest.raises(SettingsError) as err:
        from_env({var: value})
    assert var in str(err.value) and words in str(err.value)


# --- the entry code: what a proxy's config gets, where the control plane puts the CA ---


@pytest.fixture
def secret_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    ca = tmp_path / "interception-ca"
    creds = tmp_path / "credentials"
    monkeypatch.setenv("EGRESSD_SECRETS_DIR", str(creds))
    monkeypatch.setenv("EGRESSD_INTERCEPTION_CA_CERT", str(ca / "ca.pem"))
    monkeypatch.setenv("EGRESSD_INTERCEPTION_CA_KEY", str(ca / "ca.key"))
    monkeypatch.setenv("EGRESSD_UPSTREAM_CA_FILE", "system")
    monkeypatch.setenv("EGRESSD_CONTROL_URL", "http://198.18.0.2:8080")
    monkeypatch.setenv("EGRESSD_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("EGRESSD_FLEET_DIR", str(tmp_path / "fleet"))
    entry.env.cache_clear()
    yield tmp_path
    entry.env.cache_clear()


def proxy_config() -> Any:
    spec = ProxySpec("proxy-130", IPv4Address("198.18.0.130"), IPv4Address("203.0.113.130"))
    return config_from_mapping(entry.proxy_config(Fleet(entry.layout(proxies=(spec,))), spec))


def test_control_plane_hands_the_key_to_proxies_only(secret_env: Path) -> None:
    """The control plane's CA: the certificate to the fleet volume (every member,
    sandboxes' trust store), the key only to the proxies' path; the proxy's config
    names the pair, the credentials directory and the system trust store."""
    before = proxy_config()
    assert before.interception_ca is None  # not made yet: denied, not crashed
    assert before.secrets_dir == secret_env / "credentials"
    (secret_env / "fleet" / "ca").mkdir(parents=True)
    entry.publish_interception_ca()
    made = ca_dir(secret_env / "run" / "control")
    assert usable(made, dt.datetime.now(dt.UTC))
    key = secret_env / "interception-ca" / "ca.key"
    assert key.read_bytes() == (made / KEY_FILE).read_bytes()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    public = secret_env / "fleet" / "ca" / "interception-ca.pem"
    assert public.read_bytes() == (made / CERT_FILE).read_bytes()
    fleet_files = [p.read_bytes() for p in (secret_env / "fleet").rglob("*") if p.is_file()]
    assert all(b"PRIVATE KEY" not in data for data in fleet_files)
    after = proxy_config()
    assert after.interception_ca is not None
    assert after.interception_ca.key == key
    assert after.upstream_ca_file is None
    # The local topology's own paths (its run directory) are gone from the config.
    assert str(secret_env / "run") not in str(after.secrets_dir)


# --- compose: who mounts what ----------------------------------------------------------


def test_compose_mounts_the_key_and_credentials_into_proxies_only() -> None:
    data = compose()
    services = data["services"]
    (secret,) = data["secrets"]
    assert secret == "egressd-credentials"
    # Compose mounts a secret at /run/secrets/NAME: the proxy's default secrets_dir.
    assert DeploySettings().secrets_dir == Path("/run/secrets") / secret
    assert services["proxy"]["secrets"] == [secret]
    # The directory a fresh clone has (its .gitignore keeps real secrets out of git).
    source = data["secrets"][secret]["file"]
    default = re.fullmatch(r"\$\{EGRESSD_CREDENTIALS_DIR:-(.+)\}", source)
    assert default is not None, source
    assert (DEPLOY / default.group(1) / ".gitignore").is_file()
    target = str(DeploySettings().interception_ca_key.parent)
    mounted = {}
    for name, service in services.items():
        assert name == "proxy" or secret not in service.get("secrets", []), name
        for volume in service.get("volumes", []):
            if volume.split(":")[0] == "interception":
                mounted[name] = volume
    assert mounted == {
        "control": f"interception:{target}",
        "proxy": f"interception:{target}:ro",
    }
    assert "interception" in data["volumes"]


# --- Kubernetes: Secret volumes at the paths the proxy is given ------------------------


def pod(target: str, kind: str, name: str) -> dict[str, Any]:
    return one(target, kind, name)["spec"]["template"]["spec"]


def secret_volume_at(spec: dict[str, Any], path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(volume mount, secret volume source) of the mount holding `path`."""
    (container,) = spec["containers"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    (mount,) = [m for m in container["volumeMounts"] if path.is_relative_to(m["mountPath"])]
    return mount, volumes[mount["name"]]["secret"]


@pytest.mark.parametrize("target", TARGETS)
def test_proxy_mounts_its_secrets_where_its_environment_says(target: str) -> None:
    spec = pod(target, "Deployment", "egressd-proxy")
    env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
    assert {k: env[k] for k in SECRET_VARS} == SECRET_VARS
    got = from_env(SECRET_VARS)
    expected = {
        got.secrets_dir: ("egressd-credentials", None),
        got.interception_ca_cert: ("egressd-interception-ca", "ca.pem"),
        got.interception_ca_key: ("egressd-interception-ca", "ca.key"),
    }
    for path, (secret_name, key) in expected.items():
        mount, source = secret_volume_at(spec, path)
        assert mount.get("readOnly") is True and "subPath" not in mount, mount
        assert source["secretName"] == secret_name
        assert source["defaultMode"] == 0o400  # root's only (the proxy runs as root)
        assert source.get("optional") is True  # absent: denied (fail closed), not stuck
        if key is not None:
            assert {"key": key, "path": path.name} in source["items"]
    # The rendered environment gives a configuration the proxy accepts.
    config = config_from_mapping({**PROXY, **proxy_secret_keys(got, exists=lambda _p: True)})
    assert config.interception_ca is not None and config.secrets_dir == got.secrets_dir


@pytest.mark.parametrize("target", TARGETS)
def test_the_interception_key_reaches_no_node_agent(target: str) -> None:
    """Nodes (and their sandboxes) get the certificate, at the name sandboxes trust."""
    spec = pod(target, "DaemonSet", "egressd-node-agent")
    sources = [v["secret"] for v in spec["volumes"] if "secret" in v]
    for source in sources:
        assert source["secretName"] != "egressd-credentials"
        if source["secretName"] == "egressd-interception-ca":
            assert source["items"] == [{"key": "ca.pem", "path": "interception-ca.pem"}]
    _mount, source = secret_volume_at(spec, Path("/fleet/ca/interception-ca.pem"))
    assert source["secretName"] == "egressd-interception-ca"
    # The control plane does not need the Secret: it makes the CA itself.
    control = pod(target, "StatefulSet", "egressd-control")
    names = {v["secret"]["secretName"] for v in control["volumes"] if "secret" in v}
    assert not names & {"egressd-interception-ca", "egressd-credentials"}


def test_readme_copies_the_ca_from_where_the_control_plane_makes_it() -> None:
    """The operator step in deploy/kubernetes/README.md reads the CA from the control
    plane's state directory as control.yaml sets it."""
    args = pod("base", "StatefulSet", "egressd-control")["containers"][0]["args"]
    (state,) = [a.split("=", 1)[1] for a in args if a.startswith("--state-dir=")]
    readme = (DEPLOY / "kubernetes" / "README.md").read_text()
    assert f"CA={ca_dir(Path(state))}" in readme
    assert "--from-file=ca.key=" in readme and "--from-file=ca.pem=" in readme
    assert "create secret generic egressd-interception-ca" in readme


def test_overlay_credentials_are_a_placeholder() -> None:
    secret = one("overlays/example", "Secret", "egressd-credentials")
    (value,) = secret["stringData"].values()
    assert "REPLACE-ME" in value
