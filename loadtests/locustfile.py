"""Locust user classes of the egressd fairness scenarios (issue 4).

Each job runs in its own headless locust process inside its own load-generator
namespace (a plain network namespace registered with a node agent exactly as a
sandbox is: same veth, tier-1 eBPF, GENEVE tunnel, proxy), started by
`egressd loadtest` as

    ip netns exec NS python -m locust -f loadtests/locustfile.py --headless \
        --host http://api.allowed.test -u U -r U -t Ss --csv PREFIX CLASS

`ip netns exec` bind-mounts /etc/netns/NS/resolv.conf (resolver 100.100.100.53,
the proxy's DNS through the tunnel), so names resolve as in a sandbox.

User classes:

- `PortExhaustionAttacker` (job A): one user that tries to hold as many
  concurrent keep-alive connections to one destination as it can. It opens
  new connections at a bounded rate (`EGRESSD_LT_ATTACK_RATE` per second, at
  most `EGRESSD_LT_ATTACK_TARGET` held or in flight), sends `GET /` on each,
  keeps every answered connection open and asks again on it every
  `EGRESSD_LT_ATTACK_REFRESH_S` seconds. It counts connections established
  and answered (`held`), reset by the proxy (`reset`: connect succeeded, then
  RST or EOF before an answer), refused (`refused`: RST to the SYN), timed out,
  and held connections that died later (`dropped`).
- `Victim` (job B): ordinary requests to the same destination, a new
  connection for each (`Connection: close`), `EGRESSD_LT_RPS` per user at
  jittered times.
- `BandwidthHog`: downloads `/bytes/EGRESSD_LT_HOG_BYTES` back to back on a
  keep-alive connection, counting the bytes it receives per second.
- `Steady`: ordinary small keep-alive requests (`GET /data`), `EGRESSD_LT_RPS`
  per user at jittered times.

`EGRESSD_LT_SCHEDULE` (`T:baseline,T:stress,T:settle,...,T:end`, Unix times)
switches the abusive classes on only in `stress` windows (the attacker lets
go of its connections, the hog stops reading, at any other time), and Victim
and Steady label each request with the window it started in (`victim GET /
[stress]`), so that locust's CSV has a row per phase. Without it, every class
works all the time (locust run by hand).

Besides locust's CSV files, each process writes a JSON summary to
`EGRESSD_LT_SUMMARY` when it quits: the attacker's counters and the number of
connections it held over time, the hog's bytes per second, the slowest
labelled requests with their start times, and per second the labelled
requests' count, failures, p50 and p99 (`latency_per_second`: the plots).
"""

from __future__ import annotations

import errno
import json
import os
import random
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import gevent
import gevent.pool
from locust import FastHttpUser, HttpUser, User, events, task
from locust import stats as locust_stats

from egressd_harness.loadtest.scenarios import END, STRESS, parse_schedule, phase_at
from egressd_harness.loadtest.series import KEY as LATENCY_KEY
from egressd_harness.loadtest.series import per_second


def _env_float(name: str, default: float) -> float:
    text = os.environ.get(name)
    return float(text) if text else default


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    return int(text) if text else default


RPS_PER_USER = _env_float("EGRESSD_LT_RPS", 5.0)
ATTACK_RATE = _env_float("EGRESSD_LT_ATTACK_RATE", 40.0)
ATTACK_TARGET = _env_int("EGRESSD_LT_ATTACK_TARGET", 512)
ATTACK_REFRESH_S = _env_float("EGRESSD_LT_ATTACK_REFRESH_S", 15.0)
ATTACK_TIMEOUT_S = _env_float("EGRESSD_LT_ATTACK_TIMEOUT_S", 5.0)
HOG_BYTES = _env_int("EGRESSD_LT_HOG_BYTES", 16 * 1024 * 1024)
HOG_CHUNK = 256 * 1024
SUMMARY_PATH = os.environ.get("EGRESSD_LT_SUMMARY")
RESOLVE_EVERY_S = 30.0
# Without a schedule (locust run by hand) every class works all the time.
SCHEDULE = (
    parse_schedule(os.environ["EGRESSD_LT_SCHEDULE"])
    if os.environ.get("EGRESSD_LT_SCHEDULE")
    else []
)


def current_phase() -> str:
    return phase_at(SCHEDULE, time.time()) if SCHEDULE else STRESS


# What every user class adds to this process's summary (one job per process).
_summary: dict[str, Any] = {"classes": []}
_attack = Counter[str]()
_held_series: list[tuple[float, int]] = []
_hog_seconds = Counter[int]()
# The slowest requests of the well-behaved classes: (ms, Unix time at start, name).
_SLOWEST_KEPT = 25
_slowest: list[tuple[float, float, str]] = []
# Every labelled request: (Unix time at start, ms, failed), for `latency_per_second`.
_samples: list[tuple[float, float, bool]] = []


