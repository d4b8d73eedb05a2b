"""BPF_PROG_TEST_RUN for tc programs: one packet in, the verdict, the packet and skb out.

The kernel runs the loaded program on an skb built from `frame` (an Ethernet frame), with
its real maps and helpers, without any device: the Katran/Cilium way of testing a program
packet by packet. Needs root (CAP_BPF/CAP_NET_ADMIN).
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
from dataclasses import dataclass

BPF_PROG_TEST_RUN = 10
TC_ACT_OK = 0
TC_ACT_SHOT = 2
TC_ACT_REDIRECT = 7
_ATTR = struct.Struct("=IIIIQQIIIIQQIII")
_SKB_SIZE = 192  # struct __sk_buff on 6.x; the kernel zero-checks a larger tail
_SKB_MARK = 8  # offsetof(struct __sk_buff, mark)
_MAX_OUT = 65536
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint]


@dataclass(frozen=True, slots=True)
class Run:
    retval: int
    data: bytes
    mark: int


def run_prog(prog_fd: int, frame: bytes) -> Run:
    data_in = ctypes.create_string_buffer(frame, len(frame))
    data_out = ctypes.create_string_buffer(_MAX_OUT)
    ctx_in = ctypes.create_string_buffer(_SKB_SIZE)
    ctx_out = ctypes.create_string_buffer(_SKB_SIZE)
    attr = ctypes.create_string_buffer(128)
    _ATTR.pack_into(
        attr,
        0,
        prog_fd,
        0,
        len(frame),
        _MAX_OUT,
        ctypes.addressof(data_in),
        ctypes.addressof(data_out),
        1,
        0,
        _SKB_SIZE,
        _SKB_SIZE,
        ctypes.addressof(ctx_in),
        ctypes.addressof(ctx_out),
        0,
        0,
        0,
    )
    nr = {"x86_64": 321, "aarch64": 280}[platform.machine()]
    if _libc.syscall(nr, BPF_PROG_TEST_RUN, ctypes.addressof(attr), 128) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    fields = _ATTR.unpack_from(attr, 0)
    retval, size_out = fields[1], fields[3]
    (mark,) = struct.unpack_from("=I", ctx_out, _SKB_MARK)
    return Run(retval, data_out.raw[:size_out], mark)
