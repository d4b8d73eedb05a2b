"""tc programs: load an object into a private bpffs, open its pins, attach clsact filters.

The one copy of what tier 1 (`egressd.agent.tier1`), the node's data path
(`egressd.agent.node`) and the proxy's (`egressd.proxy.kernel`) do with their objects:

* `load_object`: ``bpftool prog load`` (one program, pinned at ``PIN_DIR/prog``) or
  ``prog loadall`` (every program, ``PIN_DIR/progs/NAME``), maps pinned in ``PIN_DIR/maps``,
  in a bpffs of the caller's own mounted on PIN_DIR (`egressd.ebpf.build.mount_bpffs`).
  Pins left by an earlier process that died are replaced. bpftool (libbpf) does the ELF,
  BTF and relocation work.
* `open_pins`: ``BPF_OBJ_GET`` on every program and map, each checked against what the
  caller expects (program type and name; map type, key and value size, and max_entries
  when the spec names it), so a C/Python drift fails loudly instead of corrupting entries.
* `attach` / `detach`: a clsact qdisc and one ``bpf direct-action`` filter of fixed
  priority and handle, created with "replace" (attaching twice leaves one filter), on the
  ingress or egress hook, over rtnetlink (pyroute2) in the calling thread's network
  namespace. `detach` removes clsact once neither hook holds a filter.
* `release`: unpin, unmount, remove the pin directory.

Errors are `EbpfError` with the reasons tool_missing, build_failed, mount_failed,
load_failed, abi_mismatch, no_such_link, attach_failed, detach_failed and map_failed; each
caller translates them into its own error with the same reason and detail.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from egressd.ebpf import syscall as bpf
from egressd.ebpf.build import EbpfError, mount_bpffs, run_tool, umount_bpffs

INGRESS: Final = 0xFFFF_FFF2  # TC_H_CLSACT_INGRESS
EGRESS: Final = 0xFFFF_FFF3  # TC_H_CLSACT_EGRESS
# The filter's identity on its hook: "replace" on it is idempotent.
FILTER_PRIO: Final = 1
FILTER_HANDLE: Final = 1
PROG_PIN: Final = "prog"
PROGS_DIR: Final = "progs"
MAPS_DIR: Final = "maps"
_ETH_P_ALL: Final = 0x0003
_GONE: Final = (errno.ENOENT, errno.ENODEV, errno.EINVAL)


@dataclass(frozen=True, slots=True)
class MapSpec:
    """A map's shape as the C source declares it; `max_entries` None: not checked."""

    name: str
    map_type: int
    key_size: int
    value_size: int
    max_entries: int | None = None


# ---------------------------------------------------------------------------
# Pure helpers.


def map_mismatch(spec: MapSpec, found: bpf.MapInfo) -> str | None:
    """Why the kernel's map `found` is not `spec` (an abi_mismatch detail), or None."""
    if spec.max_entries is None:
        shape: tuple[int, ...] = (found.map_type, found.key_size, found.value_size)
        want: tuple[int, ...] = (spec.map_type, spec.key_size, spec.value_size)
        fields = "type, key, value"
    else:
        shape = (found.map_type, found.key_size, found.value_size, found.max_entries)
        want = (spec.map_type, spec.key_size, spec.value_size, spec.max_entries)
        fields = "type, key, value, entries"
    if shape == want:
        return None
    return f"{spec.name}: kernel ({fields}) {shape}, expected {want}"


def prog_matches(
    name: str, info: bpf.ProgInfo, prog_type: int = bpf.BPF_PROG_TYPE_SCHED_CLS
) -> bool:
    """A program of `prog_type` (default: tc) named `name` (the kernel keeps the first 15
    bytes of a name)."""
    return info.prog_type == prog_type and info.name == name[:15]


def prog_pin(pin_dir: Path, name: str, *, single: bool) -> Path:
    """Where `load_object` pins program `name` (`single`: ``bpftool prog load``)."""
    return pin_dir / PROG_PIN if single else pin_dir / PROGS_DIR / name


def load_command(
    bpftool: str,
    obj: Path,
    pin_dir: Path,
    *,
    single: bool,
    prog_type: str = "classifier",
    reuse_maps: Mapping[str, Path] | None = None,
) -> list[str]:
    """The bpftool command that loads `obj` and pins it under `pin_dir`.

    `reuse_maps` {map name: pin}: maps another loader pinned, used instead of creating the
    object's own (libbpf checks that the shapes agree); they are pinned under ``maps`` too.
    """
    verb, target = ("load", pin_dir / PROG_PIN) if single else ("loadall", pin_dir / PROGS_DIR)
    maps = pin_dir / MAPS_DIR
    reuse = [
        arg
        for name, pin in sorted((reuse_maps or {}).items())
        for arg in ("map", "name", name, "pinned", str(pin))
    ]
    return [
        bpftool,
        "prog",
        verb,
        str(obj),
        str(target),
        "type",
        prog_type,
        *reuse,
        "pinmaps",
        str(maps),
    ]


