"""`python -m egressd_harness.deploy ROLE | health ROLE`: which container role to run.

The dispatch lives here, not in `egressd_harness.deploy.entry`: `demo`
(`egressd_harness.demo.compose`) and `loadgen` use entry's helpers, so entry importing them
back would make an import cycle.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        raise SystemExit("usage: python -m egressd_harness.deploy ROLE | health ROLE")
    role = argv[0]
    if role == "health":
        # Not through entry: a healthcheck must not pay for entry's imports (see health.py).
        from egressd_harness.deploy.health import health

        try:
            return health(argv[1])
        except (OSError, SystemExit) as exc:
            print(f"unhealthy: {exc}", file=sys.stderr)
            return 1
    if role == "demo":
        from egressd_harness.demo import compose

        return compose.main(argv[1:])
    from egressd_harness.deploy import entry

    if role == "udf":
        return entry.role_udf(argv[1:])
    if role == "loadgen":
        from egressd_harness.deploy import loadgen

        return loadgen.main(argv[1:])
    roles = {
        "control": entry.role_control,
        "inet": entry.role_inet,
        "proxy": entry.role_proxy,
        "node": entry.role_node,
    }
    if role not in roles:
        raise SystemExit(
            f"unknown role {role!r} (one of {', '.join(sorted(roles))}, demo, loadgen, health)"
        )
    return roles[role]()


if __name__ == "__main__":
    sys.exit(main())
