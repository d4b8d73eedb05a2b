"""The control plane's state directory: round trips, atomic writes, reload, corruption."""

from __future__ import annotations

import ipaddress
import json
import os
import stat
import uuid
from pathlib import Path

import pytest

from egressd.control import store as store_mod
from egressd.control.records import JobRecord, NodeRecord, ProxyRecord, RecordError
from egressd.control.store import StateStore, StoreError, atomic_write

JOB_ID = uuid.UUID("2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2")


def node(
    name: str = "node1", underlay: str = "198.18.0.11", cidr: str = "100.96.1.0/24"
) -> NodeRecord:
    return NodeRecord(
        name=name,
        underlay=ipaddress.IPv4Address(underlay),
        sandbox_cidr=ipaddress.IPv4Network(cidr),
    )


def proxy(
    name: str = "proxy1", underlay: str = "198.18.0.21", egress: str = "203.0.113.21"
) -> ProxyRecord:
    return ProxyRecord(
        name=name, underlay=ipaddress.IPv4Address(underlay), egress=ipaddress.IPv4Address(egress)
    )


def job(job_id: uuid.UUID = JOB_ID, exp: int = 1795395600) -> JobRecord:
    payload = {
        "v": 1,
        "job_id": str(job_id),
        "account": "acme",
        "nodes": ["node1"],
        "mode": "enforce",
        "iat": exp - 3600,
        "nbf": exp - 3600,
        "exp": exp,
        "egress": [{"host": "api.allowed.test", "ports": [443]}],
    }
    return JobRecord(job_id=job_id, payload=payload, jws="aaa.bbb.ccc", kid="kid1", exp=exp)


@pytest.fixture
def store(tmp_path: Path) -> StateStore:
    s = StateStore(tmp_path / "state")
    s.load()
    return s


def reloaded(s: StateStore) -> StateStore:
    fresh = StateStore(s.root)
    fresh.load()
    return fresh


def test_load_creates_private_directories(tmp_path: Path) -> None:
    s = StateStore(tmp_path / "a" / "state")
    assert not s.loaded
    s.load()
    assert s.loaded
    for sub in ("jobs", "nodes", "proxies"):
        d = tmp_path / "a" / "state" / sub
        assert d.is_dir()
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert len(s.jobs) == len(s.nodes) == len(s.proxies) == 0


def test_round_trip_survives_reload(store: StateStore) -> None:
    other_job = uuid.UUID("00000000-0000-4000-8000-000000000001")
    store.put_node(node())
    store.put_node(node("node2", "198.18.0.12", "100.96.2.0/24"))
    store.put_proxy(proxy())
    store.put_job(job())
    store.put_job(job(other_job))

    again = reloaded(store)
    assert again.nodes.values() == [node(), node("node2", "198.18.0.12", "100.96.2.0/24")]
    assert again.proxies.get("proxy1") == proxy()
    assert again.jobs.get(JOB_ID) == job()
    assert [j.job_id for j in again.jobs] == sorted([JOB_ID, other_job], key=str)


def test_files_are_json_and_private(store: StateStore) -> None:
    store.put_node(node())
    path = store.root / "nodes" / "node1.json"
    assert json.loads(path.read_text()) == {
        "name": "node1",
        "underlay": "198.18.0.11",
        "sandbox_cidr": "100.96.1.0/24",
    }
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["node1.json"]  # no temporary left


def test_put_replaces_and_delete_persists(store: StateStore) -> None:
    store.put_node(node())
    store.put_node(node(underlay="198.18.0.99"))
    assert reloaded(store).nodes.get("node1") == node(underlay="198.18.0.99")
    assert store.nodes.delete("node1") is True
    assert store.nodes.delete("node1") is False
    assert reloaded(store).nodes.get("node1") is None
    assert not (store.root / "nodes" / "node1.json").exists()


def test_atomic_write_keeps_old_content_when_rename_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "f.json"
    atomic_write(target, b"old")

    def broken_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_atomic_write_fsyncs_file_and_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    atomic_write(tmp_path / "f.json", b"x")
    assert len(synced) == 2
    assert ".tmp" in synced[0]  # the data, before the rename
    assert synced[1] == str(tmp_path)  # the directory, after it


def test_failed_write_is_a_store_error_and_memory_unchanged(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.put_node(node())

    def broken(path: Path, data: bytes, *, mode: int = 0o600) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(store_mod, "atomic_write", broken)
    with pytest.raises(StoreError) as info:
        store.put_node(node(underlay="198.18.0.99"))
    assert info.value.reason == "state_write_failed"
    assert store.nodes.get("node1") == node()


def test_load_removes_interrupted_temporaries(store: StateStore) -> None:
    store.put_proxy(proxy())
    stray = store.root / "proxies" / ".proxy1.json.deadbeef.tmp"
    stray.write_text("{partial")
    again = reloaded(store)
    assert not stray.exists()
    assert again.proxies.get("proxy1") == proxy()


@pytest.mark.parametrize(
    ("sub", "name", "content"),
    [
        ("nodes", "node1.json", "{not json"),
        ("nodes", "node1.json", json.dumps({**node().to_json(), "name": "node2"})),
        ("nodes", "node1.json", json.dumps({**node().to_json(), "sandbox_cidr": "100.0.0.0/8"})),
        ("nodes", "Bad_Name.json", "{}"),
        ("proxies", "proxy1.json", '{"name": "proxy1", "underlay": "198.18.0.21"}'),
        ("jobs", "not-a-uuid.json", "{}"),
        ("jobs", f"{uuid.UUID(int=1)}.json", json.dumps(job().to_json())),
    ],
)
def test_corrupt_state_stops_load_naming_the_file(
    store: StateStore, sub: str, name: str, content: str
) -> None:
    path = store.root / sub / name
    path.write_text(content)
    with pytest.raises(StoreError) as info:
        reloaded(store)
    assert info.value.reason == "corrupt_state"
    assert str(path) in info.value.detail


def test_records_validate_on_construction() -> None:
    with pytest.raises(RecordError) as info:
        node(cidr="100.96.1.0/31")
    assert info.value.field == "sandbox_cidr"
    with pytest.raises(RecordError) as info:
        node(name="-node")
    assert info.value.field == "name"
