"""The sandbox's OCI config and root directory: what the sandbox can and cannot see."""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from egressd.errors import EgressdError
from egressd.layout import RESOLVER
from egressd.sandbox import SandboxError
from egressd.sandbox.bundle import (
    CA_BUNDLE,
    SANDBOX_GID,
    SANDBOX_UID,
    BindMount,
    PythonRuntime,
    SandboxPaths,
    SandboxSpec,
    build_config,
    check_sandbox_id,
    netns_path,
    sandbox_env,
)
from egressd.sandbox.rootfs import etc_files, mounts_under, remove_bundle, write_bundle
from egressd.sandbox.runsc import runsc_errors

PYTHON = PythonRuntime(
    prefix=PurePosixPath("/work/main/.venv"),
    base_prefix=PurePosixPath("/root/.pyenv/versions/3.11.7"),
)
NETNS = PurePosixPath("/run/netns/egd-sbx-abc")
ARGS = ("python", "-c", "print(1)")


def make_spec(**overrides: Any) -> SandboxSpec:
    fields: dict[str, Any] = {
        "args": ARGS,
        "netns_path": NETNS,
        "rootfs": PurePosixPath("/run/egressd/sandboxes/s1/rootfs"),
        "python": PYTHON,
    }
    fields.update(overrides)
    return SandboxSpec(**fields)


def _within(path: str, base: str) -> bool:
    return path == base or path.startswith(base + "/")


def binds(config: dict[str, Any]) -> list[dict[str, Any]]:
    return [m for m in config["mounts"] if m["type"] == "bind"]


def destinations(config: dict[str, Any]) -> list[str]:
    return [m["destination"] for m in config["mounts"]]


@pytest.fixture(scope="module")
def ca_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "egressd unit test CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


# -- the OCI config ----------------------------------------------------------


def test_root_is_readonly_and_the_built_directory() -> None:
    config = build_config(make_spec())
    assert config["root"] == {"path": "/run/egressd/sandboxes/s1/rootfs", "readonly": True}
    assert config["root"]["path"] != "/"


def test_network_namespace_is_the_prepared_one() -> None:
    config = build_config(make_spec())
    namespaces = config["linux"]["namespaces"]
    assert {"type": "network", "path": "/run/netns/egd-sbx-abc"} in namespaces
    assert {ns["type"] for ns in namespaces} == {"pid", "ipc", "uts", "mount", "network"}
    assert "user" not in {ns["type"] for ns in namespaces}


def test_process_is_nobody_without_capabilities() -> None:
    process = build_config(make_spec())["process"]
    assert process["user"] == {"uid": SANDBOX_UID, "gid": SANDBOX_GID, "additionalGids": []}
    assert SANDBOX_UID == SANDBOX_GID == 65534
    assert all(caps == [] for caps in process["capabilities"].values())
    assert set(process["capabilities"]) == {
        "bounding",
        "effective",
        "inheritable",
        "permitted",
        "ambient",
    }
    assert process["noNewPrivileges"] is True
    assert process["terminal"] is False
    assert process["cwd"] == "/tmp"
    assert process["args"] == list(ARGS)


def test_env_points_python_and_requests_at_the_combined_ca_bundle() -> None:
    env = dict(e.split("=", 1) for e in build_config(make_spec())["process"]["env"])
    assert env["REQUESTS_CA_BUNDLE"] == env["SSL_CERT_FILE"] == str(CA_BUNDLE)
    assert str(CA_BUNDLE) == "/etc/ssl/certs/ca-certificates.crt"
    assert env["HOME"] == "/tmp"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PATH"].split(":")[0] == "/work/main/.venv/bin"
    assert "/usr/bin" in env["PATH"].split(":")
    assert not any(k.lower().endswith("_proxy") for k in env)


def test_extra_env_is_appended_and_validated() -> None:
    config = build_config(make_spec(extra_env=("JOB_ID=42",)))
    assert config["process"]["env"][-1] == "JOB_ID=42"
    with pytest.raises(SandboxError) as err:
        make_spec(extra_env=("NOEQUALS",))
    assert err.value.reason == "bad_bundle"


