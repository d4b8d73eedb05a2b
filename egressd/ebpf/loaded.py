"""`Loaded`: the base of the classes that own one loaded eBPF object (`egressd.agent.tier1`,
`egressd.agent.node`, `egressd.proxy.kernel`, `egressd.proxy.reuseport`).

It owns what every one of them holds in the same way: the C source and its build cache, the
bpffs on ``state_dir/PIN_NAME`` with the object's pins, the program and map fds opened from
them, and their cleanup. A subclass's `load` runs its setup inside `_loading` (build, load,
pin, open; on any failure there everything is undone through `close`), undoes its own side
effects (filters, device settings) in `_unwind`, and reads and writes its maps through the
`_map_*` helpers.

Every `EbpfError` leaves as the subclass's own error type (`error`) with the same reason and
detail, so callers keep catching what they caught before.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Generic, ParamSpec, Self, TypeVar

from egressd.ebpf import syscall as bpf
from egressd.ebpf import tc
from egressd.ebpf.build import EbpfError, build_object
from egressd.errors import EgressdError

_E = TypeVar("_E", bound=EgressdError)
_P = ParamSpec("_P")
_R = TypeVar("_R")
_Slot = TypeVar("_Slot", bound=int)


class Loaded(Generic[_E]):
    """One eBPF object built from `source` (and `deps`, the headers it includes) into
    `cache_dir` (default ``state_dir/cache``), pinned in a bpffs of its own on
    ``state_dir/pin_name``; errors are `error`."""

    def __init__(
        self,
        *,
        state_dir: Path,
        pin_name: str,
        source: Path,
        deps: Iterable[Path] = (),
        cache_dir: Path | None,
        error: type[_E],
    ) -> None:
        self.state_dir = Path(os.path.realpath(state_dir))
        self.pin_dir = self.state_dir / pin_name
        self.source = source
        self.deps = tuple(deps)
        self.cache_dir = cache_dir if cache_dir is not None else self.state_dir / "cache"
        self.error = error
        self._progs: dict[str, int] = {}
        self._maps: dict[str, int] = {}

    # -- lifecycle ------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return bool(self._progs)

    def load(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """`_unwind`, close the fds, unpin, unmount. Idempotent; the first failure is raised
        after the rest is done."""
        errors = self._unwind()
        self._close_fds()
        try:
            self._ebpf(tc.release, self.pin_dir)
        except EgressdError as exc:
            errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> Self:
        self.load()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _unwind(self) -> list[EgressdError]:
        """Undo what the subclass did besides loading (filters, device settings); the
        failures, each already in the subclass's error type. Called first by `close`."""
        return []

    @contextlib.contextmanager
    def _loading(
        self,
        progs: Sequence[str],
        maps: Iterable[tc.MapSpec],
        *,
        single: bool,
        prog_type: int = bpf.BPF_PROG_TYPE_SCHED_CLS,
        load_type: str = "classifier",
        reuse_maps: Mapping[str, Path] | None = None,
    ) -> Iterator[None]:
        """Build if needed, load and pin (`tc.load_object`), open and check the pins
        (`tc.open_pins`), then run the body (the subclass's setup); a failure after the build
        closes everything."""
        obj = self._ebpf(build_object, self.source, self.cache_dir, deps=self.deps)
        self._ebpf(
            tc.load_object,
            obj,
            self.pin_dir,
            single=single,
            prog_type=load_type,
            reuse_maps=reuse_maps,
        )
        try:
            self._progs, self._maps = self._ebpf(
                tc.open_pins, self.pin_dir, progs, maps, single=single, prog_type=prog_type
            )
            yield
        except BaseException:
            with contextlib.suppress(EgressdError):
                self.close()
            raise

    def _close_fds(self) -> None:
        tc.close_fds([*self._progs.values(), *self._maps.values()])
        self._progs = {}
        self._maps = {}

    # -- errors -----------------------------------------------------------------

    def _ebpf(self, fn: Callable[_P, _R], *args: _P.args, **kwargs: _P.kwargs) -> _R:
        """`fn` with its `EbpfError` translated into `error` (same reason and detail)."""
        try:
            return fn(*args, **kwargs)
        except EbpfError as exc:
            raise self.error(exc.reason, exc.detail) from exc

    def _not_loaded(self) -> _E:
        return self.error("not_loaded", "call load() first")

    # -- fds and maps -------------------------------------------------------------

    def _prog_fd(self, name: str) -> int:
        if not self._progs:
            raise self._not_loaded()
        return self._progs[name]

    def _fd(self, name: str) -> int:
        fd = self._maps.get(name)
        if fd is None:
            raise self._not_loaded()
        return fd

    def prog_ids(self) -> dict[str, int]:
        return {name: bpf.prog_info(fd).prog_id for name, fd in self._progs.items()}

    def _map_update(self, name: str, key: bytes, value: bytes) -> None:
        self._ebpf(tc.map_update, self._fd(name), name, key, value)

    def _map_delete(self, name: str, key: bytes) -> None:
        self._ebpf(tc.map_delete, self._fd(name), name, key)

    def _map_lookup(self, name: str, key: bytes, size: int) -> bytes | None:
        return self._ebpf(tc.map_lookup, self._fd(name), name, key, size)

    def _map_keys(self, name: str, key_size: int) -> list[bytes]:
        return self._ebpf(tc.map_keys, self._fd(name), name, key_size)

    def _counters(self, name: str, slots: Iterable[_Slot]) -> dict[_Slot, int]:
        return self._ebpf(tc.percpu_counters, self._fd(name), name, slots)
