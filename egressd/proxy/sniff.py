"""What a client says it wants to reach, read from its first bytes.

Pure code, bytes in, a small frozen result out. Nothing here raises on any
input: garbage yields a status, not an exception, because the bytes come from
untrusted sandboxed code.

* `classify_first_bytes(data)`: ``"tls"`` (a TLS handshake record, or an
  SSLv2-compatible ClientHello), ``"http"`` (an HTTP/1.x request line is
  starting), ``"unknown"`` (something else), ``"incomplete"`` (too few bytes
  to tell; `pending_kind` says which of the two it could still become).
* `ClientHelloReader` / `sniff_tls_sni(data)`: the ``host_name`` of the
  ``server_name`` extension (RFC 6066) of a TLS ClientHello, and whether it
  carries ``encrypted_client_hello`` (``ech``). The ClientHello is reassembled
  across TCP segments and TLS records (RFC 8446 section 5.1: a handshake
  message may be fragmented over any number of records).
* `HttpHeadReader` / `sniff_http_host(data)`: the Host of a plain HTTP/1.x
  request (RFC 9112): the authority of an absolute-form or (for ``CONNECT``)
  authority-form request target, else the Host header; ``port`` is the
  target's port when the target names one (the port a forward proxy or a
  ``CONNECT`` tunnel would go to).

The readers are incremental: `update(data)` takes everything received so far
(the same buffer, grown by appending) and looks at each byte a bounded number
of times, so a ClientHello split into thousands of one-byte records or TCP
segments costs linear time, not a rescan per segment.

Statuses are strings so they can go into logs verbatim: ``ok`` (a name was
found), ``incomplete`` (more bytes might still make it parse; the caller
reads on or gives up at its deadline), ``too_large`` (not complete within the
bound), ``not_tls``/``not_http`` (not that protocol at all), ``malformed``
(that protocol, but broken, ambiguous or a version the proxy cannot read),
``no_sni``/``no_host`` (well-formed, without a name).

Bounds, counted in bytes read from the client (record headers, leading empty
lines and all):

* `MAX_CLIENT_HELLO` = 64 KiB. Real ClientHellos are 0.5-2 KB classically and
  1.5-3 KB with a post-quantum hybrid key share (X25519MLKEM768: 1,216 bytes
  of key share alone); two PQ shares, a large session ticket and ECH stay
  under 8 KiB. 64 KiB is what Go's crypto/tls and rustls accept as a
  handshake message at all (OpenSSL: 128 KiB), so a hello the proxy refuses
  as too large would be refused by most servers too, and it leaves 8x room
  for growth. A record whose end lies past the bound, or a declared
  handshake length that cannot fit in it, is ``too_large`` at once.
* `MAX_HTTP_HEAD` = 64 KiB, request line and headers up to the empty line.
  That is the largest common front-end limit (AWS ALB: 64 KB of headers;
  nginx, Node.js, Apache: 8-32 KiB by default), so no request a mainstream
  server would take is refused, and one bound means one figure for the
  memory a connection holds while it is being decided.

Strictness, and why: a transparent proxy and the real server must not read
two different names out of the same bytes (the name decides the policy, the
server decides what is served). So everything ambiguous is ``malformed``: two
``server_name`` extensions or two host names in one; two Host headers; a Host
header that disagrees with an absolute-form or ``CONNECT`` target; obsolete
line folding; whitespace between a header name and its colon (RFC 9112
section 5.1, a classic request-smuggling vector); a header line without a
colon; control characters in a name; bare LF line endings; an SSLv2-format
ClientHello (no extensions, so no SNI). HTTP the proxy cannot read is
``malformed`` too, never "not HTTP": a request line ending in an ``HTTP/``
version other than 1.0/1.1 (``PRI * HTTP/2.0``, h2c prior knowledge;
``HTTP/1.2``, which nginx serves as 1.1), an HTTP/0.9 ``GET /path``, a
request target in no RFC 9112 form. Methods are any RFC 9110 token (Go's
server routes a lower-case ``get`` by its Host), and empty lines before the
request line are skipped (RFC 9112 section 2.2; nginx does). The caller fails
closed on ``malformed``, ``incomplete`` and ``too_large``.

The returned host is lower-case ASCII without a port or trailing dot, but not
otherwise normalised: `egressd.policy.names.normalize_host` is the one place
that decides what a valid name is (and IP literals are still returned here;
the caller decides what a literal means).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final

OK: Final = "ok"
INCOMPLETE: Final = "incomplete"
TOO_LARGE: Final = "too_large"
NOT_TLS: Final = "not_tls"
NOT_HTTP: Final = "not_http"
MALFORMED: Final = "malformed"
NO_SNI: Final = "no_sni"
NO_HOST: Final = "no_host"

KIND_TLS: Final = "tls"
KIND_HTTP: Final = "http"
KIND_UNKNOWN: Final = "unknown"
KIND_INCOMPLETE: Final = "incomplete"

#: The most bytes read for a TLS ClientHello (see the module docstring).
MAX_CLIENT_HELLO: Final = 64 * 1024
#: The most bytes read for an HTTP/1.x request head (see the module docstring).
MAX_HTTP_HEAD: Final = 64 * 1024
#: The most a caller reads before it knows which of the two it is reading.
MAX_PEEK: Final = max(MAX_CLIENT_HELLO, MAX_HTTP_HEAD)

_TLS_HANDSHAKE: Final = 0x16
_TLS_CLIENT_HELLO: Final = 0x01
_TLS_RECORD_HEADER: Final = 5
_TLS_MAX_FRAGMENT: Final = 2**14 + 2048  # RFC 8446 5.2: the largest ciphertext; be lenient
_EXT_SERVER_NAME: Final = 0x0000
_EXT_ALPN: Final = 0x0010
#: encrypted_client_hello (draft-ietf-tls-esni-22 / RFC 9849): the SNI is then a public front.
EXT_ENCRYPTED_CLIENT_HELLO: Final = 0xFE0D
_SNI_HOST_NAME: Final = 0x00
_MAX_HOST_LEN: Final = 255

# An HTTP method is a token (RFC 9110 section 9), compared case-sensitively.
_MAX_METHOD_LEN: Final = 24
_TOKEN_RE: Final = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_VERSION_RE: Final = re.compile(rb"HTTP/1\.[01]")
_HOST_CHARS_RE: Final = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=%-]*")
_PORT_RE: Final = re.compile(r"[0-9]*")
_ABSOLUTE_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)")


@dataclass(frozen=True, slots=True)
class SniResult:
    status: str
    host: str | None = None
    #: The ClientHello carries ``encrypted_client_hello``: `host` is a public front.
    ech: bool = False
    #: The protocols the client offers by ALPN (RFC 7301), in its order; the
    #: interception step offers the server those it can read. Not compared:
    #: it never changes what tier 2 decides.
    alpn: tuple[str, ...] = field(default=(), compare=False)

    @property
    def final(self) -> bool:
        """True when more bytes cannot change the result."""
        return self.status != INCOMPLETE


@dataclass(frozen=True, slots=True)
class HostResult:
    status: str
    host: str | None = None
    #: The port an absolute-form target names, or a ``CONNECT`` target's (always given).
    port: int | None = None
    connect: bool = False

    @property
    def final(self) -> bool:
        return self.status != INCOMPLETE


# --- classification -------------------------------------------------------------------


def classify_first_bytes(data: bytes | bytearray) -> str:
    """Which reader applies to a connection that starts with `data`."""
    if not data:
        return KIND_INCOMPLETE
    first = data[0]
    if first == _TLS_HANDSHAKE:
        if len(data) < 2:
            return KIND_INCOMPLETE
        return KIND_TLS if data[1] == 0x03 else KIND_UNKNOWN
    if first & 0x80:
        # SSLv2-compatible ClientHello: 2-byte length with the top bit set,
        # msg_type 1, then the TLS version (3, x).
        if len(data) < 3 or (len(data) == 3 and data[2] == _TLS_CLIENT_HELLO):
            return KIND_INCOMPLETE
        return KIND_TLS if data[2] == _TLS_CLIENT_HELLO and data[3] == 0x03 else KIND_UNKNOWN
    if first in (0x0D, 0x0A):
        return KIND_HTTP  # empty lines before a request line (RFC 9112 2.2)
    head = bytes(data[: _MAX_METHOD_LEN + 1])
    space = head.find(b" ")
    if space == -1:
        if len(head) > _MAX_METHOD_LEN:
            return KIND_UNKNOWN
        return KIND_INCOMPLETE if _TOKEN_RE.fullmatch(head) else KIND_UNKNOWN
    return KIND_HTTP if space > 0 and _TOKEN_RE.fullmatch(head[:space]) else KIND_UNKNOWN


def pending_kind(data: bytes | bytearray) -> str:
    """What a client whose bytes `classify_first_bytes` calls incomplete may be
    sending: ``tls`` or ``http`` (a method token so far), or ``unknown`` when
    it sent nothing. For the decision at a deadline: a client cannot dodge
    the readers by stopping after a byte or two."""
    if not data:
        return KIND_UNKNOWN
    return KIND_TLS if data[0] == _TLS_HANDSHAKE or data[0] & 0x80 else KIND_HTTP


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


class ClientHelloReader:
    """Reassembles a ClientHello from a client's first bytes, as they arrive.

    `update(data)` with everything received so far returns ``incomplete``
    until the ClientHello is whole, then its final `SniResult` (and the same
    result for every later call). Records are consumed once each; only the
    header of the record being received (and the first 4 bytes of the
    handshake message, for its length) is looked at again.
    """

    __slots__ = ("_limit", "_message", "_needed", "_pos", "_result")

    def __init__(self, limit: int = MAX_CLIENT_HELLO) -> None:
        self._limit = limit
        self._pos = 0  # where the next record header starts
        self._message = bytearray()  # handshake bytes of the records consumed
        self._needed: int | None = None  # 4 + the handshake message's length
        self._result: SniResult | None = None

    def update(self, data: bytes | bytearray) -> SniResult:
        if self._result is not None:
            return self._result
        try:
            result = self._walk(data)
        except _NotTls:
            result = SniResult(NOT_TLS)
        except _Bad:
            result = SniResult(MALFORMED)
        except Exception:  # noqa: BLE001 - a parser bug must not kill a connection handler
            result = SniResult(MALFORMED)
        if result is None:
            return SniResult(INCOMPLETE)
        self._result = result
        return result

    def _walk(self, data: bytes | bytearray) -> SniResult | None:
        n = len(data)
        while True:
            pos = self._pos
            first = pos == 0
            if first and n and data[0] & 0x80:
                raise _Bad  # SSLv2-compatible hello: no extensions, no SNI to read
            if pos + _TLS_RECORD_HEADER > self._limit:
                return SniResult(TOO_LARGE)  # another record cannot fit in the bound
            if n - pos < _TLS_RECORD_HEADER:
                head = data[pos:n]
                if (head and head[0] != _TLS_HANDSHAKE) or (len(head) >= 2 and head[1] != 0x03):
                    raise _NotTls() if first else _Bad()
                return None
            ctype, major = data[pos], data[pos + 1]
            length = (data[pos + 3] << 8) | data[pos + 4]
            if ctype != _TLS_HANDSHAKE or major != 0x03:
                # Later: an interleaved non-handshake record inside the ClientHello.
                raise _NotTls() if first else _Bad()
            if length == 0 or length > _TLS_MAX_FRAGMENT:
                raise _Bad
            body = pos + _TLS_RECORD_HEADER
            end = body + length
            if end > self._limit:
                return SniResult(TOO_LARGE)
            if self._needed is None:
                have = min(end, n) - body
                prefix = bytes(self._message[:4]) + bytes(data[body : body + min(have, 4)])
                if prefix and prefix[0] != _TLS_CLIENT_HELLO:
                    raise _Bad
                if len(prefix) >= 4:
                    self._needed = 4 + int.from_bytes(prefix[1:4], "big")
                    if self._cannot_fit(pos):
                        return SniResult(TOO_LARGE)
            if end > n:
                return None
            self._message += data[body:end]
            self._pos = end
            if self._needed is not None and len(self._message) >= self._needed:
                if len(self._message) > self._needed:
                    # Trailing bytes in the last record belong to another handshake
                    # message; a client sends nothing after its ClientHello before
                    # the server answers.
                    raise _Bad
                return _parse_client_hello(bytes(self._message[4:]))

    def _cannot_fit(self, pos: int) -> bool:
        """Whether the rest of the declared message, in records from `pos` on
        (each at most the largest fragment plus its header), ends past the bound."""
        assert self._needed is not None
        rest = self._needed - len(self._message)
        records = -(-rest // _TLS_MAX_FRAGMENT)
        return pos + rest + records * _TLS_RECORD_HEADER > self._limit


def sniff_tls_sni(data: bytes | bytearray, *, limit: int = MAX_CLIENT_HELLO) -> SniResult:
    """The SNI host name of the TLS ClientHello at the start of `data`."""
    return ClientHelloReader(limit).update(data)


def _parse_client_hello(body: bytes) -> SniResult:
    hello = _Reader(body, exact=True)
    version_major = hello.u8()
    hello.u8()  # legacy version minor
    if version_major != 0x03:
        raise _Bad
    hello.take(32)  # random
    session_id = hello.vector(1)
    if session_id.remaining > 32:
        raise _Bad
    suites = hello.vector(2)
    if suites.remaining == 0 or suites.remaining % 2:
        raise _Bad
    compression = hello.vector(1)
    if compression.remaining == 0:
        raise _Bad
    if hello.remaining == 0:
        return SniResult(NO_SNI)  # SSLv3/TLS 1.0 style hello without extensions
    extensions = hello.vector(2)
    if hello.remaining:
        raise _Bad
    seen: set[int] = set()
    host: str | None = None
    alpn: tuple[str, ...] = ()
    while extensions.remaining:
        ext_type = extensions.u16()
        ext = extensions.vector(2)
        if ext_type in seen:
            raise _Bad  # RFC 8446 4.2: at most one extension of each type
        seen.add(ext_type)
        if ext_type == _EXT_SERVER_NAME:
            host = _server_name(ext)
        elif ext_type == _EXT_ALPN:
            alpn = _alpn(ext)
    ech = EXT_ENCRYPTED_CLIENT_HELLO in seen
    if host is None:
        return SniResult(NO_SNI, ech=ech, alpn=alpn)
    return SniResult(OK, host, ech=ech, alpn=alpn)


def _alpn(ext: _Reader) -> tuple[str, ...]:
    """The ALPN protocol names (RFC 7301 3.1: a non-empty list of non-empty names)."""
    names = ext.vector(2)
    if ext.remaining or names.remaining == 0:
        raise _Bad
    out: list[str] = []
    while names.remaining:
        name = names.vector(1)
        if name.remaining == 0:
            raise _Bad
        out.append(name.take(name.remaining).decode("latin-1"))
    return tuple(out)


def _server_name(ext: _Reader) -> str | None:
    if ext.remaining == 0:
        return None  # the empty form a server echoes; from a client it names nothing
    names = ext.vector(2)
    if ext.remaining or names.remaining == 0:
        raise _Bad
    host: str | None = None
    while names.remaining:
        name_type = names.u8()
        name = names.vector(2)
        if name_type != _SNI_HOST_NAME:
            continue  # unknown name types are skipped (RFC 6066 section 3)
        if host is not None:
            raise _Bad  # "MUST NOT contain more than one name of the same name_type"
        host = _host_text(bytes(name.take(name.remaining)))
    return host


def _host_text(raw: bytes) -> str:
    if not raw or len(raw) > _MAX_HOST_LEN:
        raise _Bad
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError as exc:
        raise _Bad from exc
    if not text.isprintable() or " " in text:
        raise _Bad
    text = text.lower().removesuffix(".")
    if not text:
        raise _Bad
    return text


# --- HTTP/1.x -------------------------------------------------------------------------


class HttpHeadReader:
    """Reads an HTTP/1.x request head from a client's first bytes, as they arrive.

    `update(data)` with everything received so far returns ``incomplete``
    until the head's empty line has arrived, then the final `HostResult`.
    Lines are checked as they complete (a second Host header, a malformed
    line or a bare LF fail at once); each byte is searched once.
    """

    __slots__ = ("_head", "_hosts", "_limit", "_line", "_request", "_result", "_scan")

    def __init__(self, limit: int = MAX_HTTP_HEAD) -> None:
        self._limit = limit
        self._line = 0  # where the line being received starts
        self._scan = 0  # how far the search for its end has looked
        self._request: tuple[bytes, bytes, bytes] | None = None
        self._head: list[tuple[bytes, bytes]] = []
        self._hosts = 0
        self._result: HostResult | None = None

    def update(self, data: bytes | bytearray) -> HostResult:
        if self._result is not None:
            return self._result
        try:
            result = self._walk(data)
        except Exception:  # noqa: BLE001 - never raise on untrusted bytes
            result = HostResult(MALFORMED)
        if result is None:
            return HostResult(INCOMPLETE)
        self._result = result
        return result

    def _walk(self, data: bytes | bytearray) -> HostResult | None:
        n = len(data)
        if self._request is None and self._line == self._scan:
            # Skip empty lines before the request line, then tell what it is.
            while self._line < n and data[self._line] in (0x0D, 0x0A):
                self._line += 1
            self._scan = self._line
            kind = classify_first_bytes(data[self._line : self._line + _MAX_METHOD_LEN + 1])
            if kind in (KIND_UNKNOWN, KIND_TLS):
                return HostResult(NOT_HTTP)
            if kind == KIND_INCOMPLETE:
                return HostResult(TOO_LARGE) if n >= self._limit else None
        while True:
            eol = data.find(b"\n", max(self._scan, self._line), n)
            if eol == -1:
                self._scan = n
                return HostResult(TOO_LARGE) if n >= self._limit else None
            if eol == self._line or data[eol - 1] != 0x0D:
                return HostResult(MALFORMED)  # a bare LF
            line = bytes(data[self._line : eol - 1])
            self._line = self._scan = eol + 1
            if self._request is None:
                request = _request_line(line)
                if isinstance(request, str):
                    return HostResult(request)
                self._request = request
                continue
            if not line:
                if eol + 1 > self._limit:
                    return HostResult(TOO_LARGE)
                return _http_host(self._request, self._head)
            header = _header_line(line)
            if header is None:
                return HostResult(MALFORMED)
            if header[0] == b"host":
                self._hosts += 1
                if self._hosts > 1:
                    return HostResult(MALFORMED)
            self._head.append(header)


def sniff_http_host(
    data: bytes | bytearray, *, max_header_bytes: int = MAX_HTTP_HEAD
) -> HostResult:
    """The Host of the HTTP/1.x request at the start of `data`."""
    return HttpHeadReader(max_header_bytes).update(data)


def _request_line(line: bytes) -> tuple[bytes, bytes, bytes] | str:
    """(method, target, version), or NOT_HTTP / MALFORMED."""
    parts = line.split(b" ")
    if parts[-1][:5].upper() == b"HTTP/":
        # HTTP, so it must be readable: exactly one space each side of the
        # target, a token method, version 1.0 or 1.1 (h2c and "HTTP/1.2" too
        # are servable, and unreadable here).
        if len(parts) != 3 or not _TOKEN_RE.fullmatch(parts[0]) or not parts[1]:
            return MALFORMED
        if not _VERSION_RE.fullmatch(parts[2]):
            return MALFORMED
        return parts[0], parts[1], parts[2]
    if len(parts) == 2 and (parts[1].startswith(b"/") or b"://" in parts[1]):
        return MALFORMED  # HTTP/0.9 "GET /path": served without a Host
    return NOT_HTTP


def _header_line(line: bytes) -> tuple[bytes, bytes] | None:
    """(lower-case name, value); None when the line is malformed."""
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
    return name.lower(), value


def _http_host(
    request: tuple[bytes, bytes, bytes], headers: list[tuple[bytes, bytes]]
) -> HostResult:
    method, target, _ = request
    hosts = [value for name, value in headers if name == b"host"]
    header: tuple[str, int | None] | None = None
    if hosts:
        parsed = _authority(hosts[0])
        if parsed is None:
            return HostResult(MALFORMED)
        header = parsed if parsed[0] else None
    try:
        target_text = target.decode("ascii")
    except UnicodeDecodeError:
        return HostResult(MALFORMED)
    if method.upper() == b"CONNECT":
        # RFC 9110 9.3.6: authority-form, port required. The target is where
        # the tunnel goes: it is the claim, and a Host that names anything
        # else is refused rather than guessed between.
        if "@" in target_text or "/" in target_text:
            return HostResult(MALFORMED)
        parsed = _authority(target)
        if parsed is None or not parsed[0] or parsed[1] is None:
            return HostResult(MALFORMED)
        if header is not None and (header[0] != parsed[0] or header[1] not in (None, parsed[1])):
            return HostResult(MALFORMED)
        return HostResult(OK, parsed[0], port=parsed[1], connect=True)
    absolute = _ABSOLUTE_RE.match(target_text)
    if absolute is not None:
        authority = absolute.group(1)
        if "@" in authority:
            return HostResult(MALFORMED)  # userinfo: refuse rather than guess
        parsed = _authority(authority.encode("ascii"))
        if parsed is None or not parsed[0]:
            return HostResult(MALFORMED)
        if header is not None and header[0] != parsed[0]:
            return HostResult(MALFORMED)
        return HostResult(OK, parsed[0], port=parsed[1])
    if not (target_text.startswith("/") or target_text == "*"):
        return HostResult(MALFORMED)  # in no RFC 9112 3.2 form
    if header is None:
        return HostResult(NO_HOST)
    return HostResult(OK, header[0])


def _authority(value: bytes) -> tuple[str, int | None] | None:
    """(host in lower case, port or None) of `host[:port]`; ("", None) for an
    empty value; None if malformed (a port out of 1-65535 included)."""
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        return None
    if not text:
        return "", None
    if text.startswith("["):
        close = text.find("]")
        if close == -1:
            return None
        host, rest = text[: close + 1], text[close + 1 :]
        if rest and not (rest.startswith(":") and _PORT_RE.fullmatch(rest[1:])):
            return None
        port_text = rest[1:]
        host = host.lower()
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port_text = text, ""
        elif not _PORT_RE.fullmatch(port_text) or ":" in host:
            return None
        if not host or not _HOST_CHARS_RE.fullmatch(host):
            return None
        host = host.lower().removesuffix(".")
        if not host:
            return None
    if not port_text:
        return host, None
    if len(port_text) > 5 or not 0 < int(port_text) < 65536:
        return None
    return host, int(port_text)
