"""GENEVE (RFC 8926) encode/decode with egressd's mandatory job-identity option.

Wire layout (all big-endian)::

    0                   1                   2                   3
    |Ver|  Opt Len  |O|C|    Rsvd.  |          Protocol Type        |
    |        Virtual Network Identifier (VNI)       |    Reserved   |
    |     Option Class = 0xFF01     |  Type = 0x81  |R|R|R| Len = 6 |
    |                 job id (16 bytes, UUID bytes)                 |
    |                 policy digest (8 bytes)                       |
    |                 inner IPv4 packet ...                         |

`decode` is on the proxy's per-packet path: it does one `struct.unpack_from`
for the common shape (exactly one option, the job option, and a 20-byte inner
IPv4 header; or the job option followed by the offload option) and falls
back to a general parser for anything else, which is also where every
rejection reason is decided. Scapy is only a test oracle.

The offload option (known, not critical; only between peers configured for
TUN offloads, see docs/decisions.md)::

    |     Option Class = 0xFF01     |  Type = 0x02  |R|R|R| Len = 2 |
    |     flags     |   gso_type    |           gso_size            |
    |          csum_start           |          csum_offset          |

It carries the GSO/checksum metadata of the inner packet's virtio-net header
(the sender read the packet from a TUN with ``IFF_VNET_HDR``): the inner
packet may be a TCP super-packet of up to 64 KiB to be segmented by the
receiver's kernel (``gso_type`` 1, ``gso_size`` = MSS) and its L4 checksum
may be partial (``flags`` 1, NEEDS_CSUM). `offload_vnet_header` checks it
against the inner packet and gives the 10-byte header to write to the
receiver's TUN; anything it does not recognise is `bad_offload_option`.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from egressd.errors import EgressdError

GENEVE_PORT = 6081
PROTO_IPV4 = 0x0800
PROTO_IPV6 = 0x86DD
JOB_OPTION_CLASS = 0xFF01
JOB_OPTION_TYPE = 0x81
HEADER_LEN = 8
JOB_OPTION_LEN = 28  # 4-byte option header + 16-byte job id + 8-byte digest
PREFIX_LEN = HEADER_LEN + JOB_OPTION_LEN

JOB_ID_LEN = 16
DIGEST_LEN = 8
MAX_VNI = 0xFFFFFF
MAX_OPTION_DATA = 124  # the option Length field is 5 bits of 4-byte words
MAX_OPTIONS_LEN = 252  # the header Opt Len field is 6 bits of 4-byte words
CRITICAL_TYPE_BIT = 0x80

OFFLOAD_OPTION_CLASS = 0xFF01
OFFLOAD_OPTION_TYPE = 0x02  # not critical
OFFLOAD_OPTION_LEN = 12  # 4-byte option header + 8 bytes of data
OFFLOAD_REASON = "bad_offload_option"
# virtio-net header values the offload option may carry (<linux/virtio_net.h>).
VNET_NEEDS_CSUM = 1
VNET_GSO_NONE = 0
VNET_GSO_TCPV4 = 1
# The smallest MSS Linux uses (TCP_MIN_MSS): a smaller gso_size would let
# one datagram make the receiver's kernel build hundreds of tiny segments.
MIN_GSO_SIZE = 88

_FLAG_OAM = 0x80
_FLAG_CRITICAL = 0x40
_IPV4_MIN_HEADER = 20

# Every reason `decode` can give; the proxy pre-registers its drop counter
# with these labels so that a zero is visible before the first drop.
DECODE_REASONS: tuple[str, ...] = (
    "truncated",
    "bad_version",
    "options_past_end",
    "bad_option_length",
    "unknown_critical_option",
    "missing_job_option",
    "duplicate_job_option",
    "unsupported_protocol",
    "inner_not_ipv4",
    "inner_truncated",
    "inner_bad_checksum",
)


class GeneveError(EgressdError):
    """A datagram `decode` rejects, or arguments `encode` refuses.

    `reason` is one of `DECODE_REASONS` for decode; encode and the option
    types also use `bad_vni`, `bad_option` (class/type out of range) and
    `bad_option_length`.
    """


_HEADER = struct.Struct("!BBHI")  # ver|optlen, flags, protocol, vni<<8|reserved
_OPTION_HEADER = struct.Struct("!HBB")  # class, type, reserved|length
# Header + job option + the whole 20-byte inner IPv4 header in one call. The
# IPv4 header is read as (ver_ihl, tos, total length, two 64-bit words): the
# one's-complement checksum only needs the sum modulo 0xFFFF, and 2**16, 2**32
# and 2**64 are all 1 modulo 0xFFFF, so word width does not matter.
_FAST = struct.Struct("!BBHIHBB16s8sBBHQQ")
_FAST_LEN = _FAST.size  # 56
_PREFIX = struct.Struct("!BBHIHBB16s8s")
# Header + job option + offload option + inner IPv4 header (the offload fast path).
_FAST_OFFLOAD = struct.Struct("!BBHIHBB16s8sHBB8sBBHQQ")
_FAST_OFFLOAD_LEN = _FAST_OFFLOAD.size  # 68
_OFFLOAD_PREFIX_LEN = PREFIX_LEN + OFFLOAD_OPTION_LEN  # 48
_OFFLOAD_OPTION = struct.Struct("!HBBBBHHH")  # class, type, len, then the 8 data bytes
_OFFLOAD_DATA = struct.Struct("!BBHHH")  # flags, gso_type, gso_size, csum_start, csum_offset
_VNET = struct.Struct("<BBHHHH")  # struct virtio_net_hdr, little-endian
_CSUM_TCP20 = _OFFLOAD_DATA.pack(VNET_NEEDS_CSUM, VNET_GSO_NONE, 0, 20, 16)
_VNET_CSUM_TCP20 = _VNET.pack(VNET_NEEDS_CSUM, VNET_GSO_NONE, 0, 0, 20, 16)
_INNER_HEAD = struct.Struct("!BxH")  # ver_ihl, total length


@dataclass(frozen=True, slots=True)
class JobOption:
    """The job identity every tunnelled packet carries."""

    job_id: bytes  # 16 bytes, the UUID's bytes
    digest: bytes  # 8 bytes, SHA-256(JWS string)[:8]

    def __post_init__(self) -> None:
        if len(self.job_id) != JOB_ID_LEN:
            raise GeneveError("bad_option_length", f"job_id is {len(self.job_id)} bytes, not 16")
        if len(self.digest) != DIGEST_LEN:
            raise GeneveError("bad_option_length", f"digest is {len(self.digest)} bytes, not 8")
        # Callers may hand in bytearrays; keep the value immutable and hashable.
        if type(self.job_id) is not bytes:
            object.__setattr__(self, "job_id", bytes(self.job_id))
        if type(self.digest) is not bytes:
            object.__setattr__(self, "digest", bytes(self.digest))

    @classmethod
    def from_jws(cls, job_id: uuid.UUID | str, jws: str) -> JobOption:
        """The option for a job and its signed policy (digest per DESIGN.md)."""
        uid = job_id if isinstance(job_id, uuid.UUID) else uuid.UUID(job_id)
        return cls(uid.bytes, hashlib.sha256(jws.encode("ascii")).digest()[:DIGEST_LEN])

    @property
    def job_uuid(self) -> uuid.UUID:
        return uuid.UUID(bytes=self.job_id)


@dataclass(frozen=True, slots=True)
class GeneveOption:
    """A TLV option other than the job option (kept, never acted on)."""

    opt_class: int
    opt_type: int
    data: bytes

    @property
    def critical(self) -> bool:
        return bool(self.opt_type & CRITICAL_TYPE_BIT)


@dataclass(frozen=True, slots=True)
class GenevePacket:
    """A validated datagram.

    `inner` is a view into the decoded buffer, not a copy: a receive loop that
    reuses one bytearray must be done with `inner` before the next receive.
    """

    vni: int
    protocol: int
    oam: bool
    critical: bool
    job: JobOption
    options: tuple[GeneveOption, ...]
    inner: memoryview


# Frozen dataclasses assign each field through object.__setattr__ in __init__,
# which costs more than the whole fast-path parse. Decode builds its results
# through the slot descriptors instead; the values are already validated.
_new = object.__new__
_set_job_id = JobOption.__dict__["job_id"].__set__
_set_digest = JobOption.__dict__["digest"].__set__
_set_vni = GenevePacket.__dict__["vni"].__set__
_set_protocol = GenevePacket.__dict__["protocol"].__set__
_set_oam = GenevePacket.__dict__["oam"].__set__
_set_critical = GenevePacket.__dict__["critical"].__set__
_set_job = GenevePacket.__dict__["job"].__set__
_set_options = GenevePacket.__dict__["options"].__set__
_set_inner = GenevePacket.__dict__["inner"].__set__
_set_opt_class = GeneveOption.__dict__["opt_class"].__set__
_set_opt_type = GeneveOption.__dict__["opt_type"].__set__
_set_opt_data = GeneveOption.__dict__["data"].__set__


def _make_offload_option(data: bytes) -> GeneveOption:
    opt = _new(GeneveOption)
    _set_opt_class(opt, OFFLOAD_OPTION_CLASS)
    _set_opt_type(opt, OFFLOAD_OPTION_TYPE)
    _set_opt_data(opt, data)
    return opt


def _make_job(job_id: bytes, digest: bytes) -> JobOption:
    job = _new(JobOption)
    _set_job_id(job, job_id)
    _set_digest(job, digest)
    return job


def _make_packet(
    vni: int, flags: int, job: JobOption, options: tuple[GeneveOption, ...], inner: memoryview
) -> GenevePacket:
    pkt = _new(GenevePacket)
    _set_vni(pkt, vni)
    _set_protocol(pkt, PROTO_IPV4)
    _set_oam(pkt, flags & _FLAG_OAM != 0)
    _set_critical(pkt, flags & _FLAG_CRITICAL != 0)
    _set_job(pkt, job)
    _set_options(pkt, options)
    _set_inner(pkt, inner)
    return pkt


def decode(buf: bytes | bytearray | memoryview) -> GenevePacket:
    """Parse and validate one GENEVE datagram (the UDP payload).

    Raises only `GeneveError` for any bytes-like input (a non-buffer argument
    is a programming error and raises TypeError). Checks, in order: header
    length, version, options length, protocol (only IPv4; IPv6 gets
    `unsupported_protocol` until it is supported), each option (the job option
    exactly once with 24 data bytes, no unknown critical option), then the
    inner IPv4 header: version, IHL, total length, header checksum.

    The inner header checksum is validated here (it costs one modular sum on
    the fast path), so a corrupt packet is counted as `inner_bad_checksum`
    instead of vanishing silently in the TUN.

    Trailing bytes after the inner packet's IPv4 total length are tolerated
    and trimmed, as the kernel's own IPv4 input does for link-layer padding:
    `inner` is exactly the IPv4 packet, so what reaches the TUN and the byte
    counters is what the sender's IP header describes.

    The VNI is returned, not checked: which VNIs are known is configuration.
    """
    kind = type(buf)
    mv = memoryview(buf) if kind is bytes or kind is bytearray else _byte_view(buf)
    n = len(mv)
    if n >= _FAST_LEN:
        (
            b0,
            flags,
            proto,
            vni_word,
            ocls,
            otype,
            olen,
            job_id,
            digest,
            ver_ihl,
            tos,
            total,
            w1,
            w2,
        ) = _FAST.unpack_from(mv, 0)
        if (
            b0 == 7  # version 0, options = 28 bytes: only the job option
            and proto == PROTO_IPV4
            and ocls == JOB_OPTION_CLASS
            and otype == JOB_OPTION_TYPE
            and olen & 0x1F == 6
            and ver_ihl == 0x45  # IPv4 without IP options
            and _IPV4_MIN_HEADER <= total <= n - PREFIX_LEN
            and ((ver_ihl << 8) + tos + total + w1 + w2) % 0xFFFF == 0
        ):
            return _make_packet(
                vni_word >> 8,
                flags,
                _make_job(job_id, digest),
                (),
                mv[PREFIX_LEN : PREFIX_LEN + total],
            )
        if n >= _FAST_OFFLOAD_LEN and b0 == 10:
            (
                b0,
                flags,
                proto,
                vni_word,
                ocls,
                otype,
                olen,
                job_id,
                digest,
                o2cls,
                o2type,
                o2len,
                o2data,
                ver_ihl,
                tos,
                total,
                w1,
                w2,
            ) = _FAST_OFFLOAD.unpack_from(mv, 0)
            if (
                proto == PROTO_IPV4
                and ocls == JOB_OPTION_CLASS
                and otype == JOB_OPTION_TYPE
                and olen & 0x1F == 6
                and o2cls == OFFLOAD_OPTION_CLASS
                and o2type == OFFLOAD_OPTION_TYPE
                and o2len & 0x1F == 2
                and ver_ihl == 0x45
                and _IPV4_MIN_HEADER <= total <= n - _OFFLOAD_PREFIX_LEN
                and ((ver_ihl << 8) + tos + total + w1 + w2) % 0xFFFF == 0
            ):
                return _make_packet(
                    vni_word >> 8,
                    flags,
                    _make_job(job_id, digest),
                    (_make_offload_option(o2data),),
                    mv[_OFFLOAD_PREFIX_LEN : _OFFLOAD_PREFIX_LEN + total],
                )
    return _decode_general(mv)


def _byte_view(buf: bytes | bytearray | memoryview) -> memoryview:
    """A 1-D unsigned-byte view of any buffer (a copy only if it is not contiguous)."""
    mv = memoryview(buf)
    if mv.format == "B" and mv.ndim == 1 and mv.c_contiguous:
        return mv
    if mv.c_contiguous:
        return mv.cast("B")
    return memoryview(mv.tobytes())


def _decode_general(mv: memoryview) -> GenevePacket:
    """Every datagram shape; decides the rejection reason."""
    n = len(mv)
    if n < HEADER_LEN:
        raise GeneveError("truncated", f"{n} bytes, header needs {HEADER_LEN}")
    b0, flags, proto, vni_word = _HEADER.unpack_from(mv, 0)
    if b0 >> 6:
        raise GeneveError("bad_version", f"version {b0 >> 6}")
    opts_end = HEADER_LEN + (b0 & 0x3F) * 4
    if opts_end > n:
        raise GeneveError("options_past_end", f"options end at {opts_end}, datagram is {n}")
    if proto != PROTO_IPV4:
        what = "IPv6 is not supported yet" if proto == PROTO_IPV6 else "not IPv4"
        raise GeneveError("unsupported_protocol", f"protocol 0x{proto:04x}: {what}")
    job, options = _parse_options(mv, opts_end)
    inner_len = _check_inner(mv, opts_end)
    return _make_packet(vni_word >> 8, flags, job, options, mv[opts_end : opts_end + inner_len])


def _parse_options(mv: memoryview, end: int) -> tuple[JobOption, tuple[GeneveOption, ...]]:
    job: JobOption | None = None
    others: list[GeneveOption] = []
    pos = HEADER_LEN
    # The option area and every option are whole 4-byte words, so an option
    # header always fits when pos < end; only its data can overrun.
    while pos < end:
        ocls, otype, olen = _OPTION_HEADER.unpack_from(mv, pos)
        start = pos + 4
        pos = start + (olen & 0x1F) * 4
        if pos > end:
            raise GeneveError("bad_option_length", f"option 0x{ocls:04x}/0x{otype:02x} overruns")
        if ocls == JOB_OPTION_CLASS and otype == JOB_OPTION_TYPE:
            if job is not None:
                raise GeneveError("duplicate_job_option", "job option appears twice")
            if pos - start != JOB_ID_LEN + DIGEST_LEN:
                raise GeneveError("bad_option_length", f"job option has {pos - start} data bytes")
            job = _make_job(
                bytes(mv[start : start + JOB_ID_LEN]), bytes(mv[start + JOB_ID_LEN : pos])
            )
        elif otype & CRITICAL_TYPE_BIT:
            raise GeneveError("unknown_critical_option", f"option 0x{ocls:04x}/0x{otype:02x}")
        else:
            others.append(GeneveOption(ocls, otype, bytes(mv[start:pos])))
    if job is None:
        raise GeneveError("missing_job_option", "no job option")
    return job, tuple(others)


def _check_inner(mv: memoryview, off: int) -> int:
    """Validate the inner IPv4 header at `off`; return the packet's total length."""
    avail = len(mv) - off
    if avail < 1:
        raise GeneveError("inner_truncated", "no inner packet")
    ver_ihl = mv[off]
    if ver_ihl >> 4 != 4:
        raise GeneveError("inner_not_ipv4", f"IP version {ver_ihl >> 4}")
    header_len = (ver_ihl & 0x0F) * 4
    if header_len < _IPV4_MIN_HEADER:
        raise GeneveError("inner_not_ipv4", f"IHL {ver_ihl & 0x0F}")
    if avail < header_len:
        raise GeneveError("inner_truncated", f"{avail} bytes, IPv4 header needs {header_len}")
    total: int = _INNER_HEAD.unpack_from(mv, off)[1]
    if total < header_len or total > avail:
        raise GeneveError(
            "inner_truncated", f"total length {total}, header {header_len}, {avail} bytes"
        )
    if int.from_bytes(mv[off : off + header_len], "big") % 0xFFFF:
        raise GeneveError("inner_bad_checksum", "IPv4 header checksum does not verify")
    return total


