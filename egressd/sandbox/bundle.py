"""The OCI runtime config of one sandbox: a pure function of a `SandboxSpec`.

The sandbox's root is a directory that `egressd.sandbox.rootfs` builds: empty
mount points, Debian's merged-/usr symlinks and a generated /etc. Into it this
config bind-mounts, read-only, only what a Python UDF needs:

| destination | source |
|---|---|
| `/usr` | the host's /usr (programs, shared libraries, the Debian CA store) |
| `sys.base_prefix` | the Python installation the project's venv was made from |
| `sys.prefix` | the venv itself (requests and the project's dependencies) |
| caller's `--mount SRC:DST` | as given, read-only |

plus gVisor's own /proc, /dev and /sys, and a tmpfs on /tmp (the only
writable place). The root itself is read-only. Nothing else of the host is
visible: no /root (beyond the Python paths), /home, /run, /var or host /etc.

The process runs as nobody (65534:65534) without capabilities, with
noNewPrivileges, in /tmp, and its network namespace is the one the node agent
prepared (`/run/netns/NAME`), which gVisor's netstack takes over.
"""

from __future__ import annotations

import posixpath
import re
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from egressd.sandbox import SandboxError

OCI_VERSION = "1.0.2"
CONFIG_NAME = "config.json"
ROOTFS_NAME = "rootfs"
SANDBOX_UID = 65534
SANDBOX_GID = 65534
SANDBOX_HOSTNAME = "sandbox"
SANDBOX_CWD = "/tmp"
CA_BUNDLE = PurePosixPath("/etc/ssl/certs/ca-certificates.crt")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TMP_SIZE_BYTES = 64 * 1024 * 1024
NOFILE_LIMIT = 1024
USR = PurePosixPath("/usr")
NETNS_DIR = Path("/run/netns")
SANDBOX_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

# Debian's merged /usr: these are symlinks in the sandbox root as on the host.
MERGED_USR_LINKS: tuple[tuple[str, str], ...] = (
    ("bin", "usr/bin"),
    ("lib", "usr/lib"),
    ("lib64", "usr/lib64"),
    ("sbin", "usr/sbin"),
)
# Filesystems that gVisor provides itself (never the host's), in mount order.
KERNEL_MOUNTS: tuple[dict[str, Any], ...] = (
    {"destination": "/proc", "type": "proc", "source": "proc"},
    {
        "destination": "/dev",
        "type": "tmpfs",
        "source": "tmpfs",
        "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
    },
    {
        "destination": "/dev/pts",
        "type": "devpts",
        "source": "devpts",
        "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
    },
    {
        "destination": "/sys",
        "type": "sysfs",
        "source": "sysfs",
        "options": ["nosuid", "noexec", "nodev", "ro"],
    },
)
TMP_MOUNT: dict[str, Any] = {
    "destination": "/tmp",
    "type": "tmpfs",
    "source": "tmpfs",
    "options": ["nosuid", "nodev", "mode=1777", f"size={TMP_SIZE_BYTES}"],
}
BIND_OPTIONS = ("bind", "ro", "nosuid", "nodev")
# A caller's mount may neither take nor go under these destinations.
RESERVED_DESTINATIONS: tuple[PurePosixPath, ...] = (
    PurePosixPath("/proc"),
    PurePosixPath("/dev"),
    PurePosixPath("/sys"),
    PurePosixPath("/tmp"),
    PurePosixPath("/etc"),
    USR,
    *(PurePosixPath("/", name) for name, _ in MERGED_USR_LINKS),
)


def _is_within(path: PurePosixPath, base: PurePosixPath) -> bool:
    return path == base or base in path.parents


def _clean_absolute(text: str, what: str) -> PurePosixPath:
    if not text or "\0" in text:
        raise SandboxError("bad_mount", f"{what} {text!r}: empty or contains NUL")
    if not text.startswith("/"):
        raise SandboxError("bad_mount", f"{what} {text!r}: must be an absolute path")
    if ".." in PurePosixPath(text).parts:
        raise SandboxError("bad_mount", f"{what} {text!r}: must not contain '..'")
    return PurePosixPath(posixpath.normpath(text))