@events.request.add_listener
def _on_request(
    name: str,
    response_time: float,
    start_time: float | None = None,
    exception: BaseException | None = None,
    **_kw: Any,
) -> None:
    if not name.endswith("]"):
        return  # only the phase-labelled requests of Victim and Steady
    _samples.append((start_time or time.time(), response_time, exception is not None))
    if len(_slowest) < _SLOWEST_KEPT or response_time > _slowest[-1][0]:
        _slowest.append((round(response_time, 2), round(start_time or time.time(), 3), name))
        _slowest.sort(reverse=True)
        del _slowest[_SLOWEST_KEPT:]


# --- PortExhaustionAttacker ------------------------------------------------------------


class _Refused(Exception):
    """The connection was refused, reset, closed or timed out before an answer."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


def _classify(exc: BaseException) -> str:
    if isinstance(exc, _Refused):
        return exc.kind
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return "reset"
    if isinstance(exc, OSError) and exc.errno in (errno.ECONNRESET, errno.EPIPE):
        return "reset"
    return "error"


def _read_response(sock: socket.socket) -> int:
    """Read one HTTP/1.1 response with a Content-Length body; its status code."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise _Refused("reset", "closed before an answer")
        buf += chunk
        if len(buf) > 65536:
            raise _Refused("error", "response head too long")
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError) as exc:
        raise _Refused("error", f"bad status line {lines[0][:60]!r}") from exc
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise _Refused("reset", "closed in the body")
        body += chunk
    return status