def header_for(vni: int, job: JobOption) -> bytes:
    """The 36-byte prefix (header + job option) of every data packet for (vni, job).

    Constant per job: a sender computes it once and sends `prefix + inner`.
    """
    return _prefix(vni, job, 0)


def _prefix(vni: int, job: JobOption, oam_flag: int) -> bytes:
    _check_vni(vni)
    return _PREFIX.pack(
        JOB_OPTION_LEN // 4,
        oam_flag | _FLAG_CRITICAL,  # the job option's type has the critical bit
        PROTO_IPV4,
        vni << 8,
        JOB_OPTION_CLASS,
        JOB_OPTION_TYPE,
        (JOB_ID_LEN + DIGEST_LEN) // 4,
        job.job_id,
        job.digest,
    )


def offload_option(
    flags: int, gso_type: int, gso_size: int, csum_start: int, csum_offset: int
) -> GeneveOption:
    """The offload option for one packet's virtio-net metadata (for `encode`)."""
    return GeneveOption(
        OFFLOAD_OPTION_CLASS,
        OFFLOAD_OPTION_TYPE,
        _OFFLOAD_DATA.pack(flags, gso_type, gso_size, csum_start, csum_offset),
    )


def pack_offload_option(
    buf: bytearray | memoryview,
    offset: int,
    flags: int,
    gso_type: int,
    gso_size: int,
    csum_start: int,
    csum_offset: int,
) -> None:
    """Write the 12-byte offload option at `offset` (the senders' per-packet form)."""
    _OFFLOAD_OPTION.pack_into(
        buf,
        offset,
        OFFLOAD_OPTION_CLASS,
        OFFLOAD_OPTION_TYPE,
        2,
        flags,
        gso_type,
        gso_size,
        csum_start,
        csum_offset,
    )