@dataclass(frozen=True, slots=True)
class BindMount:
    """A read-only bind mount of a host path into the sandbox."""

    source: PurePosixPath
    destination: PurePosixPath

    def __post_init__(self) -> None:
        object.__setattr__(self, "source", _clean_absolute(str(self.source), "source"))
        object.__setattr__(
            self, "destination", _clean_absolute(str(self.destination), "destination")
        )
        if self.destination == PurePosixPath("/"):
            raise SandboxError("bad_mount", "destination must not be /")

    @classmethod
    def parse(cls, text: str, *, cwd: PurePosixPath | None = None) -> BindMount:
        """`SRC:DST` as given to `--mount`; a relative SRC is taken from `cwd`."""
        src, sep, dst = text.partition(":")
        if not sep or not src or not dst or ":" in dst:
            raise SandboxError("bad_mount", f"{text!r}: expected SRC:DST")
        if not src.startswith("/"):
            if cwd is None:
                raise SandboxError("bad_mount", f"{text!r}: SRC must be absolute")
            src = str(cwd / src)
        return cls(PurePosixPath(src), PurePosixPath(dst))

    def to_oci(self) -> dict[str, Any]:
        return {
            "destination": str(self.destination),
            "type": "bind",
            "source": str(self.source),
            "options": list(BIND_OPTIONS),
        }


@dataclass(frozen=True, slots=True)
class PythonRuntime:
    """The Python a sandbox runs: the venv (`sys.prefix`) and the installation
    it was created from (`sys.base_prefix`), mounted at their host paths so the
    venv's absolute symlinks and pyvenv.cfg keep working."""

    prefix: PurePosixPath
    base_prefix: PurePosixPath

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefix", _clean_absolute(str(self.prefix), "prefix"))
        object.__setattr__(
            self, "base_prefix", _clean_absolute(str(self.base_prefix), "base_prefix")
        )

    @classmethod
    def current(cls) -> PythonRuntime:
        return cls(PurePosixPath(sys.prefix), PurePosixPath(sys.base_prefix))

    @property
    def bin_dir(self) -> PurePosixPath:
        return self.prefix / "bin"

    def mount_paths(self) -> tuple[PurePosixPath, ...]:
        """The paths to mount: none under /usr (already there), none nested in another."""
        paths: list[PurePosixPath] = []
        for path in sorted({self.base_prefix, self.prefix}, key=lambda p: (len(p.parts), str(p))):
            if _is_within(path, USR) or any(_is_within(path, p) for p in paths):
                continue
            paths.append(path)
        return tuple(paths)


def system_mounts(python: PythonRuntime) -> tuple[BindMount, ...]:
    return (BindMount(USR, USR), *(BindMount(p, p) for p in python.mount_paths()))


def sandbox_env(python: PythonRuntime) -> tuple[str, ...]:
    path = SYSTEM_PATH
    if not _is_within(python.bin_dir, USR):
        path = f"{python.bin_dir}:{path}"
    return (
        f"PATH={path}",
        f"HOME={SANDBOX_CWD}",
        "LANG=C.UTF-8",
        "PYTHONDONTWRITEBYTECODE=1",
        f"REQUESTS_CA_BUNDLE={CA_BUNDLE}",
        f"SSL_CERT_FILE={CA_BUNDLE}",
    )


@dataclass(frozen=True, slots=True)
class SandboxSpec:
    """Everything that decides one sandbox's OCI config."""

    args: tuple[str, ...]
    netns_path: PurePosixPath
    rootfs: PurePosixPath
    python: PythonRuntime
    mounts: tuple[BindMount, ...] = ()
    hostname: str = SANDBOX_HOSTNAME
    extra_env: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "args", tuple(self.args))
        object.__setattr__(self, "mounts", tuple(self.mounts))
        object.__setattr__(self, "extra_env", tuple(self.extra_env))
        if not self.args or any(not isinstance(a, str) or "\0" in a for a in self.args):
            raise SandboxError("bad_bundle", "args must be a non-empty list of strings")
        if not self.args[0]:
            raise SandboxError("bad_bundle", "the command must not be empty")
        if not PurePosixPath(self.netns_path).is_absolute():
            raise SandboxError("bad_bundle", f"netns path {self.netns_path} is not absolute")
        if not PurePosixPath(self.rootfs).is_absolute():
            raise SandboxError("bad_bundle", f"rootfs {self.rootfs} is not absolute")
        for entry in self.extra_env:
            name, sep, _ = entry.partition("=")
            if not sep or not name or "\0" in entry:
                raise SandboxError("bad_bundle", f"env entry {entry!r}: expected NAME=VALUE")
        _check_mounts(self.mounts, self.python)

    def bind_mounts(self) -> tuple[BindMount, ...]:
        """Every bind mount, system ones first, each after any mount it lies within."""
        return (*system_mounts(self.python), *self.mounts)