# ---------------------------------------------------------------------------
# bpffs and pins.


def find_bpftool() -> str:
    found = shutil.which("bpftool") or shutil.which("bpftool", path="/usr/sbin:/sbin")
    if found is None:
        raise EbpfError("tool_missing", "bpftool not found (apt-get install bpftool)")
    return found


def load_object(
    obj: Path,
    pin_dir: Path,
    *,
    single: bool,
    prog_type: str = "classifier",
    reuse_maps: Mapping[str, Path] | None = None,
) -> None:
    """Mount a bpffs on `pin_dir` (created), replace earlier pins, load and pin `obj`
    (`load_command`: `prog_type`, `reuse_maps`).

    Once this returns, the caller owns the mount: `release` it, or `discard` it on failure.
    A failure after the mount releases it here.
    """
    bpftool = find_bpftool()
    try:
        pin_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EbpfError("mount_failed", f"{pin_dir}: {exc.strerror}") from exc
    mount_bpffs(pin_dir)
    try:
        unpin(pin_dir)
        cmd = load_command(
            bpftool, obj, pin_dir, single=single, prog_type=prog_type, reuse_maps=reuse_maps
        )
        result = run_tool(cmd, "load_failed")
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip()[-4000:]
            raise EbpfError("load_failed", f"bpftool prog {cmd[2]} {obj}: {detail}")
    except BaseException:
        discard(pin_dir)
        raise


def open_pins(
    pin_dir: Path,
    progs: Sequence[str],
    maps: Iterable[MapSpec],
    *,
    single: bool,
    prog_type: int = bpf.BPF_PROG_TYPE_SCHED_CLS,
) -> tuple[dict[str, int], dict[str, int]]:
    """({program: fd}, {map: fd}) of the pins under `pin_dir`, each checked (programs
    against `prog_type`); on failure every fd opened here is closed again."""
    prog_fds: dict[str, int] = {}
    map_fds: dict[str, int] = {}
    try:
        for name in progs:
            fd = prog_fds[name] = bpf.obj_get(prog_pin(pin_dir, name, single=single))
            info = bpf.prog_info(fd)
            if not prog_matches(name, info, prog_type):
                raise EbpfError("abi_mismatch", f"pinned program {name} is {info}")
        for spec in maps:
            fd = map_fds[spec.name] = bpf.obj_get(pin_dir / MAPS_DIR / spec.name)
            why = map_mismatch(spec, bpf.map_info(fd))
            if why is not None:
                raise EbpfError("abi_mismatch", why)
    except BaseException as exc:
        close_fds([*prog_fds.values(), *map_fds.values()])
        if isinstance(exc, OSError):
            raise EbpfError("load_failed", f"{pin_dir}: {exc.strerror}") from exc
        raise
    return prog_fds, map_fds


def close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def unpin(pin_dir: Path) -> None:
    """Remove every pin `load_object` may have made under `pin_dir`. Idempotent."""
    try:
        (pin_dir / PROG_PIN).unlink(missing_ok=True)
        for folder in (pin_dir / PROGS_DIR, pin_dir / MAPS_DIR):
            if folder.is_dir():
                for pin in folder.iterdir():
                    pin.unlink()
                folder.rmdir()
    except OSError as exc:
        raise EbpfError("mount_failed", f"unpin {pin_dir}: {exc.strerror}") from exc


def release(pin_dir: Path) -> None:
    """Unpin, unmount and remove `pin_dir`. Idempotent."""
    unpin(pin_dir)
    umount_bpffs(pin_dir)
    try:
        pin_dir.rmdir()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise EbpfError("mount_failed", f"{pin_dir}: {exc.strerror}") from exc


def discard(pin_dir: Path) -> None:
    """Best-effort `release`, after a failed load."""
    with contextlib.suppress(EbpfError):
        release(pin_dir)


# ---------------------------------------------------------------------------
# clsact filters, in the calling thread's network namespace.


