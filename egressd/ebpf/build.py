"""Build eBPF objects with clang and give each daemon its own bpffs.

* `build_object` runs clang into a cache directory when the object is missing or older than the
  source (CI starts from a clean clone).
* `mount_bpffs`: each mount of bpffs is its own instance, so two daemons on one host (two node
  namespaces, two state dirs) never share pinned maps, and nothing depends on /sys/fs/bpf being
  mounted. `ip netns exec` gives a process a private mount namespace: mount in the process that
  uses the pins.

Errors are `EbpfError` with the reasons tool_missing, build_failed, mount_failed and the one the
caller names for `run_tool`; each daemon translates them into its own subsystem's error.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from egressd.errors import EgressdError

_MNT_DETACH = 2
_TOOL_TIMEOUT_S: Final = 120.0


class EbpfError(EgressdError):
    """An eBPF object could not be built, a tool run, or a bpffs mounted."""


def _multiarch_include() -> list[str]:
    machine = {"arm64": "aarch64"}.get(platform.machine(), platform.machine())
    path = Path(f"/usr/include/{machine}-linux-gnu")
    return ["-idirafter", str(path)] if path.is_dir() else []


def build_object(
    src: Path, out_dir: Path, *, clang: str = "clang", deps: Sequence[Path] = ()
) -> Path:
    """`out_dir/<stem>.o` compiled from `src` unless it is already newer than `src` and every
    file in `deps` (the headers it includes)."""
    out = out_dir / f"{src.stem}.o"
    try:
        src_mtime = max(path.stat().st_mtime_ns for path in (src, *deps))
    except OSError as exc:
        raise EbpfError("build_failed", f"{exc.filename}: {exc.strerror}") from exc
    with contextlib.suppress(FileNotFoundError):
        if out.stat().st_mtime_ns >= src_mtime:
            return out
    compiler = shutil.which(clang)
    if compiler is None:
        raise EbpfError("tool_missing", f"{clang} not found (apt-get install clang)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{src.stem}.", suffix=".o", dir=out_dir)
        os.close(fd)
    except OSError as exc:
        raise EbpfError("build_failed", f"{out_dir}: {exc.strerror}") from exc
    tmp = Path(tmp_name)
    cmd = [
        compiler,
        "-O2",
        "-g",
        "-target",
        "bpf",
        "-Wall",
        *_multiarch_include(),
        "-c",
        str(src),
        "-o",
        str(tmp),
    ]
    try:
        result = run_tool(cmd, "build_failed")
        if result.returncode != 0:
            raise EbpfError("build_failed", f"clang {src}: {result.stderr.strip()[-4000:]}")
        os.replace(tmp, out)
    except OSError as exc:
        raise EbpfError("build_failed", f"{out}: {exc.strerror}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return out


def run_tool(cmd: list[str], reason: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=_TOOL_TIMEOUT_S, check=False
        )
    except FileNotFoundError as exc:
        raise EbpfError("tool_missing", f"{cmd[0]}: {exc.strerror}") from exc
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EbpfError(reason, f"{cmd[0]}: {exc}") from exc


_libc = ctypes.CDLL(None, use_errno=True)


def _mounts() -> dict[str, str]:
    """{mount point: filesystem type} of this mount namespace; the top mount wins."""
    out = {}
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        for line in fh:
            before, _, after = line.partition(" - ")
            point = before.split(" ")[4].replace("\\040", " ").replace("\\011", "\t")
            out[point] = after.split(" ", 1)[0]
    return out


def mount_bpffs(path: Path) -> None:
    fstype = _mounts().get(str(path))
    if fstype == "bpf":
        return
    if fstype is not None:
        raise EbpfError("mount_failed", f"{path} is already a {fstype} mount")
    if _libc.mount(b"bpf", os.fsencode(path), b"bpf", 0, b"mode=0700") != 0:
        err = ctypes.get_errno()
        raise EbpfError("mount_failed", f"bpffs on {path}: {os.strerror(err)}")


def umount_bpffs(path: Path) -> None:
    if _mounts().get(str(path)) != "bpf":
        return
    if _libc.umount2(os.fsencode(path), 0) == 0:
        return
    err = ctypes.get_errno()
    if err == errno.EBUSY and _libc.umount2(os.fsencode(path), _MNT_DETACH) == 0:
        return
    raise EbpfError("mount_failed", f"umount {path}: {os.strerror(err)}")
