"""Cost of the proxy's two audit lines per plain-HTTP connection.

    python benchmarks/audit_lines.py --seconds 10 --out bench-results/audit_lines.json

A worker's calls as intercept.py makes them, with the daemons' log set-up
(`logs.configure(json=True)`, a logger bound to ``component`` and ``worker``,
``worker`` also a context variable) writing to a file: the ``connection``
line (`audit.connection_event` + `audit.emit`, as `_finish`) and the
``http_request`` line (`audit.HttpRequests` + one `emit`, as a connection's
first request). The baseline is the floor every line pays: writing the same
text and flushing it. Each measure is the median of >= 5 timed rounds.
"""

from __future__ import annotations

import io
import itertools
import json
import platform
import sys
import tempfile
import uuid
from collections.abc import Callable

import structlog

from egressd import logs
from egressd.proxy import audit
from egressd_harness.bench.microbench import parse_args, run_all

JOB = uuid.UUID("2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2")


def measures(out: io.TextIOBase) -> dict[str, Callable[[], object]]:
    logs.configure(json=True, stream=out)  # type: ignore[arg-type]
    structlog.contextvars.bind_contextvars(worker=0)
    logger = structlog.get_logger("egressd.proxy.audit").bind(component="proxy", worker=0)
    ports = itertools.cycle(range(32768, 61000))
    sample = audit.connection_event(
        job_id=JOB, account="acme", node="node1", proxy="proxy1", src="100.96.1.2", sport=1,
        dst="203.0.113.10", port=80, host="api.allowed.test", verdict="allow",
        reason="allowed_host", mode="enforce", bytes_up=70, bytes_down=185, duration_ms=1.25,
    )  # fmt: skip
    line = json.dumps({"component": "proxy", "worker": 0, **sample, "level": "info"})

    def connection() -> None:
        audit.emit(
            logger,
            audit.connection_event(
                job_id=JOB, account="acme", node="node1", proxy="proxy1", src="100.96.1.2",
                sport=next(ports), dst="203.0.113.10", port=80, host="api.allowed.test",
                verdict="allow", reason="allowed_host", mode="enforce", would_deny=False,
                bytes_up=70, bytes_down=185, duration_ms=1.2345678, end=None,
            ),
        )  # fmt: skip

    def http_request() -> None:
        requests = audit.HttpRequests(
            logger, job_id=JOB, account="acme", node="node1", proxy="proxy1",
            src="100.96.1.2", sport=next(ports), dst="203.0.113.10", port=80, mode="enforce",
        )  # fmt: skip
        requests.emit(
            host="api.allowed.test", method="GET", path="/", status=200, verdict="allow",
            reason="allowed_request", bytes_up=70, bytes_down=185,
        )  # fmt: skip

    def write_flush() -> None:
        out.write(line + "\n")
        out.flush()

    return {
        "write_flush_per_s": write_flush,
        "connection_line_per_s": connection,
        "http_request_line_per_s": http_request,
    }


def report(results: dict[str, float]) -> dict[str, float]:
    base_ns = 1e9 / results["write_flush_per_s"]
    derived = {
        "connection_line_ns": 1e9 / results["connection_line_per_s"],
        "http_request_line_ns": 1e9 / results["http_request_line_per_s"],
    }
    derived["per_connection_ns"] = derived["connection_line_ns"] + derived["http_request_line_ns"]
    derived["per_connection_over_writes_ns"] = derived["per_connection_ns"] - 2 * base_ns
    print(f"audit lines, {platform.python_implementation()} {platform.python_version()}")
    print(f"{'measure':<34}{'rate/s':>14}{'ns/op':>10}")
    for name, value in results.items():
        print(f"{name:<34}{value:>14,.0f}{1e9 / value:>10,.0f}")
    print(
        f"per connection: {derived['per_connection_ns']:,.0f} ns for its two lines, "
        f"{derived['per_connection_over_writes_ns']:,.0f} ns beyond their two writes"
    )
    return derived


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv)
    with tempfile.TemporaryFile("w+") as out:
        results = run_all(measures(out), args)
    derived = report(results)
    if args.out:
        doc = {
            **{name: round(value) for name, value in results.items()},
            **{name: round(value, 1) for name, value in derived.items()},
            "rounds": args.rounds,
            "statistic": "median",
            "python": sys.version.split()[0],
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
