"""The sandbox launcher with the real runsc: network, isolation, exit codes, clean-up.

Everything lives in network namespaces this module creates (`egd-t<hex>-...`):

    egd-t<hex>-node   "node": the host end of each sandbox's veth, 100.96.9.1/24,
                      an HTTP (8000) and HTTPS (8443, test CA) server
    egd-t<hex>-s<n>   one per test: the sandbox end, 100.96.9.10/24, MTU
                      SANDBOX_MTU, default route via .1

runsc consumes the sandbox end's address and routes (it moves them into its
netstack), so every launch gets a fresh sandbox namespace, as in production.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import io
import ipaddress
import itertools
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from egressd.layout import SANDBOX_MTU, SANDBOX_SUPERNET
from egressd.sandbox import SandboxError
from egressd.sandbox.bundle import BindMount, SandboxPaths
from egressd.sandbox.rootfs import mounts_under, write_bundle
from egressd.sandbox.runsc import SandboxLauncher
from tests.support.processes import stop_process

REPO = Path(__file__).resolve().parents[2]
UDFS = REPO / "sandbox" / "udfs"
SUBNET = ipaddress.IPv4Network("100.96.9.0/24")
GATEWAY = SUBNET.network_address + 1
SANDBOX_ADDR = SUBNET.network_address + 10
HTTP_PORT = 8000
HTTPS_PORT = 8443
INDEX_BODY = b"hello from the egressd runsc test\n" * 10

pytestmark = pytest.mark.root("runsc", "ip", "nsenter", "unshare", "setpriv")

# The servers in the node namespace: plain HTTP and HTTPS (test CA) on the same
# document root; writes READY once both listen.
SERVERS = r"""
import functools, http.server, ssl, sys, threading
root, cert, key, ready, http_port, https_port = sys.argv[1:7]
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=root)
plain = http.server.ThreadingHTTPServer(("0.0.0.0", int(http_port)), handler)
tls = http.server.ThreadingHTTPServer(("0.0.0.0", int(https_port)), handler)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
tls.socket = ctx.wrap_socket(tls.socket, server_side=True)
threading.Thread(target=tls.serve_forever, daemon=True).start()
open(ready, "w").close()
plain.serve_forever()
"""


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def ip_quiet(*args: str) -> None:
    subprocess.run(["ip", *args], check=False, capture_output=True, timeout=30)


def assert_ok(condition: bool, message: str) -> None:
    if not condition:
        pytest.fail(message)


@dataclass(frozen=True)
class ServerCA:
    ca_pem: bytes
    cert_file: Path
    key_file: Path


def make_ca(directory: Path) -> ServerCA:
    """A test CA and a server certificate for the gateway address, signed by it."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "egressd runsc test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(GATEWAY))]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(GATEWAY)]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .add_extension(x509.ExtendedKeyUsage([x509.OID_SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_file = directory / "server.pem"
    key_file = directory / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ServerCA(ca.public_bytes(serialization.Encoding.PEM), cert_file, key_file)


@dataclass
class Node:
    suffix: str
    netns: str
    run_dir: Path
    ca: ServerCA
    launcher: SandboxLauncher
    counter: Iterator[int]

    def next_id(self) -> int:
        return next(self.counter)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    assert SUBNET.subnet_of(SANDBOX_SUPERNET)
    suffix = secrets.token_hex(2)
    netns = f"egd-t{suffix}-node"
    base = tmp_path_factory.mktemp("runsc")
    run_dir = base / "run"
    docroot = base / "www"
    docroot.mkdir()
    (docroot / "index.html").write_bytes(INDEX_BODY)
    ca = make_ca(base)
    launcher = SandboxLauncher(run_dir / "runsc")
    server: subprocess.Popen[bytes] | None = None
    ip("netns", "add", netns)
    try:
        ip("-n", netns, "link", "set", "lo", "up")
        ready = base / "ready"
        with (base / "servers.log").open("wb") as server_log:
            server = subprocess.Popen(
                [
                    "nsenter",
                    f"--net=/run/netns/{netns}",
                    "--",
                    sys.executable,
                    "-c",
                    SERVERS,
                    str(docroot),
                    str(ca.cert_file),
                    str(ca.key_file),
                    str(ready),
                    str(HTTP_PORT),
                    str(HTTPS_PORT),
                ],
                stdout=subprocess.DEVNULL,
                stderr=server_log,
            )
        deadline = time.monotonic() + 15
        while not ready.exists():
            assert server.poll() is None, (base / "servers.log").read_text()
            assert time.monotonic() < deadline, "test servers did not start"
            time.sleep(0.05)
        yield Node(suffix, netns, run_dir, ca, launcher, itertools.count(1))
    finally:
        stop_process(server, 10)
        _delete_leftover_containers(launcher)
        ip_quiet("netns", "del", netns)


def _delete_leftover_containers(launcher: SandboxLauncher) -> None:
    if not launcher.runsc_root.exists():
        return
    for sandbox_id in asyncio.run(launcher.list_ids()):
        asyncio.run(launcher.delete(sandbox_id))


@dataclass(frozen=True)
class SandboxNet:
    netns: str
    host_if: str


@pytest.fixture
def sandbox_net(node: Node) -> Iterator[SandboxNet]:
    """A fresh sandbox namespace whose veth peer sits in the node namespace."""
    n = node.next_id()
    netns = f"egd-t{node.suffix}-s{n}"
    host_if, sbx_if = f"egdt{node.suffix}h{n}", f"egdt{node.suffix}s{n}"
    assert len(host_if) <= 15 and len(sbx_if) <= 15
    ip("netns", "add", netns)
    try:
        ip(
            "link",
            "add",
            host_if,
            "netns",
            node.netns,
            "type",
            "veth",
            "peer",
            "name",
            sbx_if,
            "netns",
            netns,
        )
        ip("-n", node.netns, "addr", "add", f"{GATEWAY}/{SUBNET.prefixlen}", "dev", host_if)
        ip("-n", node.netns, "link", "set", host_if, "up")
        ip("-n", netns, "link", "set", "lo", "up")
        ip("-n", netns, "link", "set", sbx_if, "mtu", str(SANDBOX_MTU))
        ip("-n", netns, "addr", "add", f"{SANDBOX_ADDR}/{SUBNET.prefixlen}", "dev", sbx_if)
        ip("-n", netns, "link", "set", sbx_if, "up")
        ip("-n", netns, "route", "add", "default", "via", str(GATEWAY))
        yield SandboxNet(netns, host_if)
    finally:
        ip_quiet("-n", node.netns, "link", "del", host_if)
        ip_quiet("netns", "del", netns)


@dataclass(frozen=True)
class Result:
    sandbox_id: str
    rc: int
    stdout: bytes
    stderr: bytes
    elapsed: float

    def json_lines(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.stdout.decode().splitlines() if line]


def prepare(node: Node, net: SandboxNet, args: Sequence[str], **kwargs: object) -> SandboxPaths:
    paths = SandboxPaths(node.run_dir, f"t{node.suffix}-{node.next_id()}")
    write_bundle(
        paths.bundle_dir,
        args=args,
        netns_name=net.netns,
        extra_ca_pem=node.ca.ca_pem,
        **kwargs,  # type: ignore[arg-type]
    )
    return paths


async def run(
    node: Node,
    net: SandboxNet,
    args: Sequence[str],
    *,
    timeout: float = 60,
    mounts: Sequence[BindMount] = (),
) -> Result:
    paths = prepare(node, net, args, mounts=tuple(mounts))
    out, err = io.BytesIO(), io.BytesIO()
    start = time.monotonic()
    rc = await node.launcher.run(
        paths.sandbox_id, paths.bundle_dir, net.netns, stdout=out, stderr=err, timeout=timeout
    )
    elapsed = time.monotonic() - start
    assert not paths.bundle_dir.exists(), "bundle left behind"
    return Result(paths.sandbox_id, rc, out.getvalue(), err.getvalue(), elapsed)


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline.split(b"\0"):
            found.append(int(entry.name))
    return found


async def assert_gone(node: Node, sandbox_id: str) -> None:
    assert sandbox_id not in await node.launcher.list_ids()
    assert mounts_under(node.run_dir) == []
    assert processes_mentioning(sandbox_id) == []
    assert not SandboxPaths(node.run_dir, sandbox_id).bundle_dir.exists()
    assert not [p for p in node.launcher.runsc_root.iterdir() if sandbox_id in p.name]
    assert not node.launcher.log_dir(sandbox_id).exists(), "runsc's logs left behind"


# -- (1) network -------------------------------------------------------------


async def test_requests_reaches_the_node_over_http(node: Node, sandbox_net: SandboxNet) -> None:
    code = f"import requests; print(requests.get('http://{GATEWAY}:{HTTP_PORT}/').status_code)"
    result = await run(node, sandbox_net, ["python", "-c", code])
    assert (result.rc, result.stdout, result.stderr) == (0, b"200\n", b"")


async def test_requests_verifies_https_with_the_test_ca(
    node: Node, sandbox_net: SandboxNet
) -> None:
    code = (
        "import requests, ssl, os; "
        f"r = requests.get('https://{GATEWAY}:{HTTPS_PORT}/index.html'); "
        "print(r.status_code, len(r.content)); "
        "ctx = ssl.create_default_context(); "
        "print(ctx.cert_store_stats()['x509_ca'] > 1)"
    )
    result = await run(node, sandbox_net, ["python", "-c", code])
    assert result.stderr == b""
    assert result.stdout.decode().split() == ["200", str(len(INDEX_BODY)), "True"]
    assert result.rc == 0


# -- (2) exit code and stderr ------------------------------------------------


async def test_exit_code_and_stderr_are_relayed(node: Node, sandbox_net: SandboxNet) -> None:
    code = "import sys; sys.stdout.write('o'); sys.stderr.write('x'); sys.exit(7)"
    result = await run(node, sandbox_net, ["python", "-c", code])
    assert (result.rc, result.stdout, result.stderr) == (7, b"o", b"x")
    await assert_gone(node, result.sandbox_id)


async def test_large_output_is_relayed_whole(node: Node, sandbox_net: SandboxNet) -> None:
    code = "import sys; sys.stdout.write('y' * 3_000_000); sys.stderr.write('z' * 200_000)"
    result = await run(node, sandbox_net, ["python", "-c", code])
    assert result.rc == 0
    assert result.stdout == b"y" * 3_000_000
    assert result.stderr == b"z" * 200_000


# -- (3) isolation -----------------------------------------------------------

ISOLATION_PROBE = r"""
import json, os
def attempt(fn):
    try:
        fn()
        return "ok"
    except OSError as exc:
        return exc.strerror or type(exc).__name__
def write(path):
    with open(path, "w") as f:
        f.write("x")
def read(path):
    with open(path, "rb") as f:
        f.read()
mounts = [line.split() for line in open("/proc/self/mounts")]
status = dict(
    line.rstrip("\n").split(":\t", 1) for line in open("/proc/self/status") if ":\t" in line
)
print(json.dumps({
    "ids": [os.getuid(), os.geteuid(), os.getgid(), os.getegid(), os.getgroups()],
    "cap_eff": status["CapEff"],
    "cap_bnd": status["CapBnd"],
    "no_new_privs": status.get("NoNewPrivs"),
    "top": sorted(os.listdir("/")),
    "root_dir": sorted(os.listdir("/root")) if os.path.isdir("/root") else None,
    "run": os.path.exists("/run"), "run_egressd": os.path.exists("/run/egressd"),
    "ssh": os.path.exists("/root/.ssh"),
    "home": os.path.exists("/home"),
    "var": os.path.exists("/var"),
    "read_shadow": attempt(lambda: read("/etc/shadow")),
    "etc": sorted(os.listdir("/etc")),
    "resolv": open("/etc/resolv.conf").read(),
    "write_usr": attempt(lambda: write("/usr/x")),
    "write_root": attempt(lambda: write("/x")),
    "write_etc": attempt(lambda: write("/etc/x")),
    "write_venv": attempt(lambda: write(os.path.join(os.environ["PATH"].split(":")[0], "x"))),
    "write_tmp": attempt(lambda: write("/tmp/x")),
    "cwd": os.getcwd(), "home_env": os.environ["HOME"],
    "mounts": {m[1]: m[3].split(",")[0] for m in mounts},
    "fs": {m[1]: m[2] for m in mounts},
}))
"""


async def test_sandbox_sees_only_what_it_needs(node: Node, sandbox_net: SandboxNet) -> None:
    result = await run(node, sandbox_net, ["python", "-c", ISOLATION_PROBE])
    assert result.rc == 0, result.stderr.decode()
    seen = json.loads(result.stdout)
    assert seen["ids"] == [65534, 65534, 65534, 65534, []]
    assert int(seen["cap_eff"], 16) == 0
    assert int(seen["cap_bnd"], 16) == 0
    assert seen["no_new_privs"] in (None, "1")  # gVisor's /proc may not report it
    python_tops = {Path(sys.prefix).parts[1], Path(sys.base_prefix).parts[1]}
    assert set(seen["top"]) == {
        *("bin", "dev", "etc", "lib", "lib64", "proc", "sbin", "sys", "tmp", "usr"),
        *python_tops,
    }
    for hidden in ("run", "run_egressd", "ssh", "home", "var"):
        assert seen[hidden] is False, hidden
    if Path(sys.base_prefix).parts[1] == "root":
        assert seen["root_dir"] == [Path(sys.base_prefix).parts[2]]  # .pyenv, no .ssh
    assert seen["read_shadow"] != "ok"
    assert "shadow" not in seen["etc"]
    assert seen["resolv"] == "nameserver 100.100.100.53\n"
    for place in ("write_usr", "write_root", "write_etc", "write_venv"):
        assert seen[place] != "ok", place
    assert seen["write_tmp"] == "ok"
    assert seen["cwd"] == "/tmp" and seen["home_env"] == "/tmp"
    # Every host file system in the sandbox is read-only; /tmp is a tmpfs.
    for point, fstype in seen["fs"].items():
        if fstype == "9p":
            assert seen["mounts"][point] == "ro", point
    assert seen["fs"]["/tmp"] == "tmpfs"
    assert seen["mounts"]["/"] == "ro"
    assert {p for p, t in seen["fs"].items() if t == "9p"} == {
        "/",
        "/usr",
        sys.prefix,
        sys.base_prefix,
    }


# -- (4) timeout, cancellation and clean-up ----------------------------------


async def test_timeout_kills_and_cleans_up(node: Node, sandbox_net: SandboxNet) -> None:
    paths = prepare(
        node,
        sandbox_net,
        ["python", "-c", "import time; print('up', flush=True); time.sleep(120)"],
    )
    out, err = io.BytesIO(), io.BytesIO()
    start = time.monotonic()
    with pytest.raises(SandboxError) as exc:
        await node.launcher.run(
            paths.sandbox_id, paths.bundle_dir, sandbox_net.netns, stdout=out, stderr=err, timeout=3
        )
    assert exc.value.reason == "timeout"
    assert time.monotonic() - start < 3 + 10
    assert out.getvalue() == b"up\n"
    await assert_gone(node, paths.sandbox_id)


async def test_cancellation_kills_and_cleans_up(node: Node, sandbox_net: SandboxNet) -> None:
    paths = prepare(
        node,
        sandbox_net,
        ["python", "-c", "import time; print('up', flush=True); time.sleep(120)"],
    )
    out = io.BytesIO()
    task = asyncio.create_task(
        node.launcher.run(
            paths.sandbox_id,
            paths.bundle_dir,
            sandbox_net.netns,
            stdout=out,
            stderr=io.BytesIO(),
            timeout=None,
        ),
        name="cancelled-sandbox",
    )
    deadline = time.monotonic() + 30
    while out.getvalue() != b"up\n":
        assert not task.done(), task
        assert time.monotonic() < deadline, "sandbox did not start"
        await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await assert_gone(node, paths.sandbox_id)


def test_run_sync_cleans_up_on_keyboard_interrupt(node: Node, sandbox_net: SandboxNet) -> None:
    """Ctrl-C during `run_sync` (the CLI path): SIGINT to our own process."""
    paths = prepare(
        node,
        sandbox_net,
        ["python", "-c", "import time; print('up', flush=True); time.sleep(120)"],
    )

    class Trigger(io.BytesIO):
        def write(self, data: bytes) -> int:  # type: ignore[override]
            if b"up" in data:
                os.kill(os.getpid(), signal.SIGINT)
            return super().write(data)

    with pytest.raises(KeyboardInterrupt):
        node.launcher.run_sync(
            paths.sandbox_id,
            paths.bundle_dir,
            sandbox_net.netns,
            stdout=Trigger(),
            stderr=io.BytesIO(),
            timeout=60,
        )
    asyncio.run(assert_gone(node, paths.sandbox_id))


async def test_a_live_id_is_never_taken_over(
    node: Node, sandbox_net: SandboxNet, tmp_path: Path
) -> None:
    first = prepare(
        node,
        sandbox_net,
        ["python", "-c", "import time; print('up', flush=True); time.sleep(120)"],
    )
    out = io.BytesIO()
    task = asyncio.create_task(
        node.launcher.run(
            first.sandbox_id,
            first.bundle_dir,
            sandbox_net.netns,
            stdout=out,
            stderr=io.BytesIO(),
            timeout=60,
        ),
        name="first-sandbox",
    )
    try:
        deadline = time.monotonic() + 30
        while out.getvalue() != b"up\n":
            assert not task.done(), task
            assert time.monotonic() < deadline, "sandbox did not start"
            await asyncio.sleep(0.05)
        other_bundle = tmp_path / "other"
        write_bundle(other_bundle, args=["python", "-c", "pass"], netns_name=sandbox_net.netns)
        with pytest.raises(SandboxError) as exc:
            await node.launcher.run(
                first.sandbox_id,
                other_bundle,
                sandbox_net.netns,
                stdout=io.BytesIO(),
                stderr=io.BytesIO(),
                timeout=30,
            )
        assert exc.value.reason == "sandbox_exists"
        assert other_bundle.exists()  # not ours to remove: nothing was started
        assert first.sandbox_id in await node.launcher.list_ids()
        assert not task.done()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await assert_gone(node, first.sandbox_id)


async def test_netns_other_than_the_bundles_is_refused(node: Node, sandbox_net: SandboxNet) -> None:
    paths = prepare(node, sandbox_net, ["python", "-c", "pass"])
    with pytest.raises(SandboxError) as exc:
        await node.launcher.run(
            paths.sandbox_id,
            paths.bundle_dir,
            f"egd-t{node.suffix}-absent",
            stdout=io.BytesIO(),
            stderr=io.BytesIO(),
            timeout=30,
        )
    assert exc.value.reason == "bad_bundle"  # the bundle names another namespace
    assert not paths.bundle_dir.exists()


async def test_vanished_netns_is_reported(node: Node, sandbox_net: SandboxNet) -> None:
    """The namespace went away after the bundle was written."""
    paths = prepare(node, sandbox_net, ["python", "-c", "pass"])
    ip("-n", node.netns, "link", "del", sandbox_net.host_if)
    ip("netns", "del", sandbox_net.netns)
    with pytest.raises(SandboxError) as exc:
        await node.launcher.run(
            paths.sandbox_id,
            paths.bundle_dir,
            sandbox_net.netns,
            stdout=io.BytesIO(),
            stderr=io.BytesIO(),
            timeout=30,
        )
    assert exc.value.reason == "netns_missing"
    await assert_gone(node, paths.sandbox_id)


async def test_runsc_missing(node: Node, sandbox_net: SandboxNet, tmp_path: Path) -> None:
    paths = prepare(node, sandbox_net, ["python", "-c", "pass"])
    launcher = SandboxLauncher(tmp_path / "runsc", runsc_bin="/nonexistent/runsc")
    with pytest.raises(SandboxError) as exc:
        await launcher.run(
            paths.sandbox_id,
            paths.bundle_dir,
            sandbox_net.netns,
            stdout=io.BytesIO(),
            stderr=io.BytesIO(),
            timeout=30,
        )
    assert exc.value.reason == "runsc_missing"
    assert not paths.bundle_dir.exists()


async def _launch_error(
    node: Node, net: SandboxNet, args: Sequence[str]
) -> tuple[SandboxError, bytes]:
    """The launch error and what reached the caller's stderr (not runsc's fatal line)."""
    paths = prepare(node, net, args)
    err = io.BytesIO()
    with pytest.raises(SandboxError) as exc:
        await node.launcher.run(
            paths.sandbox_id,
            paths.bundle_dir,
            net.netns,
            stdout=io.BytesIO(),
            stderr=err,
            timeout=60,
        )
    await assert_gone(node, paths.sandbox_id)
    return exc.value, err.getvalue()


async def test_a_missing_command_is_command_not_found(node: Node, sandbox_net: SandboxNet) -> None:
    exc, stderr = await _launch_error(node, sandbox_net, ["/no/such/program"])
    assert (exc.reason, exc.detail) == (
        "command_not_found",
        "/no/such/program: no such file in the sandbox",
    )
    assert stderr == b""


async def test_a_command_not_in_path_is_command_not_found(
    node: Node, sandbox_net: SandboxNet
) -> None:
    exc, stderr = await _launch_error(node, sandbox_net, ["no-such-program"])
    assert exc.reason == "command_not_found"
    assert exc.detail.startswith("no-such-program: not found in the sandbox's PATH (")
    assert stderr == b""


async def test_a_file_that_is_no_program_is_command_not_executable(
    node: Node, sandbox_net: SandboxNet
) -> None:
    exc, stderr = await _launch_error(node, sandbox_net, ["/usr/lib/os-release"])
    assert exc.reason == "command_not_executable"
    assert "/usr/lib/os-release" in exc.detail and "permission denied" in exc.detail
    assert stderr == b""


# -- (5) the example UDFs ----------------------------------------------------


async def test_fetch_allowed_udf(node: Node, sandbox_net: SandboxNet) -> None:
    url = f"https://{GATEWAY}:{HTTPS_PORT}/index.html"
    result = await run(
        node,
        sandbox_net,
        ["python", "/udfs/fetch_allowed.py", url],
        mounts=[BindMount(PurePosixPath(UDFS), PurePosixPath("/udfs"))],
    )
    assert result.rc == 0, result.stderr.decode()
    assert result.json_lines() == [
        {
            "url": url,
            "status": 200,
            "bytes": len(INDEX_BODY),
            "sha256": hashlib.sha256(INDEX_BODY).hexdigest(),
        }
    ]


async def test_probe_udf(node: Node, sandbox_net: SandboxNet) -> None:
    targets = [
        f"http://{GATEWAY}:{HTTP_PORT}/",
        f"http://{GATEWAY}:{HTTP_PORT}/missing",
        f"tcp://{GATEWAY}:9",
        "dns:localhost",
    ]
    result = await run(
        node,
        sandbox_net,
        ["python", "/udfs/probe.py", "--timeout", "5", *targets],
        mounts=[BindMount(PurePosixPath(UDFS), PurePosixPath("/udfs"))],
    )
    assert result.rc == 0, result.stderr.decode()
    lines = result.json_lines()
    assert [line["target"] for line in lines] == targets
    assert [line["ok"] for line in lines] == [True, False, False, True]
    assert lines[0]["status"] == 200 and lines[1]["status"] == 404
    assert "ConnectionRefused" in str(lines[2]["error"])
    assert lines[3]["addresses"] == ["127.0.0.1"]


# -- start-up cost -----------------------------------------------------------


async def test_trivial_sandbox_start_to_exit(node: Node, sandbox_net: SandboxNet) -> None:
    result = await run(node, sandbox_net, ["python", "-c", "pass"])
    assert result.rc == 0
    print(f"\nsandbox start-to-exit for `python -c pass`: {result.elapsed * 1000:.0f} ms")
    assert result.elapsed < 10


# -- stdin and the platform (the bench's gVisor row talks to its sandbox so) ----


async def test_stdin_is_passed_and_the_platform_is_runscs_flag(
    node: Node, sandbox_net: SandboxNet
) -> None:
    launcher = SandboxLauncher(
        node.launcher.runsc_root, log_root=node.launcher.log_root, platform="ptrace"
    )
    assert "--platform=ptrace" in launcher._flags("runsc", None, "run")
    paths = prepare(
        node, sandbox_net, ["python", "-c", "import sys; print(sys.stdin.read()[::-1])"]
    )
    r, w = os.pipe()
    os.write(w, b"egressd")
    os.close(w)
    out, err = io.BytesIO(), io.BytesIO()
    with os.fdopen(r, "rb") as stdin:
        rc = await launcher.run(
            paths.sandbox_id,
            paths.bundle_dir,
            sandbox_net.netns,
            stdin=stdin,
            stdout=out,
            stderr=err,
            timeout=60,
        )
    assert (rc, out.getvalue(), err.getvalue()) == (0, b"dsserge\n", b"")
    await assert_gone(node, paths.sandbox_id)
    # Without stdin the command reads /dev/null, as before.
    result = await run(
        node, sandbox_net, ["python", "-c", "import sys; print(len(sys.stdin.read()))"]
    )
    assert (result.rc, result.stdout) == (0, b"0\n")
