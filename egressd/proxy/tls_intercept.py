"""TLS interception: the proxy ends the sandbox's TLS and opens its own upstream.

For a connection that tier 2 allowed by a rule with ``"tls": "intercept"``
(`egressd.proxy.intercept`), in this order:

1. The upstream TLS handshake, first: the proxy connects as a client with the
   SNI as server name, offering by ALPN what the client offered among the
   protocols the proxy can read (`alpn_offer`: ``h2`` and ``http/1.1``;
   ``http/1.1`` only for a policy with credentials, `supported_alpn`), and
   verifies the server's
   certificate chain and name against its own trust store (proxy config
   ``upstream_ca_file``, else the system's). A server whose certificate does
   not verify is never talked to: the client is reset, reason
   ``upstream_tls_unverified``; any other handshake failure is
   ``upstream_tls_failed``. Doing this first means the sandbox never sees a
   certificate for a server the proxy could not verify, and the ALPN answer
   to the client can be the server's own choice (`client_alpn`).
2. The client handshake: the ClientHello that tier 2 already read is fed to
   a server-side `ssl.SSLObject` whose certificate is a leaf for the SNI
   signed by the fleet's interception CA (`LeafCache`: minted on demand,
   ECDSA P-256, valid `LEAF_VALIDITY`, cached in a bounded LRU of ready
   `ssl.SSLContext`s). A client that refuses it (it does not trust the CA)
   ends the connection, reason ``client_tls_failed``.
3. The decrypted streams are relayed by the ordinary relay
   (`egressd.proxy.relay`) through the same per-request gate as plain HTTP
   (`egressd.proxy.http_gate`). HTTP/1.1: the relay runs on the TLS
   connections themselves (`TlsLink`: a `TlsTransport` over the TCP
   transport, records decrypted into the relay's buffer and encrypted into
   the TCP transport in the loop's callbacks; no socket pair, no task).
   Pacing, timeouts, half-close, the ``403`` and the audit events
   are the relay's and the gate's, unchanged. A FIN from either side becomes
   a ``close_notify`` and a FIN on the other; an error resets both. When
   both sides settled on ``h2``, `egressd.proxy.h2_proxy` takes the gate's
   place behind the relay: the same decisions, per stream; `bridge` hands
   the relay one end of a local socket pair per side and moves bytes between
   each pair's other end and its TLS connection (`TlsEnd`, memory BIOs over
   the non-blocking TCP socket).

Upstream sessions: when an intercepted connection ends, its upstream TLS
session (a ticket the server sent) is kept (`Interception.keep_session`) and
the next connection of the same job to the same server, name, port and ALPN
offer resumes it (`Interception.session`): no certificate to verify again,
no server signature. Sessions never cross jobs.

The interception CA's key is read from a file at start (`Interception.load`)
and never leaves the process; leaf keys live only in memory.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from egressd.errors import EgressdError
from egressd.policy.model import Policy
from egressd.proxy.relay import reset, reset_transport
from egressd.proxy.transport import Reactor
from egressd.x509build import authority_key_id, leaf_certificate

UPSTREAM_TLS_UNVERIFIED = "upstream_tls_unverified"
UPSTREAM_TLS_FAILED = "upstream_tls_failed"
CLIENT_TLS_FAILED = "client_tls_failed"
#: An intercepting rule on a proxy that has no interception CA configured.
INTERCEPTION_UNAVAILABLE = "tls_interception_unavailable"
#: An intercepted request whose Host is not the connection's SNI.
HOST_SNI_MISMATCH = "host_sni_mismatch"

HTTP11 = "http/1.1"
H2 = "h2"
#: What the proxy can read after interception (`egressd.proxy.h2_proxy` for h2).
SUPPORTED_ALPN: tuple[str, ...] = (H2, HTTP11)
HTTP1_ONLY: tuple[str, ...] = (HTTP11,)

LEAF_VALIDITY = dt.timedelta(hours=24)
LEAF_BACKDATE = dt.timedelta(minutes=5)
#: A cached leaf this close to its end is minted anew.
LEAF_RENEW_BEFORE = dt.timedelta(hours=1)
DEFAULT_LEAF_CACHE = 1024
#: Upstream TLS sessions kept for resumption (`Interception.session`).
DEFAULT_SESSION_CACHE = 1024
_BUFFER = 64 * 1024
#: `TlsTransport._deliver`'s "read until SSLWantReadError" ended without the
#: read: the memory BIO and the SSL object hold nothing more.
_DRAINED = ssl.SSLWantReadError()
#: After the relay ended: how long the last plaintext may take to be encrypted out.
FLUSH_TIMEOUT_S = 5.0


#: Whose upstream session may be resumed by whom: (job, SNI, address, port, ALPN
#: offer). Per job, so that no server can link two jobs by their tickets.
SessionKey = tuple[object, str, object, int, tuple[str, ...]]


class InterceptionError(EgressdError):
    """The interception CA cannot be used (`reason`: ``interception_ca_invalid``)."""


# --- pure choices ---------------------------------------------------------------------


def alpn_offer(client: Sequence[str], supported: Sequence[str] = SUPPORTED_ALPN) -> tuple[str, ...]:
    """What the proxy offers upstream: the client's offer, in its order, limited to
    what the proxy reads. A client that offered nothing gets nothing offered
    (HTTP/1.1 by default on both sides)."""
    return tuple(dict.fromkeys(p for p in client if p in supported))


def supported_alpn(policy: Policy) -> tuple[str, ...]:
    """What may be negotiated for a job: ``h2`` only when no rule of its policy
    holds credentials (injection and the exfiltration checks read HTTP/1.1
    heads and bodies, `egressd.proxy.credentials`)."""
    if any(rule.http is not None and rule.http.credentials for rule in policy.egress):
        return HTTP1_ONLY
    return SUPPORTED_ALPN


def client_alpn(selected: str | None) -> tuple[str, ...]:
    """What the proxy's server side accepts from the client: exactly the protocol
    the server chose (both sides then speak the same one), or none."""
    return () if selected is None else (selected,)


# --- leaves -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Leaf:
    cert_pem: bytes
    key_pem: bytes
    not_after: dt.datetime


class InterceptionCa:
    """The CA certificate and key that sign leaves."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert = cert
        self.key = key
        self._aki = authority_key_id(cert)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> InterceptionCa:
        """Read and check the pair; InterceptionError names what is wrong."""
        try:
            cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
        except (OSError, ValueError) as exc:
            raise InterceptionError(
                "interception_ca_invalid", f"interception_ca.cert {cert_path}: {exc}"
            ) from exc
        try:
            key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise InterceptionError(
                "interception_ca_invalid", f"interception_ca.key {key_path}: {exc}"
            ) from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise InterceptionError("interception_ca_invalid", "interception_ca.key: not ECDSA")
        fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if cert.public_key().public_bytes(*fmt) != key.public_key().public_bytes(*fmt):
            raise InterceptionError(
                "interception_ca_invalid", "interception_ca: the key is not the certificate's"
            )
        try:
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
            cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        except x509.ExtensionNotFound as exc:
            raise InterceptionError(
                "interception_ca_invalid", f"interception_ca.cert: {exc}"
            ) from exc
        if not constraints.ca:
            raise InterceptionError("interception_ca_invalid", "interception_ca.cert: not a CA")
        return cls(cert, key)

    def mint(self, host: str, now: dt.datetime) -> Leaf:
        """A leaf for `host` (a normalised DNS name): its own P-256 key, valid
        `LEAF_VALIDITY` (never past the CA's end), serverAuth only."""
        key = ec.generate_private_key(ec.SECP256R1())
        not_after = min(now + LEAF_VALIDITY, self.cert.not_valid_after_utc)
        cert = leaf_certificate(
            key.public_key(),
            (host,),
            self.cert,
            self.key,
            now - LEAF_BACKDATE,
            not_after,
            self._aki,
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return Leaf(cert.public_bytes(serialization.Encoding.PEM), key_pem, not_after)


def server_context(leaf: Leaf, alpn: Sequence[str]) -> ssl.SSLContext:
    """A server-side context presenting `leaf`, accepting `alpn` (none: no ALPN)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    # ssl loads certificates from files only: an anonymous memory file keeps
    # the leaf's key off every file system.
    fd = os.memfd_create("egressd-leaf", os.MFD_CLOEXEC)
    try:
        data = leaf.key_pem + leaf.cert_pem
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    return ctx


class LeafCache:
    """Server contexts by (host, ALPN), minted on first use: an LRU of `size`
    entries, an entry minted anew when its leaf is within `LEAF_RENEW_BEFORE`
    of its end. `minted` / `hits` count for metrics and tests."""

    def __init__(
        self,
        ca: InterceptionCa,
        *,
        size: int = DEFAULT_LEAF_CACHE,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        if size < 1:
            raise ValueError("size must be at least 1")
        self.ca = ca
        self.size = size
        self._clock = clock
        self._entries: collections.OrderedDict[
            tuple[str, tuple[str, ...]], tuple[dt.datetime, ssl.SSLContext]
        ] = collections.OrderedDict()
        self.minted = 0
        self.hits = 0

    def __len__(self) -> int:
        return len(self._entries)

    def context(self, host: str, alpn: Sequence[str] = ()) -> ssl.SSLContext:
        key = (host, tuple(alpn))
        now = self._clock()
        hit = self._entries.get(key)
        if hit is not None and now + LEAF_RENEW_BEFORE < hit[0]:
            self._entries.move_to_end(key)
            self.hits += 1
            return hit[1]
        leaf = self.ca.mint(host, now)
        ctx = server_context(leaf, alpn)
        self.minted += 1
        self._entries[key] = (leaf.not_after, ctx)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return ctx


class Interception:
    """A proxy's interception setup: the leaf cache and the upstream trust store."""

    def __init__(
        self,
        leaves: LeafCache,
        *,
        upstream_ca_file: Path | None = None,
        sessions: int = DEFAULT_SESSION_CACHE,
    ) -> None:
        self.leaves = leaves
        self.upstream_ca_file = upstream_ca_file
        self._upstream: dict[tuple[str, ...], ssl.SSLContext] = {}
        self._sessions: collections.OrderedDict[SessionKey, ssl.SSLSession] = (
            collections.OrderedDict()
        )
        self._session_limit = sessions
        self.resumed = 0  # upstream handshakes that resumed a session (metrics, tests)

    @classmethod
    def load(
        cls,
        cert: Path,
        key: Path,
        *,
        upstream_ca_file: Path | None = None,
        cache_size: int = DEFAULT_LEAF_CACHE,
        sessions: int = DEFAULT_SESSION_CACHE,
    ) -> Interception:
        interception = cls(
            LeafCache(InterceptionCa.load(cert, key), size=cache_size),
            upstream_ca_file=upstream_ca_file,
            sessions=sessions,
        )
        interception.upstream_context(())  # the trust store must load now, not per connection
        return interception

    def session(self, key: SessionKey) -> ssl.SSLSession | None:
        """The upstream TLS session to resume for `key`, if one was kept."""
        session = self._sessions.get(key)
        if session is not None:
            self._sessions.move_to_end(key)
        return session

    def keep_session(self, key: SessionKey, end: TlsEnd) -> None:
        """Keep `end`'s session (a ticket the server sent) for the next connection
        of the same job to the same server, name and port with the same offer."""
        session = end.obj.session
        if session is None or not session.has_ticket or self._session_limit < 1:
            return
        if end.obj.session_reused:
            self.resumed += 1
        self._sessions[key] = session
        self._sessions.move_to_end(key)
        while len(self._sessions) > self._session_limit:
            self._sessions.popitem(last=False)

    def upstream_context(self, alpn: Sequence[str]) -> ssl.SSLContext:
        """The client-side context for upstream (one per ALPN offer; few exist)."""
        key = tuple(alpn)
        ctx = self._upstream.get(key)
        if ctx is None:
            try:
                ctx = ssl.create_default_context(
                    cafile=None if self.upstream_ca_file is None else str(self.upstream_ca_file)
                )
            except (OSError, ssl.SSLError) as exc:
                raise InterceptionError(
                    "interception_ca_invalid", f"upstream_ca_file {self.upstream_ca_file}: {exc}"
                ) from exc
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if key:
                ctx.set_alpn_protocols(list(key))
            self._upstream[key] = ctx
        return ctx


# --- one TLS connection over a non-blocking socket --------------------------------------


class TlsEnd:
    """A TLS connection driven through memory BIOs over a non-blocking TCP socket.

    Reads and writes may run in two tasks at once (one per direction): every
    send of TLS bytes goes through one lock, so records leave in order.
    """

    def __init__(
        self,
        sock: socket.socket,
        obj: ssl.SSLObject,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
    ) -> None:
        self.sock = sock
        self.obj = obj
        self._in = incoming
        self._out = outgoing
        self._send_lock = asyncio.Lock()
        self._loop = asyncio.get_running_loop()

    @classmethod
    async def connect(
        cls,
        sock: socket.socket,
        ctx: ssl.SSLContext,
        server_hostname: str,
        session: ssl.SSLSession | None = None,
    ) -> TlsEnd:
        """Client side; `session`: one of `ctx`'s to resume (`Interception.session`)."""
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ctx.wrap_bio(
            incoming,
            outgoing,
            server_side=False,
            server_hostname=server_hostname,
            session=session,
        )
        end = cls(sock, obj, incoming, outgoing)
        await end._handshake()
        return end

    @classmethod
    async def accept(cls, sock: socket.socket, ctx: ssl.SSLContext, first: bytes) -> TlsEnd:
        """Server side; `first`: what the client already sent (its ClientHello)."""
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ctx.wrap_bio(incoming, outgoing, server_side=True)
        if first:
            incoming.write(first)
        end = cls(sock, obj, incoming, outgoing)
        await end._handshake()
        return end

    @property
    def selected_alpn(self) -> str | None:
        return self.obj.selected_alpn_protocol()

    async def _handshake(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                await self._receive()
        await self._flush()  # the last flight (and TLS 1.3 session tickets)

    async def _receive(self) -> None:
        data = await self._loop.sock_recv(self.sock, _BUFFER)
        if data:
            self._in.write(data)
        else:
            self._in.write_eof()

    async def _flush(self) -> None:
        async with self._send_lock:
            data = self._out.read()
            if data:
                await self._loop.sock_sendall(self.sock, data)

    async def read(self) -> bytes:
        """Decrypted bytes; b"" at the peer's close_notify or FIN."""
        while True:
            try:
                data = self.obj.read(_BUFFER)
            except ssl.SSLWantReadError:
                if self._out.pending:  # what reading produced (a KeyUpdate answer); rarely any
                    await self._flush()
                if self._in.eof:
                    return b""
                await self._receive()
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""
            if self._out.pending:
                await self._flush()
            return data

    async def write(self, data: bytes) -> None:
        self.obj.write(data)
        await self._flush()

    async def close_write(self) -> None:
        """Send close_notify, then a FIN (the other direction stays open)."""
        with contextlib.suppress(ssl.SSLError):
            self.obj.unwrap()
        await self._flush()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)


# --- a TLS connection as an asyncio transport, for the relay -----------------------------


class TlsTransport(asyncio.Transport):
    """The plaintext side of a handshaken `TlsEnd`, as the transport the relay's
    protocols (`egressd.proxy.relay`) read and write: records are decrypted
    straight into the protocol's buffer and encrypted straight into the TCP
    transport (`_TlsWire`), in the loop's callbacks: no socket pair, no task.

    Reading: paused, the TCP side is paused too and what was already decrypted
    stays in the `ssl.SSLObject`, delivered on resume. The peer's
    ``close_notify`` or FIN is the protocol's ``eof_received``; a broken record
    resets the TCP connection and the protocol's ``connection_lost`` gets the
    error. Writing: ``write_eof`` sends ``close_notify`` and a FIN (reading
    goes on), ``close`` the same once the buffered data is out, ``abort``
    drops the connection (the relay sets SO_LINGER 0 first for a reset).
    Flow control is the TCP transport's, passed on to the protocol.
    """

    def __init__(self, end: TlsEnd, protocol: asyncio.BaseProtocol) -> None:
        super().__init__()
        self._end = end
        self._obj = end.obj
        self._out = end._out
        self._protocol = protocol
        self._buffered = isinstance(protocol, asyncio.BufferedProtocol)
        self._raw: asyncio.Transport | None = None
        self._paused = False
        self._eof = False  # the peer's end was passed to the protocol
        self._eof_sent = False
        self._closing = False
        self._error: Exception | None = None
        self._scheduled = False

    # asyncio.Transport

    def get_extra_info(self, name: str, default: object = None) -> object:
        if name == "ssl_object":
            return self._obj
        return default if self._raw is None else self._raw.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self._closing or self._raw is None or self._raw.is_closing()

    def is_reading(self) -> bool:
        return not self._paused

    def pause_reading(self) -> None:
        if self._paused:
            return
        self._paused = True
        if self._raw is not None and not self._raw.is_closing():
            self._raw.pause_reading()

    def resume_reading(self) -> None:
        if not self._paused:
            return
        self._paused = False
        if self._raw is not None and not self._raw.is_closing():
            self._raw.resume_reading()
        # Records already received (with the handshake's last flight, or
        # while paused) arrive no more from the socket: deliver them now.
        self._schedule()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._raw is not None:
            self._raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return 0 if self._raw is None else self._raw.get_write_buffer_size()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof_sent or self._raw is None or self._raw.is_closing():
            return
        view = memoryview(data)
        try:
            while view:
                view = view[self._obj.write(view) :]
        except ssl.SSLError as exc:
            self._fail(exc)
            return
        self._flush()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._eof_sent or self._raw is None or self._raw.is_closing():
            return
        self._eof_sent = True
        with contextlib.suppress(ssl.SSLError):
            self._obj.unwrap()  # queues close_notify (the peer's may come later)
        self._flush()
        self._raw.write_eof()

    def close(self) -> None:
        if self._closing:
            return
        if not self._eof_sent and self._raw is not None and not self._raw.is_closing():
            self._eof_sent = True
            with contextlib.suppress(ssl.SSLError):
                self._obj.unwrap()
            self._flush()
        self._closing = True
        if self._raw is not None:
            self._raw.close()

    def abort(self) -> None:
        self._closing = True
        if self._raw is not None:
            self._raw.abort()

    # from the TCP side (`_TlsWire`)

    def _flush(self) -> None:
        data = self._out.read()
        if data and self._raw is not None:
            self._raw.write(data)

    def _fail(self, exc: Exception) -> None:
        if self._error is None:
            self._error = exc
        self._closing = True
        reset_transport(self._raw)

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._deliver_soon)

    def _deliver_soon(self) -> None:
        self._scheduled = False
        self._deliver()

    def _deliver(self) -> None:
        """Decrypt what was received into the protocol while it reads: as many
        records as fill its buffer per call (a record holds at most 16 KiB; one
        call per record would cost one relay write, one send, per 16 KiB)."""
        obj, protocol, incoming = self._obj, self._protocol, self._end._in
        while not self._paused and not self._eof and not self._closing:
            stop: ssl.SSLError | None = None
            if self._buffered:
                view = memoryview(protocol.get_buffer(-1))  # type: ignore[attr-defined]
                filled = 0
                try:
                    while filled < len(view):
                        # With a buffer, read returns a count (typeshed: bytes).
                        n = cast(int, obj.read(len(view) - filled, view[filled:]))
                        if not n:
                            raise ssl.SSLZeroReturnError
                        filled += n
                        if not incoming.pending and not obj.pending():
                            # Nothing left to decrypt: the next read could only
                            # raise SSLWantReadError (or, after the TCP FIN, EOF:
                            # the same handling below), ~2 us to build and catch.
                            stop = _DRAINED
                            break
                except ssl.SSLError as exc:
                    stop = exc
                if filled:
                    protocol.buffer_updated(filled)  # type: ignore[attr-defined]
            else:
                try:
                    data = obj.read(_BUFFER)
                    if not data:
                        raise ssl.SSLZeroReturnError
                except ssl.SSLError as exc:
                    stop = exc
                else:
                    protocol.data_received(data)  # type: ignore[attr-defined]
            if stop is None:
                continue
            if isinstance(stop, ssl.SSLWantReadError):
                if self._out.pending:  # what reading produced (a KeyUpdate answer)
                    self._flush()
                if self._end._in.eof and not self._paused:
                    self._eof_received()
            elif isinstance(stop, ssl.SSLZeroReturnError | ssl.SSLEOFError):
                if not self._paused:  # else on resume: the end is read again
                    self._eof_received()
            else:
                self._fail(stop)
            return

    def _eof_received(self) -> None:
        if self._eof:
            return
        self._eof = True
        if self._out.pending:
            self._flush()
        keep = self._protocol.eof_received()  # type: ignore[attr-defined]
        if not keep:
            self.close()

    def _lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._protocol.connection_lost(self._error if self._error is not None else exc)


