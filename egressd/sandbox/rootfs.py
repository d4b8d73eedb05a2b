"""Write a sandbox's OCI bundle to disk, and remove it again.

A bundle is `BUNDLE/config.json` plus `BUNDLE/rootfs/`, the root directory:

    rootfs/
      bin -> usr/bin, lib -> usr/lib, lib64 -> usr/lib64, sbin -> usr/sbin
      usr/ proc/ dev/ sys/ tmp/              empty mount points
      <python prefixes>/  <caller mounts>    empty mount points (dir or file)
      etc/                                   generated, see `etc_files`

Nothing of the host is copied in except a few public, non-secret files under
/etc (`HOST_ETC_COPIES`); everything else reaches the sandbox as a read-only
bind mount named in config.json.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

from cryptography import x509

from egressd.layout import RESOLVER
from egressd.sandbox import SandboxError
from egressd.sandbox.bundle import (
    CA_BUNDLE,
    CONFIG_NAME,
    MERGED_USR_LINKS,
    ROOTFS_NAME,
    SANDBOX_GID,
    SANDBOX_HOSTNAME,
    SANDBOX_UID,
    BindMount,
    PythonRuntime,
    SandboxSpec,
    build_config,
    netns_path,
    special_mount_points,
)

HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# Public files of the host's /etc that a Python program may look at; none
# holds a secret. Missing ones are skipped.
HOST_ETC_COPIES: tuple[str, ...] = ("ld.so.cache", "ssl/openssl.cnf", "services", "protocols")
HOST_ETC_LINKS: tuple[tuple[str, str], ...] = (("os-release", "../usr/lib/os-release"),)
DIR_MODE = 0o755
FILE_MODE = 0o644


def _pem_certificates(pem: bytes, what: str) -> bytes:
    """`pem` if it holds at least one well-formed X.509 certificate, else SandboxError."""
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise SandboxError("ca_invalid", f"{what}: not PEM certificates: {exc}") from exc
    if not certs:
        raise SandboxError("ca_invalid", f"{what}: no certificate")
    return pem if pem.endswith(b"\n") else pem + b"\n"


def etc_files(
    *, host_ca_pem: bytes, extra_ca_pem: bytes | None, hostname: str = SANDBOX_HOSTNAME
) -> dict[str, bytes]:
    """The generated /etc, relative path -> content. Pure."""
    ca = host_ca_pem if host_ca_pem.endswith(b"\n") or not host_ca_pem else host_ca_pem + b"\n"
    if extra_ca_pem is not None:
        ca += _pem_certificates(extra_ca_pem, "extra CA")
    return {
        "passwd": (
            "root:x:0:0:root:/root:/usr/sbin/nologin\n"
            f"nobody:x:{SANDBOX_UID}:{SANDBOX_GID}:nobody:/nonexistent:/usr/sbin/nologin\n"
        ).encode(),
        "group": f"root:x:0:\nnogroup:x:{SANDBOX_GID}:\n".encode(),
        "hostname": f"{hostname}\n".encode(),
        "hosts": (
            "127.0.0.1\tlocalhost\n"
            f"127.0.1.1\t{hostname}\n"
            "::1\tlocalhost ip6-localhost ip6-loopback\n"
        ).encode(),
        "resolv.conf": f"nameserver {RESOLVER}\n".encode(),
        "nsswitch.conf": (
            b"passwd:         files\n"
            b"group:          files\n"
            b"shadow:         files\n"
            b"hosts:          files dns\n"
            b"networks:       files\n"
            b"protocols:      files\n"
            b"services:       files\n"
        ),
        str(CA_BUNDLE.relative_to("/etc")): ca,
    }


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(FILE_MODE)


def _inside(root: Path, dst: PurePosixPath) -> Path:
    return root.joinpath(*dst.parts[1:])


def _make_dirs(root: Path, rel: PurePosixPath) -> Path:
    """mkdir -p of `rel` under `root`, never through a symlink."""
    path = root
    for part in rel.parts[1:]:
        path = path / part
        if path.is_symlink():
            raise SandboxError("bad_mount", f"mount point {rel} passes through a symlink")
        if not path.exists():
            path.mkdir(mode=DIR_MODE)
            path.chmod(DIR_MODE)
    return path


def _make_mount_point(root: Path, mount: BindMount) -> None:
    source = Path(mount.source)
    try:
        is_dir = source.resolve(strict=True).is_dir()
    except OSError as exc:
        raise SandboxError("bad_mount", f"source {source}: {exc.strerror or exc}") from exc
    if is_dir:
        _make_dirs(root, mount.destination)
        return
    parent = _make_dirs(root, mount.destination.parent)
    target = parent / mount.destination.name
    if not target.exists():
        target.touch(mode=FILE_MODE)


def populate_rootfs(
    root: Path, spec: SandboxSpec, etc: Mapping[str, bytes], *, host_etc: Path = Path("/etc")
) -> None:
    """Fill the empty directory `root`: symlinks, mount points, /etc."""
    root.chmod(DIR_MODE)
    for name, target in MERGED_USR_LINKS:
        (root / name).symlink_to(target)
    for point in special_mount_points():
        _make_dirs(root, point)
    for mount in spec.bind_mounts():
        _make_mount_point(root, mount)
    etc_dir = _make_dirs(root, PurePosixPath("/etc"))
    for rel, data in etc.items():
        _write(etc_dir / rel, data)
    for rel in HOST_ETC_COPIES:
        src = host_etc / rel
        if src.is_file():
            _write(etc_dir / rel, src.read_bytes())
    for name, target in HOST_ETC_LINKS:
        (etc_dir / name).symlink_to(target)


def write_bundle(
    bundle_dir: Path,
    *,
    args: Sequence[str],
    netns_name: str,
    mounts: Sequence[BindMount] = (),
    python: PythonRuntime | None = None,
    extra_ca_pem: bytes | None = None,
    host_ca_bundle: Path = HOST_CA_BUNDLE,
    extra_env: Sequence[str] = (),
) -> SandboxSpec:
    """Create `bundle_dir` (it must not exist) with its root and config.json.

    On any failure the partly written directory is removed again.
    """
    spec = SandboxSpec(
        args=tuple(args),
        netns_path=netns_path(netns_name),
        rootfs=PurePosixPath(bundle_dir.absolute() / ROOTFS_NAME),
        python=python if python is not None else PythonRuntime.current(),
        mounts=tuple(mounts),
        extra_env=tuple(extra_env),
    )
    try:
        host_ca = host_ca_bundle.read_bytes()
    except OSError as exc:
        raise SandboxError("ca_invalid", f"{host_ca_bundle}: {exc.strerror or exc}") from exc
    etc = etc_files(host_ca_pem=host_ca, extra_ca_pem=extra_ca_pem, hostname=spec.hostname)
    bundle_dir.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    try:
        bundle_dir.mkdir(mode=0o700)
    except FileExistsError as exc:
        raise SandboxError("bad_bundle", f"{bundle_dir} already exists") from exc
    try:
        root = bundle_dir / ROOTFS_NAME
        root.mkdir()
        populate_rootfs(root, spec, etc)
        config = json.dumps(build_config(spec), indent=2) + "\n"
        (bundle_dir / CONFIG_NAME).write_text(config)
    except BaseException:
        remove_bundle(bundle_dir)
        raise
    return spec


def _unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    out: list[str] = []
    i = 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_under(path: Path, mountinfo: Path = Path("/proc/self/mountinfo")) -> list[str]:
    """Mount points at or below `path` in this process's mount namespace."""
    base = os.path.realpath(path)
    found: list[str] = []
    for line in mountinfo.read_text().splitlines():
        fields = line.split(" ")
        if len(fields) < 5:
            continue
        point = _unescape_mountinfo(fields[4])
        if point == base or point.startswith(base.rstrip("/") + "/"):
            found.append(point)
    return found


def remove_bundle(bundle_dir: Path) -> None:
    """Remove a bundle directory; refuses while anything is mounted below it."""
    if not bundle_dir.exists() and not bundle_dir.is_symlink():
        return
    busy = mounts_under(bundle_dir)
    if busy:
        raise SandboxError("cleanup_failed", f"{bundle_dir}: still mounted: {', '.join(busy)}")
    try:
        shutil.rmtree(bundle_dir)
    except OSError as exc:
        raise SandboxError("cleanup_failed", f"{bundle_dir}: {exc}") from exc
