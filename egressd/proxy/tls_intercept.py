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
   (`egressd.proxy.http_gate`): `bridge` hands the relay one end of a local
   socket pair per side and moves bytes between each pair's other end and
   its TLS connection (`TlsEnd`, memory BIOs over the non-blocking TCP
   socket). Pacing, timeouts, half-close, the ``403`` and the audit events
   are the relay's and the gate's, unchanged. A FIN from either side becomes
   a ``close_notify`` and a FIN on the other; an error resets both. When
   both sides settled on ``h2``, `egressd.proxy.h2_proxy` takes the gate's
   place behind the relay: the same decisions, per stream.

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

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from egressd.errors import EgressdError
from egressd.policy.model import Policy
from egressd.proxy.relay import reset
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
_BUFFER = 64 * 1024
#: After the relay ended: how long the last plaintext may take to be encrypted out.
FLUSH_TIMEOUT_S = 5.0


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

    def __init__(self, leaves: LeafCache, *, upstream_ca_file: Path | None = None) -> None:
        self.leaves = leaves
        self.upstream_ca_file = upstream_ca_file
        self._upstream: dict[tuple[str, ...], ssl.SSLContext] = {}

    @classmethod
    def load(
        cls,
        cert: Path,
        key: Path,
        *,
        upstream_ca_file: Path | None = None,
        cache_size: int = DEFAULT_LEAF_CACHE,
    ) -> Interception:
        interception = cls(
            LeafCache(InterceptionCa.load(cert, key), size=cache_size),
            upstream_ca_file=upstream_ca_file,
        )
        interception.upstream_context(())  # the trust store must load now, not per connection
        return interception

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
        cls, sock: socket.socket, ctx: ssl.SSLContext, server_hostname: str
    ) -> TlsEnd:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ctx.wrap_bio(incoming, outgoing, server_side=False, server_hostname=server_hostname)
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
