"""The control plane's state directory: one JSON file per record, written atomically.

Layout (all directories mode 0700, files 0600)::

    STATE_DIR/jobs/<job-uuid>.json      {"job_id", "payload", "jws", "kid", "exp"}
    STATE_DIR/nodes/<name>.json         {"name", "underlay", "sandbox_cidr"}
    STATE_DIR/proxies/<name>.json       {"name", "underlay", "egress"}
    STATE_DIR/revision                  the last revision handed out (an integer)

Revisions (`egressd.control.watch`): every put or delete of a record takes
the next revision, written durably to `revision` *before* the record file, so
the counter never goes backwards across a restart (a write that fails after
the bump leaves a gap, which watchers never mind). `listeners` are called
with each committed `Change`, in the writer's thread, after the record is
durable.

Why files rather than SQLite: the state is small (one record per job, node and
proxy), an operator can read and back it up with `cat` and `cp`, and a write
never needs more than one file to change.

Every write goes to a temporary file in the same directory, is flushed and
fsynced, renamed over the target (`os.replace`, atomic on POSIX), and then the
directory is fsynced so the rename itself survives a crash. A reader therefore
sees either the old or the new file, never a partial one. Leftover temporary
files from a crash (`.*.tmp`) are removed by `load()`.

`load()` reads everything into memory once; lookups never touch the disk.
A file that does not parse, or whose name disagrees with its content, stops
`load()` with a `StoreError` naming the file: the control plane refuses to
start on state it does not understand rather than silently drop a policy.

The store is synchronous. Lookups may run while a write is in progress in
another thread (the app runs writes in a worker thread so fsync never blocks
the event loop): the in-memory maps are guarded by a mutex and change only
after the file is durable. Writers must be serialised by the caller (the app
holds one asyncio lock around every write).
"""

from __future__ import annotations

import contextlib
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from egressd.atomicfile import TMP_SUFFIX, fsync_dir, write_atomic
from egressd.control.records import (
    JobRecord,
    NodeRecord,
    ProxyRecord,
    RecordError,
    job_from_json,
    node_from_json,
    parse_job_id,
    parse_name,
    proxy_from_json,
)
from egressd.errors import EgressdError

_K = TypeVar("_K")
_R = TypeVar("_R")

_DIR_MODE = 0o700
_FILE_MODE = 0o600
_TMP_SUFFIX = TMP_SUFFIX


@dataclass(frozen=True, slots=True)
class Change:
    """One committed write: `kind` is job, node or proxy; `op` put or delete."""

    rev: int
    kind: str
    key: str
    op: str

    def to_json(self) -> dict[str, object]:
        return {"rev": self.rev, "kind": self.kind, "key": self.key, "op": self.op}


class StoreError(EgressdError):
    """State that cannot be read or written; `path` is the file or directory concerned."""

    def __init__(self, reason: str, path: Path, detail: str) -> None:
        self.path = path
        super().__init__(reason, f"{path}: {detail}")


def atomic_write(path: Path, data: bytes, *, mode: int = _FILE_MODE) -> None:
    """Replace `path` with `data` atomically and durably (see egressd.atomicfile)."""
    write_atomic(path, data, mode=mode)


class _Collection(Generic[_K, _R]):
    """One subdirectory of records, cached in memory, keyed by file stem."""

    def __init__(
        self,
        directory: Path,
        *,
        key_of_stem: Callable[[str], _K],
        stem_of_key: Callable[[_K], str],
        decode: Callable[[_K, object], _R],
        encode: Callable[[_R], object],
        kind: str = "",
        revisions: _Revisions | None = None,
    ) -> None:
        self.directory = directory
        self.kind = kind
        self._revisions = revisions
        self._key_of_stem = key_of_stem
        self._stem_of_key = stem_of_key
        self._decode = decode
        self._encode = encode
        self._items: dict[_K, _R] = {}
        self._mutex = threading.Lock()

    def load(self) -> None:
        self.directory.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        items: dict[_K, _R] = {}
        for path in sorted(self.directory.iterdir()):
            if path.name.startswith(".") and path.name.endswith(_TMP_SUFFIX):
                path.unlink()  # a write interrupted before its rename
                continue
            if path.suffix != ".json" or not path.is_file():
                continue
            try:
                key = self._key_of_stem(path.stem)
                obj = json.loads(path.read_bytes())
                items[key] = self._decode(key, obj)
            except (RecordError, ValueError) as exc:
                raise StoreError("corrupt_state", path, str(exc)) from exc
        with self._mutex:
            self._items = items

    def get(self, key: _K) -> _R | None:
        with self._mutex:
            return self._items.get(key)

    def values(self) -> list[_R]:
        """Every record, ordered by key (as the file names sort)."""
        with self._mutex:
            items = dict(self._items)
        return [items[k] for k in sorted(items, key=self._stem_of_key)]

    def __len__(self) -> int:
        with self._mutex:
            return len(self._items)

    def __iter__(self) -> Iterator[_R]:
        return iter(self.values())

    def _path(self, key: _K) -> Path:
        return self.directory / f"{self._stem_of_key(key)}.json"

    def put(self, key: _K, record: _R) -> None:
        data = json.dumps(self._encode(record), indent=2, sort_keys=True).encode() + b"\n"
        path = self._path(key)
        rev = self._reserve()
        try:
            atomic_write(path, data)
        except OSError as exc:
            raise StoreError("state_write_failed", path, exc.strerror or str(exc)) from exc
        with self._mutex:
            self._items[key] = record
        self._commit(rev, key, "put")

    def _reserve(self) -> int:
        return 0 if self._revisions is None else self._revisions.reserve()

    def _commit(self, rev: int, key: _K, op: str) -> None:
        if self._revisions is not None:
            self._revisions.commit(Change(rev, self.kind, self._stem_of_key(key), op))

    def delete(self, key: _K) -> bool:
        if self.get(key) is None:
            return False
        path = self._path(key)
        rev = self._reserve()
        try:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            fsync_dir(self.directory)
        except OSError as exc:
            raise StoreError("state_write_failed", path, exc.strerror or str(exc)) from exc
        with self._mutex:
            del self._items[key]
        self._commit(rev, key, "delete")
        return True


