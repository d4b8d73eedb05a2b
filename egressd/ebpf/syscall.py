"""The few bpf(2) commands the agent needs, through ctypes.

A thin, synchronous wrapper: each function is one syscall and raises `OSError`
(with the kernel's errno) on failure, like the `os` module does. The caller,
`egressd.agent.tier1`, translates those into its own typed errors.

Only commands on objects that already exist are here (loading programs is done
once by bpftool): `BPF_OBJ_GET` on pinned objects, map element lookup (also as
`ElemReader`, whose buffers are allocated once, for lookups at a connection's rate),
update, delete and key iteration, and `BPF_OBJ_GET_INFO_BY_FD` to check that a map has
the shape the agent expects. Nothing here depends on the calling thread's
network namespace.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

# <linux/bpf.h> enum bpf_cmd
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_GET = 7
BPF_OBJ_GET_INFO_BY_FD = 15

# map update flags
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2
BPF_F_RDONLY = 1 << 3  # BPF_OBJ_GET file_flags: an fd that reads a map, never writes it

# enum bpf_map_type (only those the agent checks)
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_LPM_TRIE = 11
BPF_MAP_TYPE_RINGBUF = 27

# enum bpf_prog_type
BPF_PROG_TYPE_SCHED_CLS = 3

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "arm64": 280, "riscv64": 280}
# Large enough for every union member used here; the kernel accepts a larger
# attr as long as the tail is zero.
_ATTR_SIZE = 128
_INFO_SIZE = 256
_OBJ_NAME_LEN = 16

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint]


@dataclass(frozen=True, slots=True)
class MapInfo:
    map_type: int
    map_id: int
    key_size: int
    value_size: int
    max_entries: int
    map_flags: int
    name: str


@dataclass(frozen=True, slots=True)
class ProgInfo:
    prog_type: int
    prog_id: int
    name: str


def _sys_bpf() -> int:
    machine = platform.machine()
    try:
        return _SYS_BPF[machine]
    except KeyError:
        raise OSError(0, f"bpf(2) syscall number unknown for {machine}") from None


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    ret = _syscall(_sys_bpf(), cmd, ctypes.addressof(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(ret)


def _addr(buf: ctypes.Array[ctypes.c_char]) -> int:
    return ctypes.addressof(buf)


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


def obj_get(path: Path, flags: int = 0) -> int:
    """A new fd for the object pinned at `path` (close it with `os.close`); `flags`:
    BPF_F_RDONLY for a map fd that cannot write."""
    name = ctypes.create_string_buffer(os.fsencode(path))
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("=QII", attr, 0, _addr(name), 0, flags)
    return _bpf(BPF_OBJ_GET, attr)


def map_info(fd: int) -> MapInfo:
    info = ctypes.create_string_buffer(_INFO_SIZE)
    _obj_info(fd, info)
    map_type, map_id, key_size, value_size, max_entries, flags = struct.unpack_from("=6I", info)
    name = _cstr(info.raw[24 : 24 + _OBJ_NAME_LEN])
    return MapInfo(map_type, map_id, key_size, value_size, max_entries, flags, name)


def prog_info(fd: int) -> ProgInfo:
    info = ctypes.create_string_buffer(_INFO_SIZE)
    _obj_info(fd, info)
    prog_type, prog_id = struct.unpack_from("=2I", info)
    # struct bpf_prog_info: name[16] sits at offset 64 (after map_ids).
    name = _cstr(info.raw[64 : 64 + _OBJ_NAME_LEN])
    return ProgInfo(prog_type, prog_id, name)


def _obj_info(fd: int, info: ctypes.Array[ctypes.c_char]) -> None:
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("=IIQ", attr, 0, fd, ctypes.sizeof(info), _addr(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr)


def _elem_attr(
    fd: int, key: ctypes.Array[ctypes.c_char], value: int, flags: int
) -> ctypes.Array[ctypes.c_char]:
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("=I4xQQQ", attr, 0, fd, _addr(key), value, flags)
    return attr


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value stored under `key`, or None when there is none.

    For per-CPU maps `value_size` must be round_up(value_size, 8) * `possible_cpus()`.
    """
    kbuf = ctypes.create_string_buffer(key, len(key))
    vbuf = ctypes.create_string_buffer(value_size)
    try:
        _bpf(BPF_MAP_LOOKUP_ELEM, _elem_attr(fd, kbuf, _addr(vbuf), 0))
    except FileNotFoundError:
        return None
    return vbuf.raw


