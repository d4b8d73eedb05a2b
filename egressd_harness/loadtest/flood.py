"""The flooders of `egressd loadtest dns-flood` and `syn-flood` (issue 15).

    ip netns exec NS python -m egressd_harness.loadtest.flood dns --resolver 100.100.100.53 \
        --schedule T:baseline,T:stress,...,T:end --rate 5000 --summary FILE.json
    ip netns exec NS python -m egressd_harness.loadtest.flood syn --src 100.96.1.2 \
        --dst 203.0.113.10 --port 80 --schedule ... --rate 10000 --summary FILE.json

Run by the load-test runner inside the attacker's namespace (registered with
its node's agent like a sandbox), they flood only in the schedule's `stress`
windows and quit by themselves at its end, or earlier at `--max-packets` or
`--max-seconds` of flooding, whichever comes first (floods are bounded):

- `dns`: DNS queries over UDP to the sandbox resolver from `SOCKETS` sockets,
  one name in two denied (`<random>.evil.test`), one allowed
  (`<random>.data.allowed.test`, under the policy's wildcard: random labels,
  so no cache answers them); counts queries sent and answers received by
  rcode.
- `syn`: bare TCP SYNs from a raw socket (`IPPROTO_RAW`, so `IP_HDRINCL`),
  as an escaped sandbox could send them: the sandbox's own registered source
  address (the kernel puts the veth's MAC on them), random source ports and
  sequence numbers, to an allowed destination and port. Nothing completes a
  handshake: the attacker's kernel answers a SYN-ACK with a reset.

`--rate` paces the flood (packets per second, 0 = as fast as one process
can); the load test uses a rate above the incident's (~3,600 DNS queries/s),
so that the CPU the flooder burns on a 2-core machine is the flood's, not a
busy loop's. The packet builders and the pacing arithmetic are pure.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import resource
import select
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

from egressd_harness.loadtest.scenarios import END, STRESS, parse_schedule, phase_at

DNS_PORT = 53
SOCKETS = 8
DENIED_SUFFIX = "evil.test"
ALLOWED_SUFFIX = "data.allowed.test"
# Sends per pacing step at most: a stall is not followed by a catch-up burst
# bigger than this (and the loop reads answers between steps). Steps of 5 ms
# (25 queries at 5,000/s): a flooder waking 1,000 times a second disturbed
# the victims on the 2-core machine even when it sent next to nothing.
MAX_BATCH = 256
STEP_S = 0.005
DRAIN_S = 1.0  # after the last stress window, answers still in flight
MAX_PACKETS = 2_000_000
MAX_SECONDS = 25.0


# --- packets (pure) ------------------------------------------------------------------------


def dns_query(name: str, qid: int) -> bytes:
    """A standard query (RD set) for `name` IN A."""
    header = struct.pack("!HHHHHH", qid & 0xFFFF, 0x0100, 1, 0, 0, 0)
    labels = b"".join(
        bytes([len(part)]) + part
        for part in (p.encode("ascii") for p in name.rstrip(".").split("."))
    )
    if any(len(p) > 63 for p in name.split(".")) or len(labels) > 254:
        raise ValueError(f"not a DNS name: {name!r}")
    return header + labels + b"\x00" + struct.pack("!HH", 1, 1)


def flood_name(i: int, rng: random.Random) -> str:
    """The i-th name of the DNS flood: even ones denied, odd ones allowed; a
    fresh random label each, so no cache on the path answers a repeat."""
    label = f"f{rng.getrandbits(48):012x}"
    return f"{label}.{DENIED_SUFFIX if i % 2 == 0 else ALLOWED_SUFFIX}"


def dns_rcode(reply: bytes) -> int | None:
    """The rcode of a DNS reply, None if it is not one (too short, QR clear)."""
    if len(reply) < 12 or not reply[2] & 0x80:
        return None
    return reply[3] & 0x0F


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of `data`."""
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


TCP_SYN = 0x02
TCP_MSS = 1460
_TCP_HEADER = struct.Struct("!HHIIBBHHH")
_IPV4_HEADER = struct.Struct("!BBHHHBBH4s4s")


