"""TLS ClientHellos as today's clients send them, built by hand for tests.

Python's ssl (OpenSSL 3.0 here) sends no post-quantum key share and no ECH, so
this builds what Chrome/Firefox send instead: a TLS 1.3 ClientHello with the
X25519MLKEM768 hybrid key share (1,216 bytes) and, by default, the older
X25519Kyber768Draft00 one beside it (as Chrome did in 2024), about 3 KB on
the wire; optionally the encrypted_client_hello extension, a padding
extension (RFC 7685) up to an exact size on the wire, and any record size.
"""

from __future__ import annotations

import os
import struct

X25519MLKEM768 = 0x11EC
X25519KYBER768 = 0x6399
X25519 = 0x001D
EXT_ECH = 0xFE0D
EXT_PADDING = 0x0015
RECORD = 16384


def ext(ext_type: int, data: bytes = b"") -> bytes:
    return struct.pack("!HH", ext_type, len(data)) + data


def _vec16(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


def _vec8(data: bytes) -> bytes:
    return bytes([len(data)]) + data


def sni_ext(name: str) -> bytes:
    entry = b"\x00" + _vec16(name.encode("ascii"))
    return ext(0x0000, _vec16(entry))


def ech_outer_ext(payload_len: int = 208) -> bytes:
    """An outer encrypted_client_hello (type 0): HPKE suite, config id, enc, payload."""
    body = (
        b"\x00"  # ClientHelloOuter
        + struct.pack("!HH", 0x0001, 0x0001)  # HKDF-SHA256, AES-128-GCM
        + os.urandom(1)  # config_id
        + _vec16(os.urandom(32))  # enc: an X25519 public key
        + _vec16(os.urandom(payload_len))
    )
    return ext(EXT_ECH, body)


def handshake(
    sni: str | None,
    *,
    ech: bool = False,
    pq_shares: int = 2,
    padding: int | None = None,
) -> bytes:
    """The ClientHello handshake message (type, 24-bit length, body)."""
    groups = [*[X25519MLKEM768, X25519KYBER768][:pq_shares], X25519, 0x0017, 0x0018]
    shares = (
        b"".join(
            struct.pack("!H", g) + _vec16(os.urandom(1216))
            for g in (X25519MLKEM768, X25519KYBER768)[:pq_shares]
        )
        + struct.pack("!H", X25519)
        + _vec16(os.urandom(32))
    )
    sigalgs = [0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601]
    extensions = [
        *([sni_ext(sni)] if sni is not None else []),
        ext(0x0017),  # extended_master_secret
        ext(0xFF01, b"\x00"),  # renegotiation_info
        ext(0x000A, _vec16(b"".join(struct.pack("!H", g) for g in groups))),
        ext(0x000B, b"\x01\x00"),  # ec_point_formats
        ext(0x0023),  # session_ticket
        ext(0x0010, _vec16(_vec8(b"h2") + _vec8(b"http/1.1"))),  # ALPN
        ext(0x0005, b"\x01\x00\x00\x00\x00"),  # status_request
        ext(0x000D, _vec16(b"".join(struct.pack("!H", a) for a in sigalgs))),
        ext(0x0012),  # signed_certificate_timestamp
        ext(0x0033, _vec16(shares)),  # key_share
        ext(0x002D, b"\x01\x01"),  # psk_key_exchange_modes
        ext(0x002B, b"\x04\x03\x04\x03\x03"),  # supported_versions: 1.3, 1.2
        ext(0x001B, b"\x02\x00\x02"),  # compress_certificate: brotli
        *([ech_outer_ext()] if ech else []),
        *([ext(EXT_PADDING, bytes(padding))] if padding is not None else []),
    ]
    suites = [0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F, 0xC02C, 0xC030, 0xCCA9, 0xCCA8]
    body = (
        b"\x03\x03"
        + os.urandom(32)
        + _vec8(os.urandom(32))  # legacy session id (middlebox compatibility)
        + _vec16(b"".join(struct.pack("!H", s) for s in suites))
        + b"\x01\x00"
        + _vec16(b"".join(extensions))
    )
    return b"\x01" + len(body).to_bytes(3, "big") + body


def records(message: bytes, *, size: int = RECORD) -> bytes:
    """`message` in handshake records of at most `size` bytes each."""
    out = bytearray()
    for i in range(0, len(message), size):
        piece = message[i : i + size]
        out += b"\x16\x03\x01" + struct.pack("!H", len(piece)) + piece
    return bytes(out)


def client_hello(
    sni: str | None,
    *,
    ech: bool = False,
    pq_shares: int = 2,
    total: int | None = None,
    record_size: int = RECORD,
) -> bytes:
    """A ClientHello on the wire; with `total`, padded to exactly that many bytes."""
    if total is None:
        return records(handshake(sni, ech=ech, pq_shares=pq_shares), size=record_size)
    base = len(records(handshake(sni, ech=ech, pq_shares=pq_shares, padding=0), size=record_size))
    guess = (total - base) * record_size // (record_size + 5)
    for padding in range(max(0, guess - 64), max(0, guess) + 64):
        message = handshake(sni, ech=ech, pq_shares=pq_shares, padding=padding)
        wire = records(message, size=record_size)
        if len(wire) == total:
            return wire
    raise ValueError(f"no padding gives exactly {total} bytes with {record_size}-byte records")
