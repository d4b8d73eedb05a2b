"""What the PNG plots of `egressd loadtest` and `egressd bench` share.

matplotlib is imported only inside `pyplot()`, with the Agg backend (no
display): the daemons and the CLI's parsers never load it. It comes with the
`test`, `load` and `plots` extras (`pip install -e '.[plots]'`); the commands
check `available()` before a run, so that a missing matplotlib is a one-line
error at the start (or `--no-plots`), not a traceback after minutes of load.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from egressd.errors import EgressdError

DPI = 100
MISSING = "matplotlib is not installed (pip install -e '.[plots]'), or pass --no-plots"


class PlotError(EgressdError):
    """A plot could not be drawn (no matplotlib, or a report without the data)."""


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def require() -> None:
    if not available():
        raise PlotError("no_matplotlib", MISSING)


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend."""
    try:
        import matplotlib
    except ImportError as exc:
        raise PlotError("no_matplotlib", MISSING) from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def beside(out: Path, suffix: str = "") -> Path:
    """The PNG beside a JSON file: `X.json` -> `X{suffix}.png`."""
    return out.with_name(f"{out.stem}{suffix}.png")


def save(fig: Any, path: Path) -> Path:
    plt = pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def write_beside(
    write: Callable[[Mapping[str, Any], Path], list[Path]], doc: Mapping[str, Any], out: Path
) -> list[Path]:
    """`write(doc, out)`, for the commands: the run's JSON is written already, so
    a plot that cannot be drawn is one line on stderr, not a lost result."""
    try:
        return write(doc, out)
    except (PlotError, OSError, ValueError, KeyError, TypeError) as exc:
        print(f"egressd: plots not written: {exc}", file=sys.stderr)
        return []