def syn_packet(
    src: IPv4Address, dst: IPv4Address, sport: int, dport: int, seq: int, ident: int
) -> bytes:
    """An IPv4 packet (no options, DF) carrying a TCP SYN with an MSS option,
    both checksums right: what a kernel's connect() sends, minus the rest
    of its options."""
    option = struct.pack("!BBH", 2, 4, TCP_MSS)
    offset = (_TCP_HEADER.size + len(option)) // 4
    tcp = _TCP_HEADER.pack(sport, dport, seq, 0, offset << 4, TCP_SYN, 64240, 0, 0) + option
    pseudo = src.packed + dst.packed + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
    total = _IPV4_HEADER.size + len(tcp)
    header = _IPV4_HEADER.pack(
        0x45, 0, total, ident & 0xFFFF, 0x4000, 64, socket.IPPROTO_TCP, 0, src.packed, dst.packed
    )
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + tcp


# --- pacing and windows (pure) ------------------------------------------------------------------


def due(elapsed_s: float, rate: float, sent: int) -> int:
    """How many packets to send now to keep `rate` per second after
    `elapsed_s` seconds of flooding with `sent` sent; 0 < result <= MAX_BATCH
    when behind. `rate` 0: unpaced, always a full batch."""
    if rate <= 0:
        return MAX_BATCH
    return max(0, min(MAX_BATCH, int(elapsed_s * rate) - sent))


def stress_spans(schedule: list[tuple[float, str]]) -> list[tuple[float, float]]:
    """The schedule's stress windows as [start, end) times."""
    return [
        (t, schedule[i + 1][0]) for i, (t, phase) in enumerate(schedule[:-1]) if phase == STRESS
    ]


@dataclass
class FloodStats:
    """What a flooder did; `spans` are the [start, end) Unix times it flooded."""

    kind: str
    rate: float
    sent: int = 0
    answered: int = 0
    rcodes: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    spans: list[tuple[float, float]] = field(default_factory=list)
    stopped_by: str = ""
    cpu_s: float = 0.0  # the flooder's own CPU time (user + system)

    @property
    def flood_seconds(self) -> float:
        return sum(b - a for a, b in self.spans)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "rate_cap": self.rate,
            "sent": self.sent,
            "answered": self.answered,
            "rcodes": dict(self.rcodes),
            "errors": dict(self.errors),
            "spans": [[round(a, 3), round(b, 3)] for a, b in self.spans],
            "flood_seconds": round(self.flood_seconds, 3),
            "sent_per_s": round(self.sent / self.flood_seconds, 1) if self.flood_seconds else 0.0,
            "stopped_by": self.stopped_by,
            "cpu_s": round(self.cpu_s, 3),
        }


RCODE_NAMES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}


# --- I/O ------------------------------------------------------------------------------------


def _send_errors(stats: FloodStats, exc: OSError) -> None:
    stats.errors[errno.errorcode.get(exc.errno or 0, str(exc.errno))] += 1


def run(
    stats: FloodStats,
    send_one: Callable[[int], None],
    poll: Callable[[], None],
    schedule: list[tuple[float, str]],
    max_packets: int,
    max_seconds: float,
) -> FloodStats:
    """Flood with `send_one(i)` in the stress windows, at `stats.rate`, until
    the schedule's end, `max_packets` or `max_seconds` of flooding; `poll()`
    reads what came back (between steps and until `DRAIN_S` after the end)."""
    stats.stopped_by = "schedule"
    while True:
        now = time.time()
        phase = phase_at(schedule, now)
        if phase == END:
            break
        if phase != STRESS:
            poll()
            time.sleep(0.01)
            continue
        start = now
        attempts = 0  # paces the window: a failed send takes its slot too (no error spin)
        while phase_at(schedule, time.time()) == STRESS:
            flooded = stats.flood_seconds + time.time() - start
            if stats.sent >= max_packets or flooded >= max_seconds:
                stats.stopped_by = "max_packets" if stats.sent >= max_packets else "max_seconds"
                break
            n = min(due(time.time() - start, stats.rate, attempts), max_packets - stats.sent)
            for _ in range(n):
                attempts += 1
                try:
                    send_one(stats.sent)
                    stats.sent += 1
                except OSError as exc:  # ENOBUFS, EPERM: counted, the flood goes on
                    _send_errors(stats, exc)
            poll()
            if n < MAX_BATCH:
                time.sleep(STEP_S)
        stats.spans.append((start, time.time()))
        if stats.stopped_by != "schedule":
            break
    end = time.monotonic() + DRAIN_S
    while time.monotonic() < end:
        poll()
        time.sleep(0.01)
    return stats


