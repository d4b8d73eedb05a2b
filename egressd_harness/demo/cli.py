"""`egressd demo`: the fleet demo on the local topology (`egressd_harness.demo.netns`), or with
`--offline` the in-process checks (`egressd_harness.demo.offline`). Registering the verb imports
neither: each runs only when asked for."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    if args.offline:
        from egressd_harness.demo.offline import run_offline

        return run_offline()
    from pathlib import Path

    from egressd.layout import default_layout
    from egressd_harness.demo.netns import run_demo
    from egressd_harness.topology.fleet import Fleet

    return run_demo(Fleet(default_layout(Path(args.run_dir), args.prefix)), keep=args.keep)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from egressd.layout import DEFAULT_RUN_DIR

    parser = sub.add_parser("demo", help="two jobs in real gVisor sandboxes through the fleet")
    parser.add_argument(
        "--offline",
        action="store_true",
        help="only the in-process checks (policies, decisions, GENEVE); no root needed",
    )
    parser.add_argument("--run-dir", default=str(DEFAULT_RUN_DIR))
    parser.add_argument("--prefix", default="egd-", help="namespace name prefix")
    parser.add_argument("--keep", action="store_true", help="leave the fleet up afterwards")
    parser.set_defaults(handler=run)