def attach(
    link: str | int, prog_fd: int, *, name: str, parent: int = INGRESS, label: str = ""
) -> int:
    """Ensure clsact and our filter running `prog_fd` on `link` (a name or an ifindex) at
    `parent`; the link's ifindex. Details start with `label` (default: the link)."""
    label = label or str(link)
    try:
        with IPRoute() as ipr:
            ifindex = _index(ipr, link)
            if ifindex is None:
                raise EbpfError("no_such_link", str(link))
            try:
                ipr.tc("add", "clsact", ifindex)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise
            ipr.tc(
                "replace-filter",
                "bpf",
                ifindex,
                FILTER_HANDLE,
                fd=prog_fd,
                name=name,
                parent=parent,
                prio=FILTER_PRIO,
                protocol=_ETH_P_ALL,
                direct_action=True,
            )
    except NetlinkError as exc:
        raise EbpfError("attach_failed", f"{label}: {os.strerror(exc.code)}") from exc
    except OSError as exc:
        raise EbpfError("attach_failed", f"{label}: {exc}") from exc
    return ifindex


def detach(link: str | int, *, parent: int = INGRESS, label: str = "") -> None:
    """Remove our filter at `parent` from `link`, and clsact once it holds no filter.
    Idempotent; a link that is gone took its filters with it."""
    label = label or str(link)
    try:
        with IPRoute() as ipr:
            ifindex = _index(ipr, link)
            if ifindex is None:
                return
            try:
                ipr.tc(
                    "del-filter",
                    "bpf",
                    ifindex,
                    FILTER_HANDLE,
                    parent=parent,
                    prio=FILTER_PRIO,
                    protocol=_ETH_P_ALL,
                )
            except NetlinkError as exc:
                if exc.code not in _GONE:
                    raise
            try:
                left = [f for p in (INGRESS, EGRESS) for f in ipr.get_filters(ifindex, parent=p)]
                if not left:
                    ipr.tc("del", "clsact", ifindex)
            except NetlinkError as exc:
                if exc.code not in _GONE:
                    raise
    except NetlinkError as exc:
        raise EbpfError("detach_failed", f"{label}: {os.strerror(exc.code)}") from exc
    except OSError as exc:
        raise EbpfError("detach_failed", f"{label}: {exc}") from exc


def _index(ipr: IPRoute, link: str | int) -> int | None:
    if isinstance(link, int):
        return link
    found = ipr.link_lookup(ifname=link)
    return int(found[0]) if found else None


# ---------------------------------------------------------------------------
# Map elements by name (the name is for the error's detail).


def map_update(fd: int, name: str, key: bytes, value: bytes) -> None:
    try:
        bpf.map_update(fd, key, value)
    except OSError as exc:
        raise EbpfError("map_failed", f"update {name}: {exc.strerror}") from exc


def map_delete(fd: int, name: str, key: bytes) -> None:
    try:
        bpf.map_delete(fd, key)
    except OSError as exc:
        raise EbpfError("map_failed", f"delete {name}: {exc.strerror}") from exc


def map_lookup(fd: int, name: str, key: bytes, size: int) -> bytes | None:
    try:
        return bpf.map_lookup(fd, key, size)
    except OSError as exc:
        raise EbpfError("map_failed", f"lookup {name}: {exc.strerror}") from exc


_U32: Final = struct.Struct("=I")
_U64: Final = struct.Struct("=Q")
_Slot = TypeVar("_Slot", bound=int)


def sum_percpu(raw: bytes, fmt: struct.Struct, cpus: int) -> tuple[int, ...]:
    """Field-wise sum of a per-CPU value of layout `fmt` over `cpus` slots, each rounded up
    to 8 bytes (the kernel's layout of a per-CPU map's value, `bpf.percpu_value_size`)."""
    stride = (fmt.size + 7) // 8 * 8
    totals = [0] * len(fmt.unpack_from(raw, 0))
    for cpu in range(cpus):
        for i, value in enumerate(fmt.unpack_from(raw, cpu * stride)):
            totals[i] += value
    return tuple(totals)


def percpu_counters(fd: int, name: str, slots: Iterable[_Slot]) -> dict[_Slot, int]:
    """{slot: its count summed over CPUs} of a per-CPU array of u64 counters indexed by u32
    (`slots`: the program's reason enum); a slot the lookup misses counts 0."""
    cpus = bpf.possible_cpus()
    size = bpf.percpu_value_size(_U64.size)
    out = {}
    for slot in slots:
        raw = map_lookup(fd, name, _U32.pack(slot), size)
        out[slot] = 0 if raw is None else sum_percpu(raw, _U64, cpus)[0]
    return out


def map_keys(fd: int, name: str, key_size: int) -> list[bytes]:
    try:
        return list(bpf.map_keys(fd, key_size))
    except OSError as exc:
        raise EbpfError("map_failed", f"keys of {name}: {exc.strerror}") from exc