class _TlsWire(asyncio.BufferedProtocol):
    """The TCP side of a `TlsTransport`: TLS records in, into the memory BIO."""

    def __init__(self, tls: TlsTransport, scratch: bytearray) -> None:
        self._tls = tls
        self._in = tls._end._in
        self._buffer = scratch
        self._view = memoryview(scratch)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tls = self._tls
        tls._raw = cast(asyncio.Transport, transport)
        tls._raw.pause_reading()  # until the protocol reads
        tls._paused = True
        tls._protocol.connection_made(tls)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        self._in.write(self._view[:nbytes])  # copied into the BIO: the scratch is shared
        self._tls._deliver()

    def eof_received(self) -> bool:
        self._in.write_eof()
        self._tls._deliver()
        return True  # the other direction may go on

    def pause_writing(self) -> None:
        self._tls._protocol.pause_writing()

    def resume_writing(self) -> None:
        self._tls._protocol.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._tls._lost(exc)


class TlsLink:
    """A handshaken `TlsEnd` that the relay attaches its protocol to
    (`egressd.proxy.relay.Endpoint`): `attach` makes the `TlsTransport`;
    `reset` resets the TCP connection when the relay never got that far."""

    def __init__(self, end: TlsEnd, scratch: bytearray | None = None) -> None:
        self.end = end
        self._scratch = scratch if scratch is not None else bytearray(_BUFFER)
        self.transport: TlsTransport | None = None

    async def attach(
        self, factory: Callable[[], asyncio.BaseProtocol], reactor: Reactor
    ) -> asyncio.BaseProtocol:
        protocol = factory()
        tls = self.transport = TlsTransport(self.end, protocol)
        reactor.attach(self.end.sock, _TlsWire(tls, self._scratch))
        return protocol

    def reset(self) -> None:
        reset(self.end.sock)


