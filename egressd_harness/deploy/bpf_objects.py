"""The images' eBPF objects: built once at image build time, copied into each daemon's cache.

    python3 -m egressd_harness.deploy.bpf_objects build OUT   # every bpf/*.c -> OUT/<stem>.o
    python3 -m egressd_harness.deploy.bpf_objects check OUT   # each OUT/<stem>.o is current

One way of building: `build` runs the daemons' own `egressd.ebpf.build.build_object` (clang,
in the `bpf` build stage of deploy/Dockerfile); at start the proxy and node
roles `seed` their cache directory (``state_dir/cache``, where tier 1, the node's and the
proxy's kernel path look) with the objects, modification times kept, so `build_object` finds
them newer than their sources and never runs clang: the runtime images have no compiler.
`check` is the same `build_object` with no compiler to run, so an image whose objects are
older than its sources fails at build time (tool_missing) instead of at a daemon's start.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from egressd.ebpf.build import EbpfError, build_object

#: The repository's (and the images' /opt/egressd/app) bpf/ directory.
SOURCE_DIR = Path(__file__).resolve().parents[2] / "bpf"
_NO_COMPILER = "/nonexistent/clang"


def sources(src_dir: Path = SOURCE_DIR) -> tuple[list[Path], list[Path]]:
    """(programs, headers) of `src_dir`: every ``*.c`` and every ``*.h``, sorted."""
    return sorted(src_dir.glob("*.c")), sorted(src_dir.glob("*.h"))


def build_all(out_dir: Path, src_dir: Path = SOURCE_DIR, *, clang: str = "clang") -> list[Path]:
    """Every program of `src_dir` compiled into `out_dir` (skipped when already current)."""
    programs, headers = sources(src_dir)
    if not programs:
        raise EbpfError("build_failed", f"no *.c in {src_dir}")
    return [build_object(src, out_dir, clang=clang, deps=headers) for src in programs]


def seed(prebuilt: Path, cache_dir: Path) -> list[str]:
    """Copy every ``prebuilt/*.o`` missing from `cache_dir` or newer than its copy there
    (mtime kept: it must stay newer than its source); the names copied. A missing
    `prebuilt` (an image built another way) copies nothing: the daemons build as before."""
    if not prebuilt.is_dir():
        return []
    copied = []
    for obj in sorted(prebuilt.glob("*.o")):
        target = cache_dir / obj.name
        try:
            if target.stat().st_mtime_ns >= obj.stat().st_mtime_ns:
                continue
        except FileNotFoundError:
            pass
        cache_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(obj, target)
        copied.append(obj.name)
    return copied


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("build", "check"):
        print(__doc__, file=sys.stderr)
        return 2
    out_dir = Path(argv[1])
    clang = "clang" if argv[0] == "build" else _NO_COMPILER
    try:
        objects = build_all(out_dir, clang=clang)
    except EbpfError as exc:
        print(f"bpf_objects {argv[0]}: {exc.reason}: {exc.detail}", file=sys.stderr)
        return 1
    for obj in objects:
        print(f"bpf object: {obj} ({obj.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