def test_every_bind_mount_is_readonly_and_only_tmp_is_writable() -> None:
    config = build_config(make_spec(mounts=(BindMount.parse("/srv/udfs:/udfs"),)))
    for mount in binds(config):
        assert "ro" in mount["options"], mount
        assert "rw" not in mount["options"], mount
    writable = [
        m["destination"]
        for m in config["mounts"]
        if m["type"] in ("bind", "tmpfs") and "ro" not in m.get("options", [])
    ]
    # /dev is gVisor's own device tmpfs, not a place for data.
    assert sorted(writable) == ["/dev", "/tmp"]
    tmp = next(m for m in config["mounts"] if m["destination"] == "/tmp")
    assert tmp["type"] == "tmpfs"
    assert "mode=1777" in tmp["options"]


def test_binds_are_usr_python_and_callers_only() -> None:
    config = build_config(make_spec(mounts=(BindMount.parse("/srv/udfs:/udfs"),)))
    assert [(m["source"], m["destination"]) for m in binds(config)] == [
        ("/usr", "/usr"),
        ("/work/main/.venv", "/work/main/.venv"),
        ("/root/.pyenv/versions/3.11.7", "/root/.pyenv/versions/3.11.7"),
        ("/srv/udfs", "/udfs"),
    ]


def test_nothing_under_root_but_the_python_paths() -> None:
    config = build_config(make_spec())
    under_root = [d for d in destinations(config) if d == "/root" or d.startswith("/root/")]
    assert under_root == ["/root/.pyenv/versions/3.11.7"]
    sources = [m["source"] for m in binds(config)]
    assert "/" not in sources
    assert not [s for s in sources if s in ("/root", "/root/.ssh", "/etc", "/home", "/var")]


@pytest.mark.parametrize("hidden", ["/run", "/home", "/var", "/mnt", "/opt", "/srv", "/boot"])
def test_host_directories_are_not_mounted(hidden: str) -> None:
    config = build_config(make_spec())
    for mount in config["mounts"]:
        assert not _within(mount["destination"], hidden), mount
        if mount["type"] == "bind":
            assert not _within(mount["source"], hidden), mount


def test_etc_is_generated_not_mounted() -> None:
    config = build_config(make_spec())
    assert not [m for m in config["mounts"] if _within(m["destination"], "/etc")]
    assert not [m for m in binds(config) if _within(m["source"], "/etc")]


def test_kernel_filesystems_are_gvisors_own() -> None:
    config = build_config(make_spec())
    by_dst = {m["destination"]: m for m in config["mounts"]}
    assert by_dst["/proc"]["type"] == "proc"
    assert by_dst["/sys"]["type"] == "sysfs"
    assert "ro" in by_dst["/sys"]["options"]
    assert by_dst["/dev"]["type"] == "tmpfs"


def test_config_is_json_serialisable_and_fresh_each_time() -> None:
    spec = make_spec()
    first = build_config(spec)
    first["mounts"][0].setdefault("options", []).append("mutated")
    second = build_config(spec)
    assert "mutated" not in json.dumps(second)
    assert json.loads(json.dumps(second)) == second


# -- the Python runtime ------------------------------------------------------


def test_python_paths_skip_usr_and_nested_prefixes() -> None:
    system = PythonRuntime(PurePosixPath("/usr"), PurePosixPath("/usr"))
    assert system.mount_paths() == ()
    assert sandbox_env(system)[0] == (
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    )
    nested = PythonRuntime(PurePosixPath("/opt/py/venv"), PurePosixPath("/opt/py"))
    assert nested.mount_paths() == (PurePosixPath("/opt/py"),)
    venv_on_system = PythonRuntime(PurePosixPath("/srv/venv"), PurePosixPath("/usr"))
    assert venv_on_system.mount_paths() == (PurePosixPath("/srv/venv"),)


def test_current_python_is_this_interpreter() -> None:
    current = PythonRuntime.current()
    assert str(current.prefix) == sys.prefix
    assert str(current.base_prefix) == sys.base_prefix


# -- mounts, ids and names ---------------------------------------------------


def test_mount_parse() -> None:
    mount = BindMount.parse("/srv/udfs/:/udfs")
    assert mount == BindMount(PurePosixPath("/srv/udfs"), PurePosixPath("/udfs"))
    relative = BindMount.parse("udfs:/udfs", cwd=PurePosixPath("/work/main/sandbox"))
    assert relative.source == PurePosixPath("/work/main/sandbox/udfs")
    assert mount.to_oci()["options"] == ["bind", "ro", "nosuid", "nodev"]