# --- the bridge between two TLS connections and the relay -------------------------------


async def _tls_to_plain(end: TlsEnd, plain: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    try:
        while data := await end.read():
            await loop.sock_sendall(plain, data)
        plain.shutdown(socket.SHUT_WR)
    except (OSError, ssl.SSLError):
        # A reset or a broken record: the relay sees this side end at once
        # (a shutdown, not a close: the writer task still waits on `plain`).
        with contextlib.suppress(OSError):
            plain.shutdown(socket.SHUT_RDWR)
        raise


async def _plain_to_tls(plain: socket.socket, end: TlsEnd) -> None:
    loop = asyncio.get_running_loop()
    while data := await loop.sock_recv(plain, _BUFFER):
        await end.write(data)
    await end.close_write()


async def bridge(
    client: TlsEnd,
    upstream: TlsEnd,
    run_relay: Callable[[socket.socket, socket.socket], Awaitable[object]],
) -> None:
    """Relay between two TLS connections: `run_relay(client_plain, upstream_plain)`
    gets one end of a socket pair per side (it owns them and closes them when
    it returns); the other ends are pumped to and from the TLS connections.
    Both TCP sockets are closed on return (reset after an error or a cancel)."""
    c_relay, c_pump = socket.socketpair()
    u_relay, u_pump = socket.socketpair()
    for sock in (c_relay, c_pump, u_relay, u_pump):
        sock.setblocking(False)
    loop = asyncio.get_running_loop()
    readers = [
        loop.create_task(_tls_to_plain(client, c_pump)),
        loop.create_task(_tls_to_plain(upstream, u_pump)),
    ]
    writers = [
        loop.create_task(_plain_to_tls(c_pump, client)),
        loop.create_task(_plain_to_tls(u_pump, upstream)),
    ]
    clean = False
    try:
        await run_relay(c_relay, u_relay)
        # The relay closed its ends: the writers see EOF once they have
        # encrypted the last bytes (a 403, the end of a response).
        done, _ = await asyncio.wait(writers, timeout=FLUSH_TIMEOUT_S)
        clean = len(done) == len(writers) and all(
            not t.cancelled() and t.exception() is None for t in done
        )
    finally:
        tasks = readers + writers
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sock in (c_pump, u_pump):
            sock.close()
        for end in (client, upstream):
            if clean:
                end.sock.close()
            else:
                reset(end.sock)
