"""The proxy's secret store: files named by secret, re-read when they change."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from egressd.proxy import secrets
from egressd.proxy.secrets import SecretStore, parse_secret


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def store(directory: Path | None, recheck_s: float = 0.0) -> tuple[SecretStore, Clock]:
    clock = Clock()
    return SecretStore(directory, recheck_s=recheck_s, clock=clock), clock


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"tok-123\n", "tok-123"),
        (b"tok-123\r\n", "tok-123"),
        (b"tok-123", "tok-123"),
        (b"a b", "a b"),
        (b"", (secrets.EMPTY,)),
        (b"\n", (secrets.EMPTY,)),
        (b"tok\n\n", (secrets.BAD_VALUE,)),  # only one line end is removed
        (b"tok\r\nX-Evil: 1", (secrets.BAD_VALUE,)),  # no header injection
        (b" tok", (secrets.BAD_VALUE,)),
        (b"tok\x00", (secrets.BAD_VALUE,)),
        ("tök".encode(), (secrets.BAD_VALUE,)),
        (b"x" * (secrets.MAX_SECRET_BYTES + 1), (secrets.TOO_LARGE,)),
    ],
)
def test_parse_secret(data: bytes, expected: object) -> None:
    assert parse_secret(data) == expected


def test_read_when_needed_and_reread_when_changed(tmp_path: Path) -> None:
    (tmp_path / "api-token").write_text("one\n")
    s, _ = store(tmp_path)
    assert s.get("api-token") == "one"
    assert s.get("api-token") == "one"
    (tmp_path / "api-token").write_text("two-longer\n")  # size and mtime change
    assert s.get("api-token") == "two-longer"
    # Replaced by a rename (a new inode, same size), as atomic writers do.
    (tmp_path / "new").write_text("three-long\n")
    os.replace(tmp_path / "new", tmp_path / "api-token")
    assert s.get("api-token") == "three-long"


def test_recheck_interval_bounds_the_stats(tmp_path: Path) -> None:
    (tmp_path / "t").write_text("one")
    s, clock = store(tmp_path, recheck_s=1.0)
    assert s.get("t") == "one"
    (tmp_path / "t").write_text("two-two")
    assert s.get("t") == "one"  # within the interval: not looked at
    clock.now += 1.0
    assert s.get("t") == "two-two"


def test_missing_then_created(tmp_path: Path) -> None:
    s, _ = store(tmp_path)
    with capture_logs() as logs:
        assert s.get("later") is None
        assert s.get("later") is None
    assert s.error("later") == secrets.MISSING
    # One warning per change of state, naming the secret, never a value.
    assert [(e["event"], e["secret"], e["error"]) for e in logs] == [
        ("secret_unavailable", "later", "missing")
    ]
    (tmp_path / "later").write_text("value-1")
    with capture_logs() as logs:
        assert s.get("later") == "value-1"
    assert s.error("later") is None
    assert logs and all("value-1" not in repr(e) for e in logs)


def test_kubernetes_secret_volume_layout(tmp_path: Path) -> None:
    # NAME -> ..data/NAME, ..data -> ..TIMESTAMP: an update swaps ..data.
    v1 = tmp_path / "..2026_12_06_1"
    v1.mkdir()
    (v1 / "api-token").write_text("first")
    (tmp_path / "..data").symlink_to(v1.name)
    (tmp_path / "api-token").symlink_to("..data/api-token")
    s, _ = store(tmp_path)
    assert s.get("api-token") == "first"
    v2 = tmp_path / "..2026_12_06_2"
    v2.mkdir()
    (v2 / "api-token").write_text("second")
    (tmp_path / "..data_tmp").symlink_to(v2.name)
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    assert s.get("api-token") == "second"
    assert s.get("..data") is None and s.error("..data") == secrets.INVALID_NAME


@pytest.mark.parametrize("name", ["../etc/passwd", "a/b", ".hidden", "..", "", "x" * 200])
def test_names_cannot_leave_the_directory(tmp_path: Path, name: str) -> None:
    s, _ = store(tmp_path / "d")
    assert s.get(name) is None
    assert s.error(name) == secrets.INVALID_NAME


def test_a_link_out_of_the_directory_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_text("not-a-secret")
    d = tmp_path / "secrets"
    d.mkdir()
    (d / "escape").symlink_to(outside)
    s, _ = store(d)
    assert s.get("escape") is None
    assert s.error("escape") == secrets.OUTSIDE_DIR


def test_not_a_file_and_no_directory(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    s, _ = store(tmp_path)
    assert s.get("dir") is None and s.error("dir") == secrets.NOT_A_FILE
    none, _ = store(None)
    assert none.get("anything") is None and none.error("anything") == secrets.NO_SECRETS_DIR


def test_a_bad_value_is_unavailable_until_fixed(tmp_path: Path) -> None:
    (tmp_path / "t").write_bytes(b"line1\nline2\n")
    s, _ = store(tmp_path)
    assert s.get("t") is None and s.error("t") == secrets.BAD_VALUE
    (tmp_path / "t").write_bytes(b"good-value\n")
    assert s.get("t") == "good-value"


def test_proxy_config_secrets_dir() -> None:
    from egressd.proxy.config import ConfigError, config_from_mapping

    base = {"name": "p1", "underlay": "198.18.0.21", "egress": "203.0.113.21"}
    assert config_from_mapping(base).secrets_dir is None
    cfg = config_from_mapping({**base, "secrets_dir": "/run/secrets"})
    assert cfg.secrets_dir == Path("/run/secrets")
    with pytest.raises(ConfigError, match="secrets_dir"):
        config_from_mapping({**base, "secrets_dir": 7})


def test_local_fleet_secrets(tmp_path: Path) -> None:
    from egressd_harness.topology import proxy_secrets

    directory = proxy_secrets.ensure(tmp_path)
    value = (directory / proxy_secrets.TEST_SECRET).read_text()
    assert (directory.stat().st_mode & 0o777) == 0o700
    assert ((directory / proxy_secrets.TEST_SECRET).stat().st_mode & 0o777) == 0o600
    proxy_secrets.ensure(tmp_path)  # kept, not remade
    assert (directory / proxy_secrets.TEST_SECRET).read_text() == value
    s, _ = store(Path(str(proxy_secrets.proxy_settings(tmp_path)["secrets_dir"])))
    assert s.get(proxy_secrets.TEST_SECRET) == value.strip()