@pytest.mark.parametrize(
    "text",
    [
        "/srv/udfs",
        "/srv/udfs:",
        ":/udfs",
        "/a:/b:/c",
        "udfs:/udfs",
        "/srv:udfs",
        "/srv:/",
        "/srv:/a/../etc",
        "/srv:/x\0y",
    ],
)
def test_bad_mount_text_is_rejected(text: str) -> None:
    with pytest.raises(SandboxError) as err:
        BindMount.parse(text)
    assert err.value.reason == "bad_mount"
    assert isinstance(err.value, EgressdError)


@pytest.mark.parametrize(
    "destination",
    [
        "/proc",
        "/proc/self",
        "/dev/shm",
        "/sys",
        "/tmp",
        "/tmp/udfs",
        "/etc",
        "/etc/resolv.conf",
        "/usr",
        "/usr/lib/x",
        "/bin",
        "/lib64/x",
        "/work/main/.venv",
        "/work/main/.venv/lib",
        "/work",
        "/root/.pyenv/versions/3.11.7/lib",
        "/root",
    ],
)
def test_reserved_or_overlapping_destinations_are_rejected(destination: str) -> None:
    with pytest.raises(SandboxError) as err:
        make_spec(mounts=(BindMount(PurePosixPath("/srv/x"), PurePosixPath(destination)),))
    assert err.value.reason == "bad_mount"


def test_caller_mounts_must_not_overlap_each_other() -> None:
    with pytest.raises(SandboxError) as err:
        make_spec(mounts=(BindMount.parse("/a:/data"), BindMount.parse("/b:/data/sub")))
    assert err.value.reason == "bad_mount"


@pytest.mark.parametrize("good", ["s1", "job-2b5c1c64.0", "A_b-c.d", "x" * 64])
def test_sandbox_ids_accepted(good: str) -> None:
    assert check_sandbox_id(good) == good


@pytest.mark.parametrize("bad", ["", "-x", ".x", "_x", "a/b", "a b", "..", "x" * 65, "ü"])
def test_sandbox_ids_rejected(bad: str) -> None:
    with pytest.raises(SandboxError) as err:
        check_sandbox_id(bad)
    assert err.value.reason == "bad_sandbox_id"


@pytest.mark.parametrize("bad", ["", "a/b", "..", "."])
def test_netns_names_rejected(bad: str) -> None:
    with pytest.raises(SandboxError):
        netns_path(bad)
    assert netns_path("egd-sbx-1") == PurePosixPath("/run/netns/egd-sbx-1")


def test_empty_command_rejected() -> None:
    for args in ((), ("",)):
        with pytest.raises(SandboxError) as err:
            make_spec(args=args)
        assert err.value.reason == "bad_bundle"


def test_sandbox_paths() -> None:
    paths = SandboxPaths(Path("/run/egressd"), "s1")
    assert paths.runsc_root == Path("/run/egressd/runsc")
    assert paths.bundle_dir == Path("/run/egressd/sandboxes/s1")
    assert paths.log_root == Path("/run/egressd/logs/runsc")
    with pytest.raises(SandboxError):
        SandboxPaths(Path("/run/egressd"), "../x")


# -- the generated /etc ------------------------------------------------------


def test_etc_files(ca_pem: bytes) -> None:
    host = b"-----BEGIN CERTIFICATE-----\nHOST\n-----END CERTIFICATE-----\n"
    etc = etc_files(host_ca_pem=host, extra_ca_pem=ca_pem)
    assert etc["resolv.conf"] == f"nameserver {RESOLVER}\n".encode()
    assert RESOLVER.exploded == "100.100.100.53"
    assert b"hosts:          files dns\n" in etc["nsswitch.conf"]
    assert b"nobody:x:65534:65534:" in etc["passwd"]
    assert b"nogroup:x:65534:" in etc["group"]
    bundle = etc["ssl/certs/ca-certificates.crt"]
    assert bundle.startswith(host)
    assert bundle.endswith(ca_pem)
    assert "shadow" not in etc
    assert "gshadow" not in etc


def test_extra_ca_must_be_a_certificate() -> None:
    with pytest.raises(SandboxError) as err:
        etc_files(host_ca_pem=b"", extra_ca_pem=b"not a pem")
    assert err.value.reason == "ca_invalid"


# -- the bundle on disk ------------------------------------------------------