def _check_mounts(mounts: Sequence[BindMount], python: PythonRuntime) -> None:
    taken: list[PurePosixPath] = [m.destination for m in system_mounts(python)]
    for mount in mounts:
        dst = mount.destination
        for reserved in RESERVED_DESTINATIONS:
            if _is_within(dst, reserved):
                raise SandboxError("bad_mount", f"destination {dst} is reserved ({reserved})")
        for other in taken:
            if _is_within(dst, other) or _is_within(other, dst):
                raise SandboxError("bad_mount", f"destination {dst} overlaps mount {other}")
        taken.append(dst)


def sandbox_can_read(mode: int, uid: int, gid: int) -> bool:
    """Whether the sandbox's user (65534:65534, no other groups, no capabilities) may
    read a file of this mode and owner; a directory also needs x, to be listed and
    entered. Only the mount's source counts: gVisor's gofer opens it for the sandbox,
    so the host directories above it need not be open to the user."""
    need = 0o4 | (0o1 if stat.S_ISDIR(mode) else 0)
    if uid == SANDBOX_UID:
        bits = mode >> 6
    elif gid == SANDBOX_GID:
        bits = mode >> 3
    else:
        bits = mode
    return bits & need == need


def check_sandbox_id(sandbox_id: str) -> str:
    """`sandbox_id` if runsc and the run directory can use it as a name, else SandboxError."""
    if not SANDBOX_ID_RE.fullmatch(sandbox_id):
        raise SandboxError(
            "bad_sandbox_id",
            f"{sandbox_id!r}: expected 1-64 of [A-Za-z0-9_.-], not starting with . _ -",
        )
    return sandbox_id


def netns_path(name: str) -> PurePosixPath:
    """The path of a named network namespace (`ip netns add NAME`)."""
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise SandboxError("bad_bundle", f"netns name {name!r} is not a plain name")
    return PurePosixPath(NETNS_DIR, name)


def build_config(spec: SandboxSpec) -> dict[str, Any]:
    """The OCI runtime config (config.json) of `spec`."""
    no_caps: list[str] = []
    return {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": False,
            "user": {"uid": SANDBOX_UID, "gid": SANDBOX_GID, "additionalGids": []},
            "args": list(spec.args),
            "env": [*sandbox_env(spec.python), *spec.extra_env],
            "cwd": SANDBOX_CWD,
            "capabilities": {
                "bounding": list(no_caps),
                "effective": list(no_caps),
                "inheritable": list(no_caps),
                "permitted": list(no_caps),
                "ambient": list(no_caps),
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": NOFILE_LIMIT, "soft": NOFILE_LIMIT}],
            "noNewPrivileges": True,
        },
        "root": {"path": str(spec.rootfs), "readonly": True},
        "hostname": spec.hostname,
        "mounts": [
            *(dict(m, options=list(m.get("options", []))) for m in KERNEL_MOUNTS),
            dict(TMP_MOUNT, options=list(TMP_MOUNT["options"])),
            *(m.to_oci() for m in spec.bind_mounts()),
        ],
        "linux": {
            "namespaces": [
                {"type": "pid"},
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "mount"},
                {"type": "network", "path": str(spec.netns_path)},
            ],
        },
    }


def special_mount_points() -> tuple[PurePosixPath, ...]:
    """Directories the root must hold for gVisor's own filesystems and /tmp.

    Bind mounts need theirs too (a directory or a file, like the source):
    `SandboxSpec.bind_mounts()` lists them.
    """
    return tuple(PurePosixPath(m["destination"]) for m in (*KERNEL_MOUNTS, TMP_MOUNT))


@dataclass(frozen=True, slots=True)
class SandboxPaths:
    """Where one sandbox's files live under the run directory (DESIGN.md's `--run-dir`).

    | path | what |
    |---|---|
    | `RUN/runsc/` | runsc's state root (`runsc --root`), shared by all sandboxes |
    | `RUN/sandboxes/ID/` | the bundle: config.json + rootfs/; removed after the run |
    | `RUN/logs/runsc/ID/` | runsc's own logs; removed with the sandbox (`--keep-logs` keeps them) |
    """

    run_dir: Path
    sandbox_id: str

    def __post_init__(self) -> None:
        check_sandbox_id(self.sandbox_id)

    @property
    def runsc_root(self) -> Path:
        return self.run_dir / "runsc"

    @property
    def bundle_dir(self) -> Path:
        return self.run_dir / "sandboxes" / self.sandbox_id

    @property
    def log_root(self) -> Path:
        return self.run_dir / "logs" / "runsc"