class _Revisions:
    """The durable revision counter (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.current = 0
        self.listeners: list[Callable[[Change], None]] = []
        self._mutex = threading.Lock()

    def load(self) -> None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            self.current = 0
            return
        try:
            value = int(text.strip())
        except ValueError as exc:
            raise StoreError("corrupt_state", self.path, "not an integer") from exc
        if value < 0:
            raise StoreError("corrupt_state", self.path, "negative revision")
        self.current = value

    def reserve(self) -> int:
        with self._mutex:
            rev = self.current + 1
            try:
                atomic_write(self.path, f"{rev}\n".encode())
            except OSError as exc:
                raise StoreError("state_write_failed", self.path, exc.strerror or str(exc)) from exc
            self.current = rev
            return rev

    def commit(self, change: Change) -> None:
        for listener in list(self.listeners):
            listener(change)


def _decode_job(job_id: uuid.UUID, obj: object) -> JobRecord:
    record = job_from_json(obj)
    if record.job_id != job_id:
        raise RecordError("job_id", "does not match the file name")
    return record


def _decode_node(name: str, obj: object) -> NodeRecord:
    if isinstance(obj, dict) and obj.get("name") != name:
        raise RecordError("name", "does not match the file name")
    return node_from_json(name, obj)


def _decode_proxy(name: str, obj: object) -> ProxyRecord:
    if isinstance(obj, dict) and obj.get("name") != name:
        raise RecordError("name", "does not match the file name")
    return proxy_from_json(name, obj)


class StateStore:
    """Jobs, nodes and proxies under one state directory (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.loaded = False
        self.revisions = _Revisions(root / "revision")
        self.jobs: _Collection[uuid.UUID, JobRecord] = _Collection(
            root / "jobs",
            key_of_stem=parse_job_id,
            stem_of_key=str,
            decode=_decode_job,
            encode=JobRecord.to_json,
            kind="job",
            revisions=self.revisions,
        )
        self.nodes: _Collection[str, NodeRecord] = _Collection(
            root / "nodes",
            key_of_stem=parse_name,
            stem_of_key=str,
            decode=_decode_node,
            encode=NodeRecord.to_json,
            kind="node",
            revisions=self.revisions,
        )
        self.proxies: _Collection[str, ProxyRecord] = _Collection(
            root / "proxies",
            key_of_stem=parse_name,
            stem_of_key=str,
            decode=_decode_proxy,
            encode=ProxyRecord.to_json,
            kind="proxy",
            revisions=self.revisions,
        )

    def load(self) -> None:
        """Create the directories if needed and read every record; raises StoreError."""
        try:
            self.root.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
            for collection in (self.jobs, self.nodes, self.proxies):
                collection.load()
            self.revisions.load()
        except OSError as exc:
            raise StoreError("state_unreadable", self.root, exc.strerror or str(exc)) from exc
        self.loaded = True

    @property
    def revision(self) -> int:
        """The last revision handed out (0 for a new state directory)."""
        return self.revisions.current

    def put_job(self, record: JobRecord) -> None:
        self.jobs.put(record.job_id, record)

    def put_node(self, record: NodeRecord) -> None:
        self.nodes.put(record.name, record)

    def put_proxy(self, record: ProxyRecord) -> None:
        self.proxies.put(record.name, record)