class ElemReader:
    """`map_lookup` for one map at the cost of one syscall: the key buffer (`key`, which the
    caller fills in place, e.g. with `struct.Struct.pack_into`), the value buffer and the
    bpf_attr pointing at both are allocated once, here, not per lookup.

    Not thread-safe: every lookup goes through the same three buffers, so a reader belongs
    to one thread (the proxy's readers each belong to one process's event loop; `lookup` is
    one synchronous call, so no other task of that loop can run between filling `key` and
    reading the value). The caller keeps `fd` open while the reader is in use.
    """

    __slots__ = ("_args", "_attr", "_value", "fd", "key")

    def __init__(self, fd: int, key_size: int, value_size: int) -> None:
        self.fd = fd
        self.key = ctypes.create_string_buffer(key_size)
        self._value = ctypes.create_string_buffer(value_size)
        self._attr = ctypes.create_string_buffer(_ATTR_SIZE)
        # map_fd as a C int (what an fd is): -1, no map, is EBADF from the kernel.
        struct.pack_into("=i4xQQQ", self._attr, 0, fd, _addr(self.key), _addr(self._value), 0)
        # The syscall's arguments, resolved once (`_sys_bpf` raises here on an unknown machine)
        # and as ctypes objects of `_syscall.argtypes`: ctypes passes those as they are, where
        # it would convert ints on every call (a quarter of the call's cost).
        self._args = (
            ctypes.c_long(_sys_bpf()),
            ctypes.c_int(BPF_MAP_LOOKUP_ELEM),
            ctypes.c_void_p(_addr(self._attr)),
            ctypes.c_uint(_ATTR_SIZE),
        )

    def lookup(self) -> bytes | None:
        """The value stored under the key now in `key`, or None when there is none; other
        failures raise `OSError` with the kernel's errno, as `map_lookup` does."""
        if _syscall(*self._args) < 0:
            err = ctypes.get_errno()
            if err == errno.ENOENT:
                return None
            raise OSError(err, os.strerror(err))
        return self._value.raw

    def release(self) -> None:
        """Forget the fd (its owner is closing it): a later lookup fails with EBADF, as one
        through the closed fd would, and never reaches a map that reused its number."""
        self.fd = -1
        struct.pack_into("=i", self._attr, 0, -1)


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    kbuf = ctypes.create_string_buffer(key, len(key))
    vbuf = ctypes.create_string_buffer(value, len(value))
    _bpf(BPF_MAP_UPDATE_ELEM, _elem_attr(fd, kbuf, _addr(vbuf), flags))


def map_delete(fd: int, key: bytes) -> bool:
    """Delete `key`; False when it was not there."""
    kbuf = ctypes.create_string_buffer(key, len(key))
    try:
        _bpf(BPF_MAP_DELETE_ELEM, _elem_attr(fd, kbuf, 0, 0))
    except FileNotFoundError:
        return False
    return True


def map_keys(fd: int, key_size: int) -> Iterator[bytes]:
    """Every key of the map (a snapshot-ish walk: keys added meanwhile may be missed)."""
    current: ctypes.Array[ctypes.c_char] | None = None
    while True:
        nxt = ctypes.create_string_buffer(key_size)
        attr = ctypes.create_string_buffer(_ATTR_SIZE)
        struct.pack_into(
            "=I4xQQ", attr, 0, fd, 0 if current is None else _addr(current), _addr(nxt)
        )
        try:
            _bpf(BPF_MAP_GET_NEXT_KEY, attr)
        except FileNotFoundError:
            return
        yield nxt.raw
        current = nxt


@cache
def possible_cpus() -> int:
    """How many CPUs per-CPU maps hold a slot for (/sys/devices/system/cpu/possible)."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


def percpu_value_size(value_size: int) -> int:
    return ((value_size + 7) // 8 * 8) * possible_cpus()
