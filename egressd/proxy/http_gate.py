"""Every request of a plain-HTTP connection decided before its bytes go upstream.

A sans-IO state machine that the relay (`egressd.proxy.relay`) feeds with
what it reads; it says which client bytes may go upstream, and when a denied
request's ``403`` may be written. It never touches a socket.

How, and why:

* Requests are parsed with h11 (server role). Each request head is also
  read by `sniff.HttpHeadReader` (what tier 2 reads the first one with), which
  refuses what h11 tolerates and a server might read differently (obs-fold,
  bare LF line ends, whitespace before a colon, two Host headers, a Host that
  disagrees with the target); a request with both ``Content-Length`` and
  ``Transfer-Encoding`` is refused too (RFC 9112 6.3: a classic smuggling
  vector), and h11 itself refuses conflicting lengths and any coding but
  ``chunked``. All of those deny as ``http_malformed``.
* Allowed bytes are forwarded exactly as received (no re-serialisation: the
  server sees the client's own bytes, and the proxy copies, not rebuilds).
  What is forwarded is exactly what h11 consumed for that request's events,
  so nothing of the next request passes before it is decided. The one
  exception: with `credentials` (`egressd.proxy.credentials`), a request head
  loses the client's lines of each header its rule's credentials set and
  gets the proxy's lines instead (`credentials.rewrite_head`: every other
  byte, the framing headers included, as received); a request carrying a
  credential where it does not belong, in its head or its body (scanned as
  it streams), is denied ``credential_exfiltration``: a body's chunk that
  completes a marker is not forwarded, the server is reset and the client
  gets the ``403`` (or, when the response has already begun, only the end).
* Responses are forwarded as they come, and watched (h11, client role) only
  for their boundaries and status. A pipelined request is held (parsed but
  not decided or sent) until the response to the one before it is complete:
  the proxy always knows which response a byte belongs to, a ``403`` can
  never land inside a response, and the status goes into each request's
  audit event. Pipelining thereby turns into ordered request/response turns;
  clients rarely pipeline and the turns cost one RTT to the server each.
  While requests are held, the client is not read beyond `MAX_HELD` bytes.
  h11 reads each response head; a body framed by ``Content-Length`` alone is
  then only counted (`_counted`: h11 validated the header; its bytes never
  go through h11, one event less per chunk), every other framing (chunked,
  until close, none, a tunnel) is h11's. Each response gets a fresh watcher
  told only the request's method (`_primer`), and each request a fresh
  request parser given what the old one held (`_next_request`): cheaper
  than mirroring the response into the old one, which is done only when the
  request is not over (the server answered early) or the client closes.
* Repeats (keep-alive clients send the same head again and again): a request
  head byte for byte the same as the last bodiless one a fresh parser read
  (`_repeat`), and a response head the same as the last one a fresh watcher
  read from its first byte with a counted body (`_repeated_response`, not for
  ``HEAD``, ``CONNECT`` or an upgrade), are not parsed again: h11 and `sniff`
  are pure functions of those bytes from that state, so they would read them
  the same way. Every request is still decided (and gets its credentials);
  only the parsing is saved. Any other byte sequence goes to h11 as before.
  A read that is exactly one such head (the usual request) is not even held
  first (`_head_read`), and a client FIN between requests with nothing due
  stops the gate without a parser made to read it (`_idle`).
* A denied request's bytes are dropped; once every earlier response is
  complete the gate produces a ``403`` with ``Connection: close`` and a short
  JSON body ``{"error": reason, ...}``, after which the relay closes both
  sides. A response the watcher cannot parse ends the gate: nothing more of
  the client's goes upstream (fail closed), the relay carries on downstream.
* ``101 Switching Protocols`` after a (checked) ``Upgrade`` request, or a
  2xx to an allowed ``CONNECT``, make the connection a tunnel: from then on
  both directions are relayed blind (`tunnel`). ``Upgrade: h2c`` is refused.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import h11

from egressd.policy.matcher import Decision, Verdict
from egressd.policy.paths import path_text
from egressd.proxy import credentials as creds
from egressd.proxy import http_rules, sniff
from egressd.proxy.tier2 import Tier2Outcome

#: Client bytes held (parsed, not yet sent) before the client stops being read.
MAX_HELD = sniff.MAX_HTTP_HEAD
DENY_STATUS = 403

#: `decide(method, request, upgrade)` (`http_rules.RequestTarget`, the
#: ``Upgrade`` header): a `Decision` (or a `tier2.Tier2Outcome`), or an
#: awaitable of one when a name must be resolved first.
Decide = Callable[[str, http_rules.RequestTarget, str | None], Any]


@dataclass(slots=True)
class RequestRecord:
    """One request and what the audit event says of it."""

    method: str
    path: str
    host: str | None
    decision: Decision
    status: int | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    upgrade: bool = False
    would_deny: bool = False  # report mode: allowed, would have been denied
    injected: tuple[str, ...] = ()  # the credential headers the proxy set (names only)
    credential: dict[str, str] | None = None  # the secret a credential_* denial is about


def deny_response(reason: str, *, host: str | None = None) -> bytes:
    """The ``403`` a denied request gets (the connection is closed after it)."""
    body = {"error": reason, "by": "egressd"}
    if host is not None:
        body["host"] = host
    payload = json.dumps(body, separators=(",", ":")).encode() + b"\n"
    head = (
        f"HTTP/1.1 {DENY_STATUS} Forbidden\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    return head + payload


class HttpGate:
    """The request/response state of one plain-HTTP connection.

    The relay calls `from_client` / `from_upstream` / `upstream_eof` with
    what it read, then takes `up` (client bytes that may go upstream, in
    order) and `final` (a ``403`` to write after everything already sent
    downstream, then close). `hold` says the client must not be read for
    now; `tunnel` that the gate is done and both directions are blind.
    `on_request` is called once per request, when its outcome is known.
    `wake` is called when a decision finished asynchronously.
    `credentials`: the job's credentials, set on and searched in every
    request that goes upstream (None: the policy has none).
    `shared`: heads read whole by other gates (`SharedHeads`), taken without
    the parsers as this gate's own repeats are.
    """

    # A gate per connection: slots make its making and its every read cheaper.
    __slots__ = (
        "_body_close",
        "_body_left",
        "_candidate",
        "_client",
        "_client_closed",
        "_closing",
        "_credentials",
        "_current",
        "_decide",
        "_deny",
        "_fed",
        "_fresh",
        "_held",
        "_last",
        "_last_response",
        "_max_held",
        "_on_request",
        "_outstanding",
        "_over",
        "_primed",
        "_pristine",
        "_scanner",
        "_server",
        "_shared",
        "_stopped",
        "_stream",
        "_task",
        "_upstream_closed",
        "_waiting",
        "failed",
        "final",
        "tunnel",
        "up",
        "wake",
    )

    def __init__(
        self,
        decide: Decide,
        on_request: Callable[[RequestRecord], None],
        *,
        max_held: int = MAX_HELD,
        credentials: creds.RequestCredentials | None = None,
        shared: SharedHeads | None = None,
    ) -> None:
        self._decide = decide
        self._shared = shared
        self._on_request = on_request
        self._max_held = max_held
        self._credentials = credentials
        self._scanner: creds.BodyScanner | None = None  # the current request's body
        self._server: h11.Connection | None = None  # made when first needed (`_parser`)
        # The request parser has been given nothing yet (`_feed`): a request head
        # byte for byte the same as the last one it read whole (`_repeat`) needs
        # no parser at all; `_over`: such a request went up, its response is due.
        self._pristine = True
        self._fresh = False  # the parser reads from its first byte (a `_Head` may be kept)
        self._over = False
        self._last: _Head | None = None  # the last bodiless request head h11 read fresh
        self._candidate: _Head | None = None
        # A closing head taken without the parser (`SharedHeads`): given to a parser
        # when one is needed after all (`_materialize`).
        self._closing: bytes | None = None
        # A fresh one per response (`_prime`), made when one is needed (`_ready`).
        self._client: h11.Connection | None = None
        self._primed: RequestRecord | None = None  # primed lazily (`_ready`) for this request
        self._fed = 0  # reads given to the response watcher since it was primed
        self._last_response: _ResponseHead | None = None
        self._upstream_closed = False
        self._client_closed = False
        # A response whose body is counted, not parsed (`_framed`): the bytes
        # still due and whether the server closes after it; None: h11 reads.
        self._body_left: int | None = None
        self._body_close = False
        self._held = 0  # bytes fed to the server parser and not consumed yet
        self._stream = bytearray()  # those bytes (h11 does not hand consumed bytes back)
        self._current: RequestRecord | None = None  # being received from the client
        self._outstanding: deque[RequestRecord] = deque()  # sent, response not complete
        self._waiting = False  # an asynchronous decision is pending
        self._stopped = False  # nothing more of the client's goes upstream
        self.up: list[bytes] = []
        self.final: bytes | None = None
        self._deny: tuple[RequestRecord, bytes] | None = None
        self.tunnel = False
        self.failed = False  # the response watcher lost track: close when upstream is done
        self.wake: Callable[[], None] | None = None

    @property
    def hold(self) -> bool:
        return self._stopped or self._waiting or self._held >= self._max_held

    @property
    def ended(self) -> bool:
        """No more request will be sent upstream (a deny, a close, a lost track)."""
        return self._stopped and not self._waiting

    def holds_data(self) -> bool:
        """Client bytes are still to be decided or released."""
        return self._waiting or (self._held > 0 and not self._stopped)

    # input

    def from_client(self, data: bytes) -> None:
        if self.tunnel:
            self.up.append(data)
            return
        if self._stopped:
            return
        if self._pristine:
            if not (self._stream or self._over or self._waiting) and self._head_read(data):
                return
        else:
            self._parser.receive_data(data)
        self._stream += data
        self._held += len(data)
        self._advance()

    def client_eof(self) -> None:
        self._client_closed = True
        if self.tunnel or self._stopped:
            return
        if self._idle():
            self._stopped = True  # what a fresh parser reads the FIN as (ConnectionClosed)
            return
        if not self._pristine:
            self._parser.receive_data(b"")
        self._advance()

    def _idle(self) -> bool:
        """Between requests with nothing due (keep-alive's usual end): no parser
        yet, nothing held, no response awaited. A fresh parser would read the
        FIN as ``ConnectionClosed`` and nothing after the end would read it
        again (no request is left to parse, no response to mirror), so none is made."""
        return (
            self._pristine
            and self._server is None
            and not (self._stream or self._over or self._outstanding or self._waiting)
        )

    @property
    def counting_body(self) -> bool:
        """A response body of known length is passing: `from_upstream` only counts
        it (and may be given a view of a buffer that is reused)."""
        return self._body_left is not None and not self.tunnel and not self.failed

    def from_upstream(self, data: bytes) -> None:
        if self.tunnel or self.failed:
            return
        if not self._outstanding and data:
            # A response to no request (or past the last one): which request
            # a later response answers could no longer be known.
            self._lost_track()
            return
        if self._body_left is not None:
            self._outstanding[0].bytes_down += len(data)
            self._count_body(len(data))
        elif self._primed is not None and self._repeated_response(data):
            pass
        else:
            self._ready()
            self._fed += 1
            self._watching.receive_data(data)
            self._watch(len(data), data)
        if self._held or self._client_closed:
            self._advance()  # a request held until this response was complete

    def upstream_eof(self) -> None:
        if self.tunnel or self.failed:
            return
        self._upstream_closed = True
        if self._body_left is not None:
            self._lost_track()  # the server closed before the end of a counted body
            return
        if self._client is None and self._primed is None and not self._outstanding:
            # Nothing is due (every response so far was a shared head): a fresh
            # watcher would read the FIN as the end and find nothing past it.
            self._advance_deny()
            self._advance()
            return
        self._ready()
        self._watching.receive_data(b"")
        self._watch(0)
        self._advance()

    def take_up(self) -> list[bytes]:
        up, self.up = self.up, []
        return up

    def pending_records(self) -> list[RequestRecord]:
        """Requests whose outcome was never logged (the connection ended first)."""
        records = list(self._outstanding)
        if self._current is not None and self._current not in records:
            records.append(self._current)
        if self._deny is not None:
            records.append(self._deny[0])  # its 403 never went out
            self._deny = None
        return records

    # the request side

    def _consumed(self) -> bytes:
        """The bytes the server parser consumed since the last call, as received."""
        left = len(self._parser.trailing_data[0])
        taken = self._held - left
        self._held = left
        chunk = bytes(self._stream[:taken])
        del self._stream[:taken]
        return chunk

    def use_credentials(self, credentials: creds.RequestCredentials | None) -> None:
        """Set the credentials of the requests that come after this (a replaced policy's)."""
        self._credentials = credentials

    def _feed(self) -> None:
        """Give the parser what it has not been given (the held bytes, the FIN)."""
        self._pristine = False
        self._fresh = True
        if self._stream:
            self._parser.receive_data(bytes(self._stream))
        if self._client_closed:
            self._parser.receive_data(b"")

    def _repeat(self) -> bool:
        """Take the next request without the parser when its head is the same
        bytes as the last bodiless one a fresh parser read (`_Head`): h11 and
        `sniff` would read them the same way again (pure functions of those
        bytes, from the same state), so only the decision is made again."""
        last = self._last
        if last is None or not self._stream.startswith(last.head):
            last = None if self._shared is None else self._shared.requests.find(self._stream)
            if last is None:
                return False
            self._adopt(last)
        size = len(last.head)
        del self._stream[:size]
        self._held -= size
        self._over = True
        self._dispatch(last, last.head)
        return True

    def _head_read(self, data: bytes) -> bool:
        """`_repeat` for a read that is exactly one known head (the usual way a
        request arrives): taken as `_repeat` would take it from the held
        stream, without holding it first. `_repeat` reads the stream up to its
        first blank line, and a kept head has none before its end (`_Heads.keep`):
        a read equal to a kept head is a read `_repeat` takes as that head."""
        last = self._last
        if last is None or data != last.head:
            if last is not None and data.startswith(last.head):
                return False  # the head and more: `_repeat` takes the head, holds the rest
            shared = self._shared
            last = None if shared is None else shared.requests.exact(data)
            if last is None:
                return False
            self._adopt(last)
        self._over = True
        self._dispatch(last, last.head)
        if self._client_closed:
            self._advance()  # as `_repeat`'s loop would go on (a closing head, then the FIN)
        return True

    def _adopt(self, found: _Head) -> None:
        """A head found among the shared ones, taken by this gate: a closing one
        waits for a parser (`_materialize`), another is this gate's last head."""
        if found.closing:
            self._closing = found.head
        else:
            self._last = found

    def _materialize(self) -> None:
        """Give a parser the closing head taken without one (`SharedHeads`), and what
        came after it: from here on h11 reads as if it had read that head itself
        (a closing request leaves h11 in ``MUST_CLOSE``: anything more from the
        client is refused, its FIN ends the requests)."""
        head, self._closing = self._closing, None
        assert head is not None
        server = self._parser
        server.receive_data(head)
        event = server.next_event()
        end = server.next_event()
        assert isinstance(event, h11.Request) and isinstance(end, h11.EndOfMessage)
        self._over = False
        self._feed()
        self._fresh = False

    def _may_repeat(self) -> bool:
        """The held bytes are the start of the last head (h11 would wait too)."""
        last = self._last
        return last is not None and last.head.startswith(self._stream)

    def _advance(self) -> None:
        """Parse, decide and release client bytes as far as the state allows."""
        while not (self._stopped or self._waiting or self.tunnel):
            if self._pristine:
                if self._over:
                    if self._closing is None or not (self._held or self._client_closed):
                        return  # the next request waits for this one's response
                    self._materialize()  # h11 refuses more after a closing request
                else:
                    if self._repeat():
                        continue
                    if not self._client_closed and (not self._held or self._may_repeat()):
                        return  # nothing yet, or the start of what may be a repeat
                    self._feed()
            try:
                event = self._parser.next_event()
            except h11.RemoteProtocolError:
                # Mid-body (a bad chunk) it is that request's bytes that were bad.
                current = self._current
                record = (
                    None if current is None else _record(current.method, current.path, current.host)
                )
                self._refuse(record, http_rules.HTTP_MALFORMED)
                continue
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self._request(event, self._consumed())
            elif isinstance(event, h11.Data | h11.EndOfMessage):
                if self._scanner is not None and self._scanned(event):
                    return
                chunk = self._consumed()
                if self._current is not None and chunk:
                    self._current.bytes_up += len(chunk)
                    self.up.append(chunk)
                if isinstance(event, h11.EndOfMessage):
                    self._current = None
                    self._scanner = None
                    server = self._parser
                    candidate, self._candidate = self._candidate, None
                    if candidate is not None and not chunk:
                        # Read whole by a fresh parser: `_repeat`, `SharedHeads`.
                        shared = self._shared
                        if server.their_state is h11.DONE:
                            self._last = candidate
                            if shared is not None:
                                shared.requests.keep(candidate)
                        elif server.their_state is h11.MUST_CLOSE and shared is not None:
                            shared.requests.keep(dataclasses.replace(candidate, closing=True))
                    if server.our_state is h11.DONE and server.their_state is h11.DONE:
                        server.start_next_cycle()  # answered before its end (`_next_request`)
                    elif not self._held and not self._client_closed:
                        return  # nothing more to read: h11 would only say so
            elif isinstance(event, h11.ConnectionClosed):
                self._stopped = True
                return

    def _request(self, event: h11.Request, head: bytes) -> None:
        method = event.method.decode("ascii", "replace")
        target = event.target.decode("ascii", "replace")
        read = sniff.sniff_http_host(head)
        host = read.host
        # One pass over the raw list (h11's own iteration costs a call per header).
        length = chunked = False
        upgrade = None
        for raw, value in event.headers.raw_items():
            name = raw.lower()
            if name == b"content-length":
                length = True
            elif name == b"transfer-encoding":
                chunked = True
            elif name == b"upgrade":
                upgrade = value.decode("ascii", "replace")
        if read.status not in (sniff.OK, sniff.NO_HOST) or (length and chunked):
            self._refuse(_record(method, target, host), http_rules.HTTP_MALFORMED)
            return
        parsed = _Head(head, event, method, http_rules.target_of(read, target), upgrade)
        fresh, self._fresh = self._fresh, False
        if fresh and not (length or chunked or upgrade is not None or read.connect):
            self._candidate = parsed  # kept if h11 ends it with no body (`_advance`)
        self._dispatch(parsed, head)

    def _dispatch(self, parsed: _Head, head: bytes) -> None:
        """Decide a request read whole (`head`: as received); `_over`: its bytes
        end with the head (`_repeat`), nothing more of it will be parsed."""
        method, target, event, upgrade = parsed.method, parsed.target, parsed.event, parsed.upgrade
        record = RequestRecord(method, target.path_text, target.host, _MALFORMED)
        if upgrade is not None:
            record.upgrade = True  # (a keyword to the constructor costs more)
        decided = self._decide(method, target, upgrade)
        # A `Decision` or an outcome has `allowed`; only a pending one is awaited.
        if (
            type(decided) in _OUTCOMES
            or hasattr(decided, "allowed")
            or not inspect.isawaitable(decided)
        ):
            self._decided(record, head, decided, event)
            return
        self._waiting = True

        async def finish() -> None:
            try:
                decision = await decided
            except Exception:  # noqa: BLE001 - a failed lookup denies
                decision = Decision(Verdict.DENY, http_rules.HOST_ADDRESS_MISMATCH, None)
            self._waiting = False
            self._decided(record, head, decision, event)
            self._advance()
            if self.wake is not None:
                self.wake()

        self._task = asyncio.ensure_future(finish())

    def _decided(
        self, record: RequestRecord, head: bytes, decided: Any, event: h11.Request
    ) -> None:
        # A `Decision`, or a `tier2.Tier2Outcome` (report mode: allowed, flagged).
        kind = type(decided)
        if kind is Tier2Outcome:  # the usual one, read without `getattr`s
            record.decision = decided.decision
            if decided.would_deny:
                record.would_deny = True
            allowed = decided.enforced_verdict is Verdict.ALLOW
        elif kind is Decision:
            record.decision = decided
            allowed = decided.verdict is Verdict.ALLOW
        else:
            record.decision = getattr(decided, "decision", decided)
            record.would_deny = bool(getattr(decided, "would_deny", False))
            allowed = decided.allowed
        if not allowed:
            self._refuse(record, record.decision.reason)
            return
        if self._credentials is not None:
            rule = record.decision.rule
            prepared = self._credentials.prepare(rule, head, event.target, event.headers)
            if prepared.reason is not None:
                record.credential = prepared.credential
                if not prepared.report:
                    self._refuse(record, prepared.reason)
                    return
                record.decision = Decision(Verdict.DENY, prepared.reason, rule)
                record.would_deny = True
            head = prepared.head
            record.injected = prepared.injected
            self._scanner = prepared.scanner
        record.bytes_up = len(head)
        self.up.append(head)
        if self._over:
            self._scanner = None  # the request ends with its head: no body to scan
        else:
            self._current = record
        outstanding = self._outstanding
        outstanding.append(record)
        if len(outstanding) == 1:
            # The watcher is primed with it (lazily: `_prime`); one sent behind
            # others is primed when the response before it is complete.
            self._primed = record

    def _scanned(self, event: h11.Data | h11.EndOfMessage) -> bool:
        """Search a piece of the current body (trailers too) for a credential
        that does not belong here; True when that ended the request."""
        scanner, record = self._scanner, self._current
        assert scanner is not None
        if isinstance(event, h11.Data):
            found = scanner.feed(event.data)
        else:
            trailers = b"\r\n".join(n + b": " + v for n, v in event.headers)
            found = scanner.feed(b"\r\n" + trailers) if trailers else None
        if found is None or record is None:
            return False
        self._scanner = None
        reason = creds.CREDENTIAL_EXFILTRATION
        record.credential = creds.exfiltration(found, creds.IN_BODY)
        record.decision = Decision(Verdict.DENY, reason, record.decision.rule)
        if self._credentials is not None and self._credentials.report:
            record.would_deny = True
            return False
        # Part of this request went up already: the server is reset (`final`),
        # the client gets the 403 unless a response to it has begun.
        self._stopped = True
        self._current = None
        others = [r for r in self._outstanding if r is not record]
        self._outstanding = deque(others)
        if record.status is None and not self._outstanding:
            response = deny_response(reason, host=record.host)
            record.status = DENY_STATUS
            record.bytes_down += len(response)
            self.final = response
        else:
            self.final = b""
        self._deny = None
        self._on_request(record)
        return True

    def _refuse(self, record: RequestRecord | None, reason: str) -> None:
        if record is None:
            record = _record("", "", None)
        if record.decision.reason != reason:
            record.decision = Decision(Verdict.DENY, reason, record.decision.rule)
        record.status = DENY_STATUS
        self._stopped = True
        self._current = None
        # Nothing after a denied request is parsed or sent; its 403 goes out
        # once the responses still due are complete.
        self._deny = (record, deny_response(reason, host=record.host))
        self._advance_deny()

    def _advance_deny(self) -> None:
        if self._deny is not None and not self._outstanding:
            record, response = self._deny
            self._deny = None
            self.final = response
            record.bytes_down = len(response)
            self._on_request(record)

    # the response side

    def _prime(self, record: RequestRecord) -> None:
        # Lazily (`_ready`): a response that repeats the last one's head needs no
        # watcher at all (`_repeated_response`).
        self._primed = record

    def _ready(self) -> None:
        """Prime the response watcher if `_prime` asked for it."""
        record = self._primed
        if record is None:
            if self._client is None:
                self._client = self._watcher()
            return
        self._primed = None
        self._fed = 0
        client = self._client
        if client is None or client.our_state is not h11.IDLE:
            # A fresh parser per response: a counted body (`_count_body`) leaves
            # the last one mid-message, and a new one costs less than a cycle.
            client = self._client = self._watcher()
        try:
            client.send(_primer(record.method, record.upgrade))
            if record.upgrade or record.method == http_rules.CONNECT:
                # h11 accepts a switch of protocols only once the request is over;
                # any other response it reads with the request still "sending".
                client.send(_END)
        except h11.LocalProtocolError:
            self.failed = True

    @property
    def _parser(self) -> h11.Connection:
        """The request parser (made on first use: a gate whose requests are all
        shared or repeated heads never needs one)."""
        server = self._server
        if server is None:
            server = self._server = _server()
        return server

    @property
    def _watching(self) -> h11.Connection:
        """The response watcher (made by `_ready`)."""
        client = self._client
        assert client is not None
        return client

    def _watcher(self) -> h11.Connection:
        client = h11.Connection(h11.CLIENT)
        if self._upstream_closed:
            client.receive_data(b"")
        return client

    def _repeated_response(self, data: bytes) -> bool:
        """The response to the primed request begins with the same head, byte
        for byte, as the last counted one a fresh watcher read from its first
        byte (`_ResponseHead`): it would be read the same way again, so the body
        is counted straight away (the request's method and upgrade agree with
        what that one was read for: no ``HEAD``, ``CONNECT`` or upgrade)."""
        last, record = self._last_response, self._primed
        if record is None:
            return False
        if last is None or not data.startswith(last.head):
            last = None if self._shared is None else self._shared.responses.find(data)
            if last is None:
                return False
            self._last_response = last
        if record.upgrade or record.method in _NO_COUNT or record is not self._outstanding[0]:
            return False
        self._primed = None
        record.bytes_down += len(data)
        record.status = last.status
        self._body_left, self._body_close = last.counted
        self._count_body(len(data) - len(last.head))
        return True

    def _watch(self, nbytes: int, data: bytes = b"") -> None:
        if self._outstanding:
            self._outstanding[0].bytes_down += nbytes
        while self._outstanding and not self.failed:
            if self._primed is not None:  # the next request's: one completed in this read
                self._ready()
                self._fed = 2  # this read did not begin with its response: not kept
            try:
                event = self._watching.next_event()
            except h11.RemoteProtocolError:
                self._lost_track()
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                if self._watching.their_state is h11.SWITCHED_PROTOCOL:
                    self._switched()
                return
            record = self._outstanding[0]
            if isinstance(event, h11.InformationalResponse):
                if event.status_code == 101:
                    record.status = 101
                    self._switched()
                    return
                self._fed += 1  # a head before the final one: not kept (`_ResponseHead`)
                self._mirror(event)
            elif isinstance(event, h11.Response):
                record.status = event.status_code
                if self._watching.their_state is h11.SWITCHED_PROTOCOL:
                    self._switched()
                    return
                counted = _counted(record.method, event)
                if counted is not None:
                    # The body is only counted: the bytes h11 holds past the head
                    # are its first part; what comes later never goes through h11.
                    self._body_left, self._body_close = counted
                    rest = len(self._watching.trailing_data[0])
                    if self._fed == 1 and data and not record.upgrade:
                        # Read from the watcher's first byte, in one piece.
                        head = data[: len(data) - rest]
                        self._last_response = _ResponseHead(head, event.status_code, counted)
                        if self._shared is not None:
                            self._shared.responses.keep(self._last_response)
                    self._count_body(rest)
                    return
            elif isinstance(event, h11.EndOfMessage):
                self._complete(self._watching.their_state is not h11.DONE)
            elif isinstance(event, h11.ConnectionClosed):
                self._outstanding.popleft()
                self._on_request(record)
                self._stopped = True
                return
        if not self._outstanding and self._watching.trailing_data[0]:
            self._lost_track()  # bytes past the last response: see `from_upstream`
            return
        self._advance_deny()

    def _count_body(self, nbytes: int) -> None:
        """`nbytes` more of a counted body arrived; past its end: the response is
        complete, and any byte beyond it answers no request."""
        assert self._body_left is not None
        left = self._body_left - nbytes
        if left > 0:
            self._body_left = left
            return
        self._body_left = None
        self._complete(self._body_close)
        if left < 0:
            self._lost_track()  # bytes past the last response: see `from_upstream`
        else:
            self._advance_deny()

    def _mirror(self, event: h11.InformationalResponse) -> None:
        """Move the server parser's own side along as if it had answered."""
        if self._over:
            return  # the request was read without the parser (`_repeat`): nothing to move
        try:
            self._parser.send(
                h11.InformationalResponse(status_code=event.status_code, headers=event.headers)
            )
        except h11.LocalProtocolError:
            self._lost_track()

    def _complete(self, close: bool) -> None:
        """The response to the oldest outstanding request is complete; `close`:
        the server ends the connection after it."""
        record = self._outstanding.popleft()
        self._on_request(record)
        if close:
            self._stopped = True  # the server closes: no more requests
            return
        self._next_request(record.status)
        if self._outstanding:
            self._prime(self._outstanding[0])

    def _next_request(self, status: int | None) -> None:
        """Let the request parser go on to the next request."""
        if self._over:
            if self._closing is None:
                self._over = False  # read without the parser (`_repeat`), which is still new
                return
            self._materialize()  # the server did not close: h11 says what may follow
        server = self._parser
        if server.their_state is h11.DONE:
            # The usual case: a fresh parser costs less than telling the old one
            # about a response it never sent. What the old one holds (a pipelined
            # request, the client's FIN) is the held stream: given on demand (`_feed`).
            self._server = None
            self._pristine = True
            return
        # The request is not over (the server answered early), or the client
        # asked to close: the old parser is told of the response, and goes on
        # only if h11 says it may.
        try:
            server.send(_mirrored(200 if status is None else status, False))
            server.send(_END)
        except h11.LocalProtocolError:
            self._lost_track()
            return
        if server.our_state is h11.DONE and server.their_state is h11.DONE:
            server.start_next_cycle()

    def _switched(self) -> None:
        if self._closing is not None:
            self._materialize()
        record = self._outstanding.popleft()
        self._on_request(record)
        self.tunnel = True
        _, closed = self._parser.trailing_data
        rest = bytes(self._stream)
        self._stream.clear()
        self._held = 0
        if rest and not closed:
            self.up.append(rest)

    def _lost_track(self) -> None:
        self.failed = True
        self._stopped = True
        for record in self._outstanding:
            self._on_request(record)
        self._outstanding.clear()
        self._deny = None


# The watcher's and the mirror's events are the same few for every request:
# built (and validated by h11) once each, not per request. h11 events are frozen.
_END = h11.EndOfMessage()
_PRIMERS: dict[tuple[str, bool], h11.Request] = {}
_MIRRORED: dict[tuple[int, bool], h11.Response] = {}
_CACHE_LIMIT = 256  # distinct methods and statuses seen; a bound against odd ones


def _primer(method: str, upgrade: bool) -> h11.Request:
    """The request the response watcher is told was sent (framing: its method)."""
    event = _PRIMERS.get((method, upgrade))
    if event is None:
        headers = [("Host", "x")]
        if upgrade:
            headers += [("Connection", "upgrade"), ("Upgrade", "x")]
        target = "x:1" if method == http_rules.CONNECT else "/"
        event = h11.Request(method=method, target=target, headers=headers)
        if len(_PRIMERS) < _CACHE_LIMIT:
            _PRIMERS[(method, upgrade)] = event
    return event


_MALFORMED = Decision(Verdict.DENY, http_rules.HTTP_MALFORMED, None)
#: What `decide` returns when it need not wait: never awaited (`_dispatch`).
_OUTCOMES = frozenset({Decision, Tier2Outcome})


@dataclass(frozen=True, slots=True)
class _Head:
    """A request head as h11 and `sniff` read it, whole (`head`, as received)."""

    head: bytes
    event: h11.Request
    method: str
    target: http_rules.RequestTarget
    upgrade: str | None
    closing: bool = False  # h11 read it to MUST_CLOSE (``Connection: close``, HTTP/1.0)


@dataclass(frozen=True, slots=True)
class _ResponseHead:
    """A response head h11 read, framed by ``Content-Length`` alone (`_counted`)."""

    head: bytes
    status: int
    counted: tuple[int, bool]


_H = TypeVar("_H", "_Head", "_ResponseHead")


class _Heads(Generic[_H]):
    """Heads a fresh parser (or watcher) read whole, kept across connections by
    their bytes: h11 and `sniff` are pure functions of those bytes from that
    state, so a head that begins a stream byte for byte is read the same way
    again (`_repeat`, `_repeated_response`): clients and servers send the same
    heads over their connections, a new connection per request included.
    Bounded: emptied when full (a ``Date`` header makes a server's response
    heads change every second)."""

    __slots__ = ("_entries", "_recent")

    LIMIT = 256

    def __init__(self) -> None:
        self._entries: dict[bytes, _H] = {}
        self._recent: _H | None = None  # the last kept: checked first (one server, one client)

    def find(self, stream: bytes | bytearray) -> _H | None:
        """The kept head `stream` begins with, if any."""
        recent = self._recent
        if recent is not None and stream.startswith(recent.head):
            # The same entry as the lookup below: a kept head's first blank line
            # is its end (`keep`), so the stream's is too.
            return recent
        end = stream.find(b"\r\n\r\n")
        if end < 0 or not self._entries:
            return None
        return self._entries.get(bytes(stream[: end + 4]))

    def exact(self, data: bytes) -> _H | None:
        """The kept head that is all of `data`, if any (what `find` returns for
        it: the head ends at its first blank line, `keep`)."""
        return self._entries.get(data)

    def keep(self, head: _H) -> None:
        data = head.head
        if data.find(b"\r\n\r\n") != len(data) - 4:
            # `find` could never return it (it looks a head up by the stream's
            # first blank line): not kept, so that `exact` and `_recent` agree with it.
            return
        if len(self._entries) >= self.LIMIT:
            self._entries.clear()
        self._entries[data] = head
        self._recent = head

    def clear(self) -> None:
        self._entries.clear()
        self._recent = None


class SharedHeads:
    """The request and response heads an interceptor's gates share (`_Heads`)."""

    __slots__ = ("requests", "responses")

    def __init__(self) -> None:
        self.requests: _Heads[_Head] = _Heads()
        self.responses: _Heads[_ResponseHead] = _Heads()


def _server() -> h11.Connection:
    return h11.Connection(h11.SERVER, max_incomplete_event_size=sniff.MAX_HTTP_HEAD)


def _counted(method: str, event: h11.Response) -> tuple[int, bool] | None:
    """The body length of a response framed by ``Content-Length`` alone (h11 has
    validated the header: one value, digits only), and whether the server
    closes after it (``Connection: close``, HTTP/1.0); None for every other
    framing (no body, chunked, until close, a tunnel), which h11 follows itself."""
    status = event.status_code
    if method in _NO_COUNT or status < 200 or status in (204, 304):
        return None
    length = None
    close = event.http_version < b"1.1"
    for raw, value in event.headers.raw_items():
        name = raw.lower()
        if name == b"content-length":
            length = value
        elif name == b"transfer-encoding":
            return None
        elif name == b"connection" and b"close" in value.lower():
            close = True
    return None if length is None else (int(length), close)


_NO_COUNT = frozenset({"HEAD", http_rules.CONNECT})


def _mirrored(status: int, close: bool) -> h11.Response:
    """The response the request parser is told was sent (only its state matters)."""
    event = _MIRRORED.get((status, close))
    if event is None:
        headers = [("Content-Length", "0")] + ([("Connection", "close")] if close else [])
        event = h11.Response(status_code=status, headers=headers)
        if len(_MIRRORED) < _CACHE_LIMIT:
            _MIRRORED[(status, close)] = event
    return event


def _record(method: str, target: str, host: str | None) -> RequestRecord:
    return RequestRecord(
        method=method,
        path=path_text(target),
        host=host,
        decision=Decision(Verdict.DENY, http_rules.HTTP_MALFORMED, None),
    )


def _closes(event: h11.Response) -> bool:
    return any(name == b"connection" and b"close" in value.lower() for name, value in event.headers)
