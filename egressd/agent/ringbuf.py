"""Reading a BPF ring buffer (BPF_MAP_TYPE_RINGBUF) from Python, without libbpf.

The kernel's layout (kernel/bpf/ringbuf.c; libbpf's ring_buffer__poll does the
same):

* mmap offset 0, one page, read-write: the consumer position (u64), which
  only user space moves;
* mmap offset one page, read-only: the producer position (u64) on its own
  page, then the data area of ``max_entries`` bytes (a power of two), mapped
  twice in a row so that a record that wraps reads as contiguous memory.

Positions only grow; a position's place in the data area is ``pos & (size - 1)``.
Each record starts with an 8-byte header {u32 len, u32 page offset}: bit 31 of
len (BUSY) says the producer has reserved but not yet submitted it (stop
there: records are consumed in order), bit 30 (DISCARD) that it was discarded
(skip it). A record takes ``round_up(len + 8, 8)`` bytes.

`consume` is the pure walk over any `RingView`; `RingBuffer` is the mmap of a
real map fd (plain loads and stores: x86-64 orders them as the kernel's
acquire/release pairs need). The fd polls readable when records are waiting,
so an event loop can wait for it with ``add_reader``.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from typing import Final, Protocol

BUSY_BIT: Final = 1 << 31
DISCARD_BIT: Final = 1 << 30
HEADER_LEN: Final = 8

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


class RingView(Protocol):
    """The data area as the consumer sees it (offsets already masked)."""

    def header(self, offset: int) -> int: ...

    def sample(self, offset: int, length: int) -> bytes: ...


def record_len(header: int) -> int:
    """Bytes a record with length word `header` takes in the ring, header included."""
    length = header & ~(BUSY_BIT | DISCARD_BIT)
    return (length + HEADER_LEN + 7) & ~7


def consume(view: RingView, cons: int, prod: int, mask: int, limit: int) -> tuple[list[bytes], int]:
    """Samples between `cons` and `prod` (at most `limit`), and the new consumer position.

    Stops at the first record still being written (BUSY); skips discarded ones.
    """
    out: list[bytes] = []
    while cons < prod and len(out) < limit:
        offset = cons & mask
        header = view.header(offset)
        if header & BUSY_BIT:
            break
        if not header & DISCARD_BIT:
            out.append(view.sample(offset + HEADER_LEN, header & ~(BUSY_BIT | DISCARD_BIT)))
        cons += record_len(header)
    return out, cons


class _MappedView:
    def __init__(self, data_addr: int) -> None:
        self._addr = data_addr

    def header(self, offset: int) -> int:
        return ctypes.c_uint32.from_address(self._addr + offset).value

    def sample(self, offset: int, length: int) -> bytes:
        return ctypes.string_at(self._addr + offset, length)


class RingBuffer:
    """A consumer of the ring buffer map behind `map_fd` (the fd is duplicated).

    Not thread-safe; one consumer per ring (the consumer position is shared
    by every process that maps it).
    """

    def __init__(self, map_fd: int, size: int) -> None:
        if size <= 0 or size & (size - 1):
            raise ValueError(f"ring buffer size must be a power of two, got {size}")
        self.size = size
        self._page = mmap.PAGESIZE
        self.fd = os.dup(map_fd)
        self._cons_addr = self._prod_addr = 0
        try:
            self._cons_addr = self._mmap(self._page, mmap.PROT_READ | mmap.PROT_WRITE, 0)
            self._prod_addr = self._mmap(self._page + 2 * size, mmap.PROT_READ, self._page)
        except BaseException:
            self.close()
            raise
        self._view = _MappedView(self._prod_addr + self._page)

    def _mmap(self, length: int, prot: int, offset: int) -> int:
        addr = _libc.mmap(None, length, prot, mmap.MAP_SHARED, self.fd, offset)
        if addr is None or addr == _MAP_FAILED:
            err = ctypes.get_errno()
            raise OSError(err, f"mmap ring buffer: {os.strerror(err)}")
        return int(addr)

    @property
    def pending(self) -> int:
        """Bytes the producer has written that this consumer has not read."""
        return self._producer() - self._consumer().value

    def _consumer(self) -> ctypes.c_uint64:
        return ctypes.c_uint64.from_address(self._cons_addr)

    def _producer(self) -> int:
        return ctypes.c_uint64.from_address(self._prod_addr).value

    def drain(self, limit: int = 4096) -> list[bytes]:
        """Every submitted record (up to `limit`), oldest first; frees their space."""
        if not self._cons_addr:
            raise OSError(0, "ring buffer closed")
        consumer = self._consumer()
        samples, cons = consume(self._view, consumer.value, self._producer(), self.size - 1, limit)
        consumer.value = cons
        return samples

    def close(self) -> None:
        if self._prod_addr:
            _libc.munmap(self._prod_addr, self._page + 2 * self.size)
            self._prod_addr = 0
        if self._cons_addr:
            _libc.munmap(self._cons_addr, self._page)
            self._cons_addr = 0
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