def dns_flood(
    resolver: IPv4Address,
    schedule: list[tuple[float, str]],
    rate: float,
    max_packets: int,
    max_seconds: float,
) -> FloodStats:
    stats = FloodStats("dns", rate)
    socks = []
    for _ in range(SOCKETS):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.connect((str(resolver), DNS_PORT))
        socks.append(sock)
    rng = random.Random()

    def send_one(i: int) -> None:
        socks[i % SOCKETS].send(dns_query(flood_name(i, rng), rng.getrandbits(16)))

    def poll() -> None:
        ready, _, _ = select.select(socks, [], [], 0)
        for sock in ready:
            while True:
                try:
                    reply = sock.recv(4096)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:  # ECONNREFUSED from an ICMP error
                    _send_errors(stats, exc)
                    break
                rcode = dns_rcode(reply)
                stats.answered += 1
                stats.rcodes[
                    RCODE_NAMES.get(rcode, str(rcode)) if rcode is not None else "not_dns"
                ] += 1

    try:
        return run(stats, send_one, poll, schedule, max_packets, max_seconds)
    finally:
        for sock in socks:
            sock.close()


def syn_flood(
    src: IPv4Address,
    dst: IPv4Address,
    port: int,
    schedule: list[tuple[float, str]],
    rate: float,
    max_packets: int,
    max_seconds: float,
) -> FloodStats:
    stats = FloodStats("syn", rate)
    rng = random.Random()
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as sock:
        sock.setblocking(False)

        def send_one(_i: int) -> None:
            packet = syn_packet(
                src, dst, rng.randint(1024, 65535), port, rng.getrandbits(32), rng.getrandbits(16)
            )
            sock.sendto(packet, (str(dst), 0))

        return run(stats, send_one, lambda: None, schedule, max_packets, max_seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m egressd_harness.loadtest.flood",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("kind", choices=("dns", "syn"))
    parser.add_argument("--schedule", required=True, help="T:phase,...,T:end (Unix times)")
    parser.add_argument("--rate", type=float, required=True, help="packets/s (0: unpaced)")
    parser.add_argument("--max-packets", type=int, default=MAX_PACKETS)
    parser.add_argument(
        "--max-seconds", type=float, default=MAX_SECONDS, help="seconds of flooding"
    )
    parser.add_argument("--summary", required=True, help="the JSON summary to write at the end")
    parser.add_argument("--resolver", type=IPv4Address, default=IPv4Address("100.100.100.53"))
    parser.add_argument("--src", type=IPv4Address, help="syn: the sandbox's own address")
    parser.add_argument("--dst", type=IPv4Address, help="syn: the destination")
    parser.add_argument("--port", type=int, default=80, help="syn: the destination port")
    args = parser.parse_args(argv)
    schedule = parse_schedule(args.schedule)
    if not 0 < args.max_packets <= MAX_PACKETS or not 0 < args.max_seconds <= MAX_SECONDS:
        parser.error(f"--max-packets 1..{MAX_PACKETS}, --max-seconds up to {MAX_SECONDS:g}")
    if args.rate < 0:
        parser.error("--rate must be >= 0")
    if args.kind == "syn":
        if args.src is None or args.dst is None or not 0 < args.port < 65536:
            parser.error("syn needs --src, --dst and a --port 1..65535")
        stats = syn_flood(
            args.src, args.dst, args.port, schedule, args.rate, args.max_packets, args.max_seconds
        )
    else:
        stats = dns_flood(args.resolver, schedule, args.rate, args.max_packets, args.max_seconds)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    stats.cpu_s = usage.ru_utime + usage.ru_stime
    tmp = args.summary + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(stats.to_dict(), fh)
    os.replace(tmp, args.summary)
    print(json.dumps(stats.to_dict()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