def test_write_bundle(tmp_path: Path, ca_pem: bytes) -> None:
    udfs = tmp_path / "udfs"
    udfs.mkdir()
    secret_file = tmp_path / "token"
    secret_file.write_text("x")
    bundle = tmp_path / "run" / "sandboxes" / "s1"
    spec = write_bundle(
        bundle,
        args=ARGS,
        netns_name="egd-sbx-abc",
        mounts=(
            BindMount(PurePosixPath(udfs), PurePosixPath("/udfs")),
            BindMount(PurePosixPath(secret_file), PurePosixPath("/data/token")),
        ),
        python=PYTHON,
        extra_ca_pem=ca_pem,
    )
    root = bundle / "rootfs"
    assert spec.rootfs == PurePosixPath(root)
    config = json.loads((bundle / "config.json").read_text())
    assert config == build_config(spec)
    assert config["root"]["path"] == str(root)

    for name, target in (("bin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")):
        assert (root / name).readlink() == Path(target)
    assert [p.name for p in (root / "dev").iterdir()] == ["pts"]
    for point in ("proc", "dev/pts", "sys", "tmp", "usr", "udfs"):
        assert (root / point).is_dir(), point
        assert not any((root / point).iterdir()), point
    assert (root / "data" / "token").is_file()
    assert (root / "data" / "token").stat().st_size == 0
    for prefix in (PYTHON.prefix, PYTHON.base_prefix):
        prefix_point = root.joinpath(*prefix.parts[1:])
        assert prefix_point.is_dir()
        assert not any(prefix_point.iterdir())
    assert sorted(p.name for p in (root / "root").iterdir()) == [".pyenv"]
    assert not (root / "run").exists()
    assert not (root / "home").exists()
    assert not (root / "var").exists()

    etc = root / "etc"
    assert (etc / "resolv.conf").read_text() == "nameserver 100.100.100.53\n"
    assert (etc / "ssl/certs/ca-certificates.crt").read_bytes().endswith(ca_pem)
    assert not (etc / "shadow").exists()
    for path in root.rglob("*"):
        if path.is_symlink():
            continue
        mode = path.stat().st_mode & 0o777
        assert mode in (0o755, 0o644), (path, oct(mode))

    remove_bundle(bundle)
    assert not bundle.exists()
    remove_bundle(bundle)  # idempotent


def test_write_bundle_refuses_an_existing_directory(tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    bundle.mkdir()
    with pytest.raises(SandboxError) as err:
        write_bundle(bundle, args=ARGS, netns_name="n", python=PYTHON)
    assert err.value.reason == "bad_bundle"
    assert bundle.exists()


def test_write_bundle_cleans_up_after_a_bad_mount(tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    with pytest.raises(SandboxError) as err:
        write_bundle(
            bundle,
            args=ARGS,
            netns_name="n",
            python=PYTHON,
            mounts=(BindMount.parse(f"{tmp_path}/missing:/udfs"),),
        )
    assert err.value.reason == "bad_mount"
    assert not bundle.exists()


def test_write_bundle_rejects_a_bad_ca(tmp_path: Path) -> None:
    with pytest.raises(SandboxError) as err:
        write_bundle(tmp_path / "b", args=ARGS, netns_name="n", python=PYTHON, extra_ca_pem=b"x")
    assert err.value.reason == "ca_invalid"
    assert not (tmp_path / "b").exists()


def test_mounts_under_reads_mountinfo(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 0:21 / /proc rw - proc proc rw\n"
        f"90 1 0:50 / {tmp_path}/b/rootfs/usr ro - ext4 /dev/x ro\n"
        f"91 1 0:50 / {tmp_path}/b\\040x rw - tmpfs tmpfs rw\n"
        f"92 1 0:50 / {tmp_path}/bb rw - tmpfs tmpfs rw\n"
    )
    base = tmp_path / "b"
    assert mounts_under(base, info) == [f"{tmp_path}/b/rootfs/usr"]
    assert mounts_under(tmp_path / "b x", info) == [f"{tmp_path}/b x"]


# -- runsc's log -------------------------------------------------------------


def test_runsc_errors_reads_concatenated_json(tmp_path: Path) -> None:
    log = tmp_path / "runsc-run.log"
    assert runsc_errors(log) is None
    log.write_text("")
    assert runsc_errors(log) is None
    log.write_text(
        '{"msg":"root cause","level":"error","time":"t"}'
        '{"msg":"running container: x","level":"error","time":"t"}\n'
        'garbage {"msg":"fine","level":"info"} {not json\n'
    )
    assert runsc_errors(log) == "root cause; running container: x"
