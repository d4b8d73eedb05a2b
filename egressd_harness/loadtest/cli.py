"""`egressd loadtest SCENARIO --duration S [--prefix egd-lt-] [--run-dir DIR]
[--datapath kernel|userspace] [--out FILE.json]`

Runs one fairness scenario (`port-exhaustion`, `bandwidth`, `steady`, and the
floods `dns-flood`, `syn-flood`) with locust on its own fleet, prints the
verdict table and writes the JSON document. Exit 0 when every verdict
passes, 1 when one fails, 2 when the run could not happen (one line on
stderr), 143 on SIGTERM (everything it set up is removed first), 130 on
Ctrl-C. Beside the JSON: `OUT-latency.png` and `OUT-throughput.png`
(`egressd_harness.loadtest.plots`; `--no-plots` leaves them out).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from egressd import logs
from egressd.cliutil import CliError
from egressd.errors import EgressdError
from egressd.net import netns as kn
from egressd.proxy.config import DATAPATHS
from egressd.signals import Stopped, sigterm_unwinds
from egressd_harness import plotting
from egressd_harness.loadtest import plots, runner, verdicts
from egressd_harness.loadtest.scenarios import SCENARIOS, ScenarioError, check_duration
from egressd_harness.topology.fleet import DEFAULT_DATAPATH


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def options(args: argparse.Namespace) -> runner.Options:
    try:
        check_duration(args.scenario, args.duration)
    except ScenarioError as exc:
        raise CliError(str(exc)) from exc
    try:
        kn.check_netns_name(f"{args.prefix}proxy1")
        kn.check_netns_name(f"{args.prefix}sbx-00000000")
    except kn.NetError as exc:
        raise CliError(f"--prefix {args.prefix!r}: not usable in namespace names") from exc
    if not args.prefix.endswith("-"):
        raise CliError(f"--prefix {args.prefix!r} must end with '-'")
    run_dir = Path(args.run_dir)
    if "." in run_dir.name or not run_dir.is_absolute():
        raise CliError(f"--run-dir {args.run_dir!r} must be an absolute path whose name has no dot")
    return runner.Options(
        scenario=args.scenario,
        duration_s=args.duration,
        prefix=args.prefix,
        run_dir=run_dir,
        out=Path(args.out) if args.out else None,
        datapath=args.datapath,
    )


def _handle(args: argparse.Namespace) -> int:
    opts = options(args)
    if not args.no_plots and not plotting.available():
        raise CliError(plotting.MISSING)
    logs.configure(json=False)
    try:
        with sigterm_unwinds():
            report = runner.run(opts)
    except EgressdError as exc:
        raise CliError(
            f"loadtest {opts.scenario}: {exc.reason}: {' '.join(exc.detail.split())}"
        ) from exc
    except Stopped:
        print(
            "egressd: loadtest stopped (SIGTERM); everything it set up was removed", file=sys.stderr
        )
        return 143
    doc = verdicts.to_json(
        report.scenario.to_dict(), report.verdicts, report.observed.to_dict(), report.meta
    )
    out = opts.out or Path("loadtest-results") / f"{opts.scenario}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(verdicts.render_table(opts.scenario, report.verdicts))
    print(f"\nJSON: {out}")
    for png in [] if args.no_plots else plotting.write_beside(plots.write, doc, out):
        print(f"PNG: {png}")
    return 0 if verdicts.passed(report.verdicts) else 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "loadtest",
        help="fairness under abuse: a locust scenario on its own fleet, verdict table + JSON",
    )
    parser.add_argument("scenario", choices=SCENARIOS, help=" | ".join(SCENARIOS))
    parser.add_argument(
        "--duration", type=_seconds, required=True, help="seconds of load (all phases)"
    )
    parser.add_argument(
        "--prefix",
        default=runner.DEFAULT_PREFIX,
        help=f"namespace prefix of the load-test fleet (default {runner.DEFAULT_PREFIX})",
    )
    parser.add_argument(
        "--run-dir",
        default=str(runner.DEFAULT_RUN_DIR),
        help=f"the load-test fleet's run directory (default {runner.DEFAULT_RUN_DIR})",
    )
    parser.add_argument(
        "--datapath",
        default=DEFAULT_DATAPATH,
        choices=DATAPATHS,
        help=f"the fleet's data path (default {DEFAULT_DATAPATH})",
    )
    parser.add_argument(
        "--out", default=None, help="the JSON document (default loadtest-results/SCENARIO.json)"
    )
    parser.add_argument(
        "--no-plots",
        action="store_true",
        help="no OUT-latency.png / OUT-throughput.png beside the JSON (need matplotlib)",
    )
    parser.set_defaults(handler=_handle)
