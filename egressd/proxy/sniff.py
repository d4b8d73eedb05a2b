"""What a client says it wants to reach, read from its first bytes.

Pure functions, bytes in, a small frozen result out. They never raise on any
input: garbage yields a status, not an exception, because the bytes come from
untrusted sandboxed code.

* `classify_first_bytes(data)`: ``"tls"`` (a TLS handshake record),
  ``"http"`` (an HTTP/1.x request line is starting), ``"unknown"`` (something
  else: decide without a name), ``"incomplete"`` (too few bytes to tell).
* `sniff_tls_sni(data)`: the ``host_name`` of the ``server_name`` extension
  (RFC 6066) of a TLS ClientHello. A ClientHello may be fragmented over
  several handshake records (RFC 8446 section 5.1); the fragments are joined.
* `sniff_http_host(data)`: the Host of a plain HTTP/1.x request (RFC 9112):
  the Host header, or the authority of an absolute-form request target.

Statuses are strings so they can go into logs verbatim: ``ok`` (a name was
found), ``incomplete`` (more bytes might still make it parse; the caller
reads on or times out), ``not_tls``/``not_http`` (not that protocol at all),
``malformed`` (that protocol, but broken or ambiguous), ``no_sni``/``no_host``
(well-formed, without a name).

Strictness, and why: a transparent proxy and the real server must not read
two different names out of the same bytes (the name decides the policy, the
server decides what is served). So everything ambiguous is ``malformed``: two
``server_name`` extensions or two host names in one; two Host headers; a Host
header that disagrees with an absolute-form target; obsolete line folding;
whitespace between a header name and its colon (RFC 9112 section 5.1, a
classic request-smuggling vector); a header line without a colon; control
characters in a name. The caller fails closed on ``malformed``.

The returned host is lower-case ASCII without a port or trailing dot, but not
otherwise normalised: `egressd.policy.names.normalize_host` is the one place
that decides what a valid name is (and IP literals are still returned here;
the caller decides what a literal means).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

OK: Final = "ok"
INCOMPLETE: Final = "incomplete"
NOT_TLS: Final = "not_tls"
NOT_HTTP: Final = "not_http"
MALFORMED: Final = "malformed"
NO_SNI: Final = "no_sni"
NO_HOST: Final = "no_host"

KIND_TLS: Final = "tls"
KIND_HTTP: Final = "http"
KIND_UNKNOWN: Final = "unknown"
KIND_INCOMPLETE: Final = "incomplete"

#: The most a caller should peek for a name (and what `sniff_http_host`
#: treats as "the headers can never end": beyond this, ``malformed``).
MAX_PEEK: Final = 16 * 1024

_TLS_HANDSHAKE: Final = 0x16
_TLS_CLIENT_HELLO: Final = 0x01
_TLS_RECORD_HEADER: Final = 5
_TLS_MAX_FRAGMENT: Final = 2**14 + 2048  # RFC 8446 5.2: the largest ciphertext; be lenient
_EXT_SERVER_NAME: Final = 0x0000
_SNI_HOST_NAME: Final = 0x00
_MAX_HOST_LEN: Final = 255

# An HTTP method is a token (RFC 9110 section 9); in practice upper case letters.
_MAX_METHOD_LEN: Final = 24
_METHOD_RE: Final = re.compile(rb"[A-Z][A-Z_-]*")
_TOKEN_RE: Final = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_VERSION_RE: Final = re.compile(rb"HTTP/1\.[01]")
_HOST_CHARS_RE: Final = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=%-]*")
_PORT_RE: Final = re.compile(r"[0-9]*")
_ABSOLUTE_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)")


@dataclass(frozen=True, slots=True)
class SniResult:
    status: str
    host: str | None = None

    @property
    def final(self) -> bool:
        """True when more bytes cannot change the result."""
        return self.status != INCOMPLETE


@dataclass(frozen=True, slots=True)
class HostResult:
    status: str
    host: str | None = None

    @property
    def final(self) -> bool:
        return self.status != INCOMPLETE


# --- classification -------------------------------------------------------------------


def classify_first_bytes(data: bytes) -> str:
    """Which sniffer applies to a connection that starts with `data`."""
    if not data:
        return KIND_INCOMPLETE
    if data[0] == _TLS_HANDSHAKE:
        if len(data) < 2:
            return KIND_INCOMPLETE
        return KIND_TLS if data[1] == 0x03 else KIND_UNKNOWN
    head = data[: _MAX_METHOD_LEN + 1]
    space = head.find(b" ")
    if space == -1:
        if len(head) > _MAX_METHOD_LEN:
            return KIND_UNKNOWN
        return KIND_INCOMPLETE if _METHOD_RE.fullmatch(head) else KIND_UNKNOWN
    return KIND_HTTP if space > 0 and _METHOD_RE.fullmatch(head[:space]) else KIND_UNKNOWN


# --- TLS ------------------------------------------------------------------------------


class _Short(Exception):
    """Internal: ran past the end of the available bytes."""


class _Bad(Exception):
    """Internal: the bytes contradict the format."""


class _NotTls(Exception):
    """Internal: the first record is not a TLS handshake record."""


class _Reader:
    """A cursor over a byte string, big-endian integers and length-prefixed vectors."""

    __slots__ = ("_data", "_end", "_exact", "_pos")

    def __init__(self, data: bytes, *, exact: bool) -> None:
        # `exact`: the data is a complete, length-delimited structure, so running
        # off its end is malformed rather than incomplete.
        self._data = data
        self._pos = 0
        self._end = len(data)
        self._exact = exact

    @property
    def remaining(self) -> int:
        return self._end - self._pos

    def take(self, n: int) -> bytes:
        if self._pos + n > self._end:
            raise _Bad() if self._exact else _Short()
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def vector(self, length_bytes: int) -> _Reader:
        n = self.u8() if length_bytes == 1 else self.u16()
        return _Reader(self.take(n), exact=True)


def sniff_tls_sni(data: bytes) -> SniResult:
    """The SNI host name of the TLS ClientHello at the start of `data`."""
    try:
        return _sniff_tls(bytes(data))
    except _Short:
        return SniResult(INCOMPLETE)
    except _Bad:
        return SniResult(MALFORMED)
    except Exception:  # noqa: BLE001 - a parser bug must not kill a connection handler
        return SniResult(MALFORMED)


def _handshake_bytes(data: bytes) -> bytes:
    """Join handshake-record fragments until the first handshake message is whole."""
    message = bytearray()
    pos = 0
    needed: int | None = None
    first = True
    while needed is None or len(message) < needed:
        if len(data) - pos < _TLS_RECORD_HEADER:
            # Check what we have of the header before asking for more.
            head = data[pos:]
            if (head and head[0] != _TLS_HANDSHAKE) or (len(head) >= 2 and head[1] != 0x03):
                raise _NotTls() if first else _Bad()
            raise _Short()
        ctype, major = data[pos], data[pos + 1]
        length = (data[pos + 3] << 8) | data[pos + 4]
        if ctype != _TLS_HANDSHAKE:
            if first:
                raise _NotTls()
            raise _Bad()  # interleaved non-handshake record inside the ClientHello
        if major != 0x03:
            if first:
                raise _NotTls()
            raise _Bad()
        if length == 0 or length > _TLS_MAX_FRAGMENT:
            raise _Bad()
        pos += _TLS_RECORD_HEADER
        fragment = data[pos : pos + length]
        message += fragment
        if needed is None and len(message) >= 4:
            if message[0] != _TLS_CLIENT_HELLO:
                raise _Bad()
            needed = 4 + ((message[1] << 16) | (message[2] << 8) | message[3])
        if len(fragment) < length:
            if needed is not None and len(message) >= needed:
                break
            raise _Short()
        pos += length
        first = False
    assert needed is not None
    if len(message) > needed:
        # Trailing bytes in the last record belong to another handshake message;
        # a client sends nothing after its ClientHello before the server answers.
        raise _Bad()
    return bytes(message[4:needed])


def _sniff_tls(data: bytes) -> SniResult:
    try:
        body = _handshake_bytes(data)
    except _NotTls:
        return SniResult(NOT_TLS)
    hello = _Reader(body, exact=True)
    version_major = hello.u8()
    hello.u8()  # legacy version minor
    if version_major != 0x03:
        raise _Bad()
    hello.take(32)  # random
    session_id = hello.vector(1)
    if session_id.remaining > 32:
        raise _Bad()
    suites = hello.vector(2)
    if suites.remaining == 0 or suites.remaining % 2:
        raise _Bad()
    compression = hello.vector(1)
    if compression.remaining == 0:
        raise _Bad()
    if hello.remaining == 0:
        return SniResult(NO_SNI)  # SSLv3/TLS 1.0 style hello without extensions
    extensions = hello.vector(2)
    if hello.remaining:
        raise _Bad()
    seen: set[int] = set()
    host: str | None = None
    while extensions.remaining:
        ext_type = extensions.u16()
        ext = extensions.vector(2)
        if ext_type in seen:
            raise _Bad()  # RFC 8446 4.2: at most one extension of each type
        seen.add(ext_type)
        if ext_type == _EXT_SERVER_NAME:
            host = _server_name(ext)
    if host is None:
        return SniResult(NO_SNI)
    return SniResult(OK, host)


def _server_name(ext: _Reader) -> str | None:
    if ext.remaining == 0:
        return None  # the empty form a server echoes; from a client it names nothing
    names = ext.vector(2)
    if ext.remaining or names.remaining == 0:
        raise _Bad()
    host: str | None = None
    while names.remaining:
        name_type = names.u8()
        name = names.vector(2)
        if name_type != _SNI_HOST_NAME:
            continue  # unknown name types are skipped (RFC 6066 section 3)
        if host is not None:
            raise _Bad()  # "MUST NOT contain more than one name of the same name_type"
        host = _host_text(bytes(name.take(name.remaining)))
    return host


def _host_text(raw: bytes) -> str:
    if not raw or len(raw) > _MAX_HOST_LEN:
        raise _Bad()
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError as exc:
        raise _Bad() from exc
    if not text.isprintable() or " " in text:
        raise _Bad()
    text = text.lower().removesuffix(".")
    if not text:
        raise _Bad()
    return text


# --- HTTP/1.x -------------------------------------------------------------------------


def sniff_http_host(data: bytes, *, max_header_bytes: int = MAX_PEEK) -> HostResult:
    """The Host of the HTTP/1.x request at the start of `data`."""
    try:
        return _sniff_http(bytes(data), max_header_bytes)
    except Exception:  # noqa: BLE001 - never raise on untrusted bytes
        return HostResult(MALFORMED)


def _sniff_http(data: bytes, max_header_bytes: int) -> HostResult:
    kind = classify_first_bytes(data)
    if kind == KIND_INCOMPLETE:
        return HostResult(INCOMPLETE)
    if kind != KIND_HTTP:
        return HostResult(NOT_HTTP)
    line_end = data.find(b"\r\n")
    if line_end == -1:
        if b"\n" in data or len(data) >= max_header_bytes:
            return HostResult(MALFORMED)  # bare LF line endings are refused
        return HostResult(INCOMPLETE)
    request_line = data[:line_end]
    parts = request_line.split(b" ")
    if len(parts) != 3:
        # "PRI * HTTP/2.0" and HTTP/0.9 one-word requests land here as well.
        return HostResult(MALFORMED if len(parts) > 3 else NOT_HTTP)
    method, target, version = parts
    if not _METHOD_RE.fullmatch(method) or not target:
        return HostResult(MALFORMED)
    if not _VERSION_RE.fullmatch(version):
        return HostResult(NOT_HTTP)
    head_end = data.find(b"\r\n\r\n")
    if head_end == -1:
        if len(data) >= max_header_bytes:
            return HostResult(MALFORMED)
        # Fail early on what is already visibly broken (complete lines only).
        last_line_end = data.rfind(b"\r\n")
        if _headers(data[line_end + 2 : last_line_end]) is None:
            return HostResult(MALFORMED)
        hosts_so_far = data[line_end:last_line_end].lower().count(b"\r\nhost:")
        return HostResult(MALFORMED if hosts_so_far > 1 else INCOMPLETE)
    if head_end + 4 > max_header_bytes:
        return HostResult(MALFORMED)
    headers = _headers(data[line_end + 2 : head_end])
    if headers is None:
        return HostResult(MALFORMED)
    hosts = [value for name, value in headers if name == b"host"]
    if len(hosts) > 1:
        return HostResult(MALFORMED)
    header_host: str | None = None
    if hosts:
        parsed = _authority_host(hosts[0])
        if parsed is None:
            return HostResult(MALFORMED)
        header_host = parsed or None
    target_host: str | None = None
    try:
        target_text = target.decode("ascii")
    except UnicodeDecodeError:
        return HostResult(MALFORMED)
    absolute = _ABSOLUTE_RE.match(target_text)
    if absolute is not None:
        authority = absolute.group(1)
        if "@" in authority:
            return HostResult(MALFORMED)  # userinfo: refuse rather than guess
        parsed = _authority_host(authority.encode("ascii"))
        if not parsed:
            return HostResult(MALFORMED)
        target_host = parsed
        if header_host is not None and header_host != target_host:
            return HostResult(MALFORMED)
    host = target_host or header_host
    if host is None:
        return HostResult(NO_HOST)
    return HostResult(OK, host)


def _headers(block: bytes) -> list[tuple[bytes, bytes]] | None:
    """Header (lower-case name, value) pairs; None when any line is malformed."""
    out: list[tuple[bytes, bytes]] = []
    if not block:
        return out
    for line in block.split(b"\r\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            return None  # obs-fold
        colon = line.find(b":")
        if colon <= 0:
            return None
        name = line[:colon]
        if not _TOKEN_RE.fullmatch(name):
            return None  # includes whitespace before the colon
        value = line[colon + 1 :].strip(b" \t")
        if b"\n" in value or b"\r" in value or b"\x00" in value:
            return None
        out.append((name.lower(), value))
    return out


def _authority_host(value: bytes) -> str | None:
    """Host of `host[:port]` in lower case; "" for an empty value; None if malformed."""
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        return None
    if not text:
        return ""
    if text.startswith("["):
        close = text.find("]")
        if close == -1:
            return None
        host, rest = text[: close + 1], text[close + 1 :]
        if rest and not (rest.startswith(":") and _PORT_RE.fullmatch(rest[1:])):
            return None
        return host.lower()
    host, sep, port = text.rpartition(":")
    if not sep:
        host = text
    elif not _PORT_RE.fullmatch(port) or ":" in host:
        return None
    if not host or not _HOST_CHARS_RE.fullmatch(host):
        return None
    return host.lower().removesuffix(".") or None