def offload_vnet_header(options: tuple[GeneveOption, ...], inner: memoryview) -> bytes | None:
    """The virtio-net header to write `inner` with, from the offload option.

    None when `options` has no offload option (the packet is a plain one).
    Raises `GeneveError("bad_offload_option")` unless the option describes
    `inner` (which `decode` validated as IPv4) exactly: flags only NEEDS_CSUM;
    gso_type NONE or TCPV4 (TCPV4 needs NEEDS_CSUM, a whole TCP packet
    and `MIN_GSO_SIZE <= gso_size`; one that fits one segment is written
    as a plain packet); with NEEDS_CSUM,
    `csum_start` is the IPv4 header length and `csum_offset` that of the
    TCP (16) or UDP (6) checksum field, inside the packet; without it both
    are 0. Never trusted from the wire: `hdr_len` is computed here.
    """
    if len(options) == 1:  # the common case: a small TCP packet with a partial checksum
        opt = options[0]
        if (
            opt.data == _CSUM_TCP20
            and opt.opt_class == OFFLOAD_OPTION_CLASS
            and opt.opt_type == OFFLOAD_OPTION_TYPE
            and inner[0] == 0x45
            and inner[9] == 6
            and len(inner) >= 40
        ):
            return _VNET_CSUM_TCP20
    found: GeneveOption | None = None
    for opt in options:
        if opt.opt_class == OFFLOAD_OPTION_CLASS and opt.opt_type == OFFLOAD_OPTION_TYPE:
            if found is not None:
                raise GeneveError(OFFLOAD_REASON, "offload option appears twice")
            found = opt
    if found is None:
        return None
    if len(found.data) != OFFLOAD_OPTION_LEN - 4:
        raise GeneveError(OFFLOAD_REASON, f"offload option has {len(found.data)} data bytes")
    flags, gso_type, gso_size, csum_start, csum_offset = _OFFLOAD_DATA.unpack(found.data)
    size = len(inner)
    ihl = (inner[0] & 0x0F) << 2
    proto = inner[9]
    if flags & ~VNET_NEEDS_CSUM:
        raise GeneveError(OFFLOAD_REASON, f"flags 0x{flags:02x}")
    if flags:
        want = 16 if proto == 6 else 6 if proto == 17 else -1
        if csum_offset != want or csum_start != ihl or size < ihl + csum_offset + 2:
            raise GeneveError(OFFLOAD_REASON, f"checksum at {csum_start}+{csum_offset}")
    elif csum_start or csum_offset:
        raise GeneveError(OFFLOAD_REASON, "checksum offsets without NEEDS_CSUM")
    if gso_type == VNET_GSO_NONE:
        if gso_size:
            raise GeneveError(OFFLOAD_REASON, "gso_size without gso_type")
        return _VNET.pack(flags, 0, 0, 0, csum_start, csum_offset)
    if gso_type != VNET_GSO_TCPV4 or proto != 6 or not flags:
        raise GeneveError(OFFLOAD_REASON, f"gso_type {gso_type} for protocol {proto}")
    if size < ihl + 20:
        raise GeneveError(OFFLOAD_REASON, "GSO packet without a whole TCP header")
    hdr_len = ihl + ((inner[ihl + 12] >> 4) << 2)
    if hdr_len < ihl + 20 or hdr_len > size:
        raise GeneveError(OFFLOAD_REASON, "bad TCP data offset")
    if gso_size < MIN_GSO_SIZE:
        raise GeneveError(OFFLOAD_REASON, f"gso_size {gso_size}")
    if inner[6] & 0x3F or inner[7]:  # MF or a fragment offset: not a whole packet
        raise GeneveError(OFFLOAD_REASON, "GSO packet is a fragment")
    if size - hdr_len <= gso_size:  # one segment: a plain packet (as the kernel would decide)
        return _VNET.pack(flags, 0, 0, 0, csum_start, csum_offset)
    return _VNET.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