class PortExhaustionAttacker(User):
    """Job A: holds as many concurrent connections to one destination as it can."""

    fixed_count = 1  # one user; it paces its own attempts

    def on_start(self) -> None:
        parts = urlsplit(self.host or "http://api.allowed.test")
        self._site = parts.hostname or "api.allowed.test"
        self._port = parts.port or 80
        self._request = (
            f"GET / HTTP/1.1\r\nHost: {self._site}\r\nUser-Agent: egressd-loadtest-attacker\r\n\r\n"
        ).encode()
        self._address = ""
        self._resolved_at = 0.0
        self._held: set[socket.socket] = set()
        self._in_flight = 0
        self._pool = gevent.pool.Group()
        _summary["classes"].append("PortExhaustionAttacker")

    def _resolve(self) -> str:
        now = time.monotonic()
        if not self._address or now - self._resolved_at > RESOLVE_EVERY_S:
            # Through the proxy's DNS, so that tier 2 knows the name this job uses.
            infos = socket.getaddrinfo(self._site, self._port, socket.AF_INET, socket.SOCK_STREAM)
            self._address = str(infos[0][4][0])
            self._resolved_at = now
        return self._address

    @task
    def attack(self) -> None:
        interval = 1.0 / ATTACK_RATE
        next_at = time.monotonic()
        last_sample = 0.0
        while True:
            now = time.monotonic()
            active = current_phase() == STRESS
            if not active and (self._held or self._in_flight):
                # Outside the stress windows the attacker holds nothing.
                self._pool.kill(block=True)
                for sock in self._held:
                    sock.close()
                self._held.clear()
                self._in_flight = 0  # a greenlet killed before it ran never ran its finally
            if now - last_sample >= 0.5:
                _held_series.append((round(time.time(), 2), len(self._held)))
                _attack["held_max"] = max(_attack["held_max"], len(self._held))
                last_sample = now
            if not active:
                next_at = now
                gevent.sleep(0.05)
                continue
            if now >= next_at and len(self._held) + self._in_flight < ATTACK_TARGET:
                next_at = max(next_at + interval, now - 1.0)  # no catch-up burst after a stall
                self._in_flight += 1
                self._pool.spawn(self._connection)
            gevent.sleep(min(interval, max(0.0, next_at - time.monotonic())) or 0.001)

    def _exchange(self, sock: socket.socket, what: str) -> None:
        start = time.perf_counter()
        exc: BaseException | None = None
        try:
            sock.sendall(self._request)
            status = _read_response(sock)
            if status != 200:
                exc = _Refused("http_error", f"HTTP {status}")
        except Exception as err:  # noqa: BLE001 - classified and reported
            exc = err
        events.request.fire(
            request_type="TCP",
            name=what,
            response_time=(time.perf_counter() - start) * 1000,
            response_length=0,
            exception=exc,
            context={},
        )
        if exc is not None:
            raise exc

    def _connection(self) -> None:
        sock: socket.socket | None = None
        holding = False
        try:
            start = time.perf_counter()
            _attack["attempts"] += 1
            try:
                address = self._resolve()
                sock = socket.create_connection((address, self._port), timeout=ATTACK_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - classified and reported
                _attack[_classify(exc)] += 1
                events.request.fire(
                    request_type="TCP",
                    name="connect",
                    response_time=(time.perf_counter() - start) * 1000,
                    response_length=0,
                    exception=exc,
                    context={},
                )
                return
            try:
                self._exchange(sock, "open+GET /")
            except Exception as exc:  # noqa: BLE001
                _attack[_classify(exc)] += 1
                return
            _attack["held"] += 1
            self._held.add(sock)
            self._in_flight -= 1
            holding = True
            while True:
                gevent.sleep(ATTACK_REFRESH_S)
                try:
                    self._exchange(sock, "held GET /")
                except Exception:  # noqa: BLE001 - a held connection that died
                    _attack["dropped"] += 1
                    return
        finally:
            if holding:
                self._held.discard(sock)
            else:
                self._in_flight -= 1
            if sock is not None:
                sock.close()

    def on_stop(self) -> None:
        _attack["held_at_stop"] = len(self._held)
        self._pool.kill(block=False)
        for sock in list(self._held):
            sock.close()
        self._held.clear()


# --- Victim, Steady ------------------------------------------------------------------------


def jittered_pacing(rate_per_s: float) -> Callable[[User], float]:
    """Waits that keep a user at `rate_per_s` tasks per second on average with
    random gaps (0.5 to 1.5 periods). Plain pacing (`constant_throughput`)
    lines every user up after the first stall of the machine: each resumes
    with a zero wait at the same moment, and from then on one stall hits every
    user's request at once."""
    period = 1.0 / rate_per_s

    def wait(user: User) -> float:
        now = time.time()
        due = getattr(user, "_egressd_due", None)
        if due is None or due < now - period:  # the first task, or behind after a stall
            due = now + random.uniform(0.0, period)
        else:
            due += period * random.uniform(0.5, 1.5)
        user._egressd_due = due  # type: ignore[attr-defined]
        return max(0.0, due - now)

    return wait


class _Paced(FastHttpUser):
    """`EGRESSD_LT_RPS` requests per second per user, at jittered times."""

    abstract = True
    wait_time = jittered_pacing(RPS_PER_USER)
    label = ""

    def on_start(self) -> None:
        if self.label not in _summary["classes"]:
            _summary["classes"].append(self.label)
        gevent.sleep(random.uniform(0.0, 1.0 / RPS_PER_USER))


class Victim(_Paced):
    """Job B: ordinary requests to the attacker's destination, one connection each."""

    label = "Victim"

    @task
    def get(self) -> None:
        phase = current_phase()
        if phase != END:
            self.client.get("/", headers={"Connection": "close"}, name=f"victim GET / [{phase}]")


class Steady(_Paced):
    """An ordinary job: small keep-alive requests at a steady rate."""

    label = "Steady"

    @task
    def get(self) -> None:
        phase = current_phase()
        if phase != END:
            self.client.get("/data", name=f"steady GET /data [{phase}]")


# --- BandwidthHog --------------------------------------------------------------------------


class BandwidthHog(HttpUser):
    """Downloads big bodies back to back, counting what arrives each second."""

    def wait_time(self) -> float:
        return 0.0

    def on_start(self) -> None:
        if "BandwidthHog" not in _summary["classes"]:
            _summary["classes"].append("BandwidthHog")

    @task
    def download(self) -> None:
        while current_phase() != STRESS:  # it starts in the first stress window
            if current_phase() == END:
                gevent.sleep(1.0)
                return
            gevent.sleep(0.1)
        path = f"/bytes/{HOG_BYTES}"
        with self.client.get(path, stream=True, name="hog GET /bytes", catch_response=True) as resp:
            got = 0
            try:
                for chunk in resp.iter_content(HOG_CHUNK):
                    got += len(chunk)
                    _hog_seconds[int(time.time())] += len(chunk)
                    # Outside the stress windows it stops reading (the
                    # connection stays, TCP backpressure stops the flow).
                    while (phase := current_phase()) != STRESS and phase != END:
                        gevent.sleep(0.1)
            except Exception as exc:  # noqa: BLE001 - reported as the request's failure
                resp.failure(f"body: {exc!r}")
                return
            if got != HOG_BYTES and current_phase() != END:
                resp.failure(f"body: {got} of {HOG_BYTES} bytes")
            else:
                resp.success()


# --- summary -------------------------------------------------------------------------------


def summary() -> dict[str, Any]:
    out: dict[str, Any] = {"classes": list(_summary["classes"])}
    if _attack or _held_series:
        out["attacker"] = {**dict(_attack), "held_series": _held_series}
    if _slowest:
        out["slowest"] = [{"ms": ms, "start": t, "name": name} for ms, t, name in _slowest]
    if _samples:
        out[LATENCY_KEY] = per_second(_samples)
    if _hog_seconds:
        out["hog"] = {"bytes_per_second": {str(k): v for k, v in sorted(_hog_seconds.items())}}
    return out


@events.quitting.add_listener
def _on_quitting(environment: Any, **_kwargs: Any) -> None:
    if SUMMARY_PATH:
        tmp = SUMMARY_PATH + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(summary(), fh)
        os.replace(tmp, SUMMARY_PATH)
    # Locust writes its CSV files once a second and does not write them again
    # at exit: give its writer one more turn, so that the files hold the final
    # numbers (the users have stopped by now).
    if getattr(environment.parsed_options, "csv_prefix", None):
        gevent.sleep(locust_stats.CSV_STATS_INTERVAL_SEC + 0.3)