def _check_vni(vni: int) -> None:
    if not isinstance(vni, int) or isinstance(vni, bool) or not 0 <= vni <= MAX_VNI:
        raise GeneveError("bad_vni", f"VNI {vni!r} is not in 0..{MAX_VNI}")


def encode(
    vni: int,
    job: JobOption,
    inner: bytes | memoryview,
    *,
    options: Sequence[GeneveOption] = (),
    oam: bool = False,
) -> bytes:
    """One GENEVE datagram: header, job option, `options` in order, then `inner`.

    The C bit is set when any option, the job option included, has the
    critical type bit. `inner` is not validated: it comes from the local
    kernel, and the receiver's `decode` validates it anyway.
    """
    oam_flag = _FLAG_OAM if oam else 0
    if not options:
        return _prefix(vni, job, oam_flag) + inner
    _check_vni(vni)
    extra = b"".join(_encode_option(opt) for opt in options)
    opts_len = JOB_OPTION_LEN + len(extra)
    if opts_len > MAX_OPTIONS_LEN:
        raise GeneveError(
            "bad_option_length", f"options total {opts_len} bytes > {MAX_OPTIONS_LEN}"
        )
    prefix = _prefix(vni, job, oam_flag)
    # Opt Len of the prefix only counts the job option; rewrite it for the whole area.
    return bytes([opts_len // 4]) + prefix[1:] + extra + inner


def _encode_option(opt: GeneveOption) -> bytes:
    if not isinstance(opt.opt_class, int) or not 0 <= opt.opt_class <= 0xFFFF:
        raise GeneveError("bad_option", f"option class {opt.opt_class!r}")
    if not isinstance(opt.opt_type, int) or not 0 <= opt.opt_type <= 0xFF:
        raise GeneveError("bad_option", f"option type {opt.opt_type!r}")
    if opt.opt_class == JOB_OPTION_CLASS and opt.opt_type == JOB_OPTION_TYPE:
        raise GeneveError("duplicate_job_option", "pass the job option as `job`, not in `options`")
    size = len(opt.data)
    if size % 4 or size > MAX_OPTION_DATA:
        raise GeneveError("bad_option_length", f"option data is {size} bytes")
    return _OPTION_HEADER.pack(opt.opt_class, opt.opt_type, size // 4) + bytes(opt.data)
