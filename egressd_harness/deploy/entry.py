"""Container entry points of the compose fleet (`deploy/compose.yaml`).

    python -m egressd_harness.deploy ROLE        # control | inet | proxy | node | demo | loadgen
    python -m egressd_harness.deploy health ROLE # the compose healthcheck of ROLE

Each role prepares what the local topology's `Fleet` prepares for that member
(the same functions: `Fleet.proxy_config`, `Fleet.agent_config`, keys, test CA,
admin token) and runs the same daemon (`egressd control|proxy|agent|inet serve`).
What differs from the namespaces topology:

* Addresses: docker assigns them. The control plane has a fixed underlay
  address (198.18.0.2, DESIGN.md's), the node 198.18.0.11; proxies are
  scalable, so each one reads its underlay and egress addresses from its
  interfaces and is named after its underlay address (`proxy-21` for
  198.18.0.21): a restarted proxy keeps its name, and a name never moves to
  another address.
* Elsewhere (deploy/kubernetes) the same roles take their addresses, names,
  the control plane's URL and the fleet's ranges from EGRESSD_* variables
  (`egressd_harness.deploy.settings`, read once by `env()`); unset, each one is the
  compose fleet's value above.
* Registration: proxies and nodes register themselves with the control plane
  (PUT /v1/proxies|nodes/NAME with the admin token) before their daemon
  starts; a proxy that stops cleanly deregisters (DELETE). Node agents learn
  the proxy list from the control plane (`discovery` in the agent config).
  With EGRESSD_SANDBOX_CIDR=auto (deploy/kubernetes: every pod of a
  DaemonSet has the same environment) the node's agent config says
  `"sandbox_cidr": "auto"` and the agent registers itself at start, getting
  its CIDR from the control plane's pool (`egressd.agent.registration`); the
  entry code registers nothing then.
* Shared files: the control plane makes the fleet's material once, in its
  own volume (the signing key never leaves it) and publishes the public parts
  in the `fleet` volume mounted at /fleet in every container: `keys/`
  (public JWKs), `ca/` (the test CA and the internet's server certificate,
  and `interception-ca.pem`, the TLS interception CA's certificate that
  sandboxes trust), `admin-token`. Each container's run directory
  /run/egressd links `keys` and `ca` there.
* Proxies' secrets (`settings.proxy_secret_keys`): the interception CA's
  certificate and key go to the `interception` volume at /interception-ca,
  mounted by the control plane and the proxies only (nodes, hence sandboxes,
  never see the key); credentials are the compose secret
  `egressd-credentials` (a directory, deploy/credentials/) mounted by proxies
  only. deploy/kubernetes mounts both from Secrets and names the paths in
  EGRESSD_* variables.
* Data path: proxies and nodes run EGRESSD_DATAPATH (`env().datapath`, `kernel` unless
  `userspace` is asked for; `member_fleet`), with the images' prebuilt eBPF objects
  seeded into their caches (`seed_bpf_cache`, `egressd_harness.deploy.bpf_objects`).
* Logs: each daemon's JSON log lines go to the container's stderr (`docker
  logs`) and to /var/log/egressd/NAME.log in the `logs` volume, where the
  demo reads the proxies' audit events.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from egressd.atomicfile import write_atomic
from egressd.control.interception_ca import ca_dir, ensure_interception_ca
from egressd.layout import (
    CONTROL_ADDR,
    CONTROL_PORT,
    INET_DNS,
    INTERNET,
    METADATA,
    SANDBOX_SUPERNET,
    Layout,
    NodeSpec,
    ProxySpec,
    default_layout,
)
from egressd.policy import keys
from egressd_harness.deploy import bpf_objects, settings
from egressd_harness.deploy.health import (
    JOBS_PORT,
    WAIT_S,
    address_in,
    addresses,
    env,
    underlay_address,
)
from egressd_harness.topology import ca, interception
from egressd_harness.topology.fleet import Fleet

DISCOVERY_INTERVAL_S = 2.0
# Where the images keep the eBPF objects built at image build time (the Dockerfiles' `bpf`
# stage, `bpf_objects`): copied into each daemon's cache at start, so no daemon runs clang
# (the images have none).
PREBUILT_BPF = Path("/opt/egressd/bpf-cache")


def log(msg: str, **fields: object) -> None:
    print(json.dumps({"event": msg, "component": "entry", **fields}), file=sys.stderr, flush=True)


def layout(
    nodes: tuple[NodeSpec, ...] = (),
    proxies: tuple[ProxySpec, ...] = (),
    fleet_ranges: tuple[ipaddress.IPv4Network, ...] | None = None,
) -> Layout:
    """The default layout's sites, with this container's members only and the fleet's
    ranges (`env().fleet_ranges` unless given)."""
    base = default_layout(env().run_dir)
    return Layout(
        nodes=nodes,
        proxies=proxies,
        sites=base.sites,
        run_dir=env().run_dir,
        fleet_ranges=env().fleet_ranges if fleet_ranges is None else fleet_ranges,
    )


def member_fleet(members: Layout) -> Fleet:
    """The `Fleet` a role prepares its member from: the fleet's data path
    (`env().datapath`, EGRESSD_DATAPATH) decides its config's `datapath` and `offload`."""
    return Fleet(members, datapath=env().datapath)


# --- addresses ---------------------------------------------------------------------


def resolve_ipv4(host: str) -> ipaddress.IPv4Address:
    """`host`'s first IPv4 address, retried until WAIT_S (cluster DNS may lag at start)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
            return ipaddress.IPv4Address(infos[0][4][0])
        except OSError as exc:
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"entry: cannot resolve control plane host {host!r}: {exc}"
                ) from exc
        time.sleep(0.5)


# --- the control plane ------------------------------------------------------------------


def admin_token() -> str:
    return wait_file(env().fleet_dir / "admin-token").read_text().strip()


def wait_file(path: Path) -> Path:
    deadline = time.monotonic() + WAIT_S
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"entry: {path} did not appear (is the control service up?)")
        time.sleep(0.2)
    return path


def control(
    method: str, path: str, body: dict[str, Any] | None = None, *, timeout: float = 5.0
) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(env().control_url + path, data=data, method=method)
    req.add_header("Authorization", f"Bearer {admin_token()}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


def register(kind: str, name: str, body: dict[str, str]) -> None:
    """PUT /v1/{kind}/{name}, retried until the control plane answers (it may be starting)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            control("PUT", f"/v1/{kind}/{name}", body)
            log("registered", kind=kind, name=name, **body)
            return
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode(errors="replace")
            if exc.code < 500 or time.monotonic() > deadline:
                raise SystemExit(f"entry: PUT /v1/{kind}/{name}: {exc.code} {detail}") from exc
        except OSError as exc:
            if time.monotonic() > deadline:
                raise SystemExit(f"entry: control plane unreachable: {exc}") from exc
        time.sleep(0.5)


def link_fleet_dirs() -> None:
    """/run/egressd/{keys,ca} -> /fleet/{keys,ca} (public keys and the test CA)."""
    env().run_dir.mkdir(parents=True, exist_ok=True)
    env().run_dir.chmod(0o755)
    for sub in ("keys", "ca"):
        wait_file(env().fleet_dir / sub)
        link = env().run_dir / sub
        if link.is_symlink() or not link.exists():
            link.unlink(missing_ok=True)
            link.symlink_to(env().fleet_dir / sub)
    for sub in ("logs", "config", "agents"):
        (env().run_dir / sub).mkdir(exist_ok=True)


# --- running a daemon ---------------------------------------------------------------------


def supervise(name: str, argv: list[str], *, on_exit: list[Any] | None = None) -> int:
    """Run `argv`, copy its stderr to ours and to the log directory's NAME.log, forward
    SIGTERM/SIGINT."""
    env().log_dir.mkdir(parents=True, exist_ok=True)
    log("starting", name=name, argv=argv)
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE)

    def forward(signum: int, _frame: object) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)

    def copy() -> None:
        assert proc.stderr is not None
        with (env().log_dir / f"{name}.log").open("ab", buffering=0) as out:
            for line in proc.stderr:
                sys.stderr.buffer.write(line)
                sys.stderr.buffer.flush()
                out.write(line)

    copier = threading.Thread(target=copy, daemon=True)
    copier.start()
    code = proc.wait()
    copier.join(timeout=5)
    log("exited", name=name, code=code)
    for action in on_exit or []:
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - best effort at shutdown
            log("on_exit_failed", name=name, error=str(exc))
    return code


def egressd(*args: str) -> list[str]:
    return [sys.executable, "-m", "egressd", *args]


# --- roles ----------------------------------------------------------------------------------


def role_control() -> int:
    fleet = member_fleet(layout())
    env().run_dir.mkdir(parents=True, exist_ok=True)
    (env().run_dir / "control").mkdir(exist_ok=True)
    if not fleet.signing_key.exists():
        keys.write_key_dir(fleet.keys_dir, keys.generate_signing_key())
    if not fleet.admin_token_file.exists():
        import secrets

        fleet.admin_token_file.touch(mode=0o600)
        fleet.admin_token_file.write_text(secrets.token_urlsafe(32) + "\n")
    # Publish the public parts: public JWKs, the test CA, the admin token.
    (env().fleet_dir / "keys").mkdir(parents=True, exist_ok=True)
    for jwk in fleet.keys_dir.glob("*.jwk"):
        shutil.copy2(jwk, env().fleet_dir / "keys" / jwk.name)
    ca.ensure_ca(env().fleet_dir / "ca", fleet.layout)
    publish_interception_ca()
    token = env().fleet_dir / "admin-token"
    tmp = token.with_suffix(".tmp")
    shutil.copy2(fleet.admin_token_file, tmp)
    tmp.chmod(0o600)
    tmp.replace(token)
    argv = egressd(
        "control",
        "serve",
        "--state-dir",
        str(env().run_dir / "control"),
        "--key",
        str(fleet.signing_key),
        "--admin-token-file",
        str(fleet.admin_token_file),
        "--listen",
        f"{CONTROL_ADDR}:{CONTROL_PORT}",
    )
    return supervise("control", argv)


def publish_interception_ca() -> None:
    """The TLS interception CA, made in the control plane's state directory (as
    the control plane does at start): its certificate to /fleet/ca for
    sandboxes, certificate and key where proxies read them
    (EGRESSD_INTERCEPTION_CA_CERT/KEY: the `interception` volume, which nodes
    do not mount; deploy/kubernetes mounts the pair from a Secret instead)."""
    files = ensure_interception_ca(ca_dir(env().run_dir / "control"))
    cert = files.cert.read_bytes()
    write_atomic(env().fleet_dir / "ca" / interception.PUBLIC_CERT, cert, mode=0o644)
    cert_path, key_path = env().interception_ca_cert, env().interception_ca_key
    for path in {cert_path.parent, key_path.parent}:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    # The key first: a proxy that finds both files finds a matching pair.
    write_atomic(key_path, files.key.read_bytes(), mode=0o600)
    write_atomic(cert_path, cert, mode=0o644)


def role_inet() -> int:
    """The internet's addresses on this container's interface, then `egressd inet serve`."""
    ifname, _ = address_in(INTERNET)
    wanted = sorted({site.address for site in layout().sites} | {INET_DNS})
    have = {iface.ip for _, iface in addresses()}
    for addr in wanted:
        if addr not in have:
            subprocess.run(["ip", "addr", "add", f"{addr}/32", "dev", ifname], check=True)
    if METADATA not in have:
        subprocess.run(["ip", "addr", "add", f"{METADATA}/32", "dev", "lo"], check=True)
    wait_file(env().fleet_dir / "ca" / "server.pem")
    return supervise("inet", egressd("inet", "serve", "--run-dir", str(env().fleet_dir)))


def proxy_name(underlay: ipaddress.IPv4Address) -> str:
    return f"proxy-{int(underlay) & 0xFF}"


def proxy_spec() -> ProxySpec:
    underlay = underlay_address()
    egress = env().egress or address_in(INTERNET)[1]
    return ProxySpec(env().proxy_name or proxy_name(underlay), underlay, egress)


def proxy_config(fleet: Fleet, spec: ProxySpec) -> dict[str, Any]:
    config = fleet.proxy_config(spec)
    config["control_url"] = settings.by_address(env().control_url, resolve_ipv4)
    # The local topology's paths (its run directory) do not exist here.
    for key in ("secrets_dir", "interception_ca", "upstream_ca_file"):
        config.pop(key, None)
    config.update(settings.proxy_secret_keys(env()))
    if "interception_ca" not in config:
        # No Secret (yet): rules with "tls": "intercept" are denied here
        # (tls_interception_unavailable) until the proxy restarts with one.
        log(
            "interception_ca_absent",
            cert=str(env().interception_ca_cert),
            key=str(env().interception_ca_key),
        )
    if not env().secrets_dir.is_dir():
        log("secrets_dir_absent", secrets_dir=str(env().secrets_dir))
    if config["control_url"] != env().control_url:
        log("control_url_resolved", control_url=env().control_url, used=config["control_url"])
    return config


def role_proxy() -> int:
    spec = proxy_spec()
    fleet = member_fleet(layout(proxies=(spec,)))
    link_fleet_dirs()
    config = fleet.config_path(spec.name)
    body = proxy_config(fleet, spec)
    config.write_text(json.dumps(body, indent=2) + "\n")
    seed_bpf_cache(Path(str(body["state_dir"])))
    register("proxies", spec.name, {"underlay": str(spec.underlay), "egress": str(spec.egress)})

    def deregister() -> None:
        control("DELETE", f"/v1/proxies/{spec.name}", timeout=2.0)
        log("deregistered", kind="proxies", name=spec.name)

    return supervise(
        spec.name, egressd("proxy", "serve", "--config", str(config)), on_exit=[deregister]
    )


def node_spec() -> NodeSpec:
    """This node. With EGRESSD_SANDBOX_CIDR=auto its CIDR is known only once the agent
    has registered: the spec then carries the sandbox supernet it will lie in, and
    `agent_config` writes "auto" (nothing here uses the spec's CIDR beyond that)."""
    cidr = env().sandbox_cidr
    return NodeSpec(env().node_name, underlay_address(), SANDBOX_SUPERNET if cidr is None else cidr)


def agent_config(fleet: Fleet, spec: NodeSpec) -> dict[str, Any]:
    config = fleet.agent_config(spec)
    # Proxies come from the control plane's registry (the static list is empty).
    config["discovery"] = {"control_url": env().control_url, "interval_s": DISCOVERY_INTERVAL_S}
    if env().sandbox_cidr is None:
        config["sandbox_cidr"] = settings.SANDBOX_CIDR_AUTO
        config["registration"] = {
            "admin_token_file": str(env().fleet_dir / "admin-token"),
            "wait_s": WAIT_S,
        }
    return config


def seed_bpf_cache(state_dir: Path) -> None:
    """Put the image's prebuilt eBPF objects where the daemon looks (``state_dir/cache``):
    the images have no compiler, and clang at start would be slow anyway."""
    copied = bpf_objects.seed(PREBUILT_BPF, state_dir / "cache")
    log("bpf_objects_seeded", state_dir=str(state_dir), objects=copied, datapath=env().datapath)


def writable_proc_sys() -> None:
    """Docker mounts /proc/sys read-only; the agent writes sysctls in the sandboxes'
    namespaces (IPv6 off, rp_filter). With CAP_SYS_ADMIN the node remounts it
    read-write in its own mount namespace (what `--security-opt systempaths=unconfined`
    does in the docker CLI, which compose v1 cannot pass)."""
    done = subprocess.run(
        ["mount", "-o", "remount,rw", "/proc/sys"], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        log("proc_sys_readonly", detail=done.stderr.strip())


def start_node() -> tuple[Fleet, NodeSpec, Path]:
    env()  # a bad EGRESSD_* value stops the node here, before it changes anything
    writable_proc_sys()
    spec = node_spec()
    fleet = member_fleet(layout(nodes=(spec,)))
    link_fleet_dirs()
    config = fleet.config_path(spec.name)
    body = agent_config(fleet, spec)
    config.write_text(json.dumps(body, indent=2) + "\n")
    seed_bpf_cache(Path(str(body["state_dir"])))
    if env().sandbox_cidr is None:
        wait_file(env().fleet_dir / "admin-token")  # the agent registers itself with it
        log("sandbox_cidr_auto", name=spec.name, control_url=env().control_url)
    else:
        register(
            "nodes",
            spec.name,
            {"underlay": str(spec.underlay), "sandbox_cidr": str(spec.sandbox_cidr)},
        )
    return fleet, spec, config


def role_node() -> int:
    fleet, spec, config = start_node()
    from egressd_harness.deploy import jobs

    server = jobs.start_in_thread(
        spec, fleet.run_dir, (str(spec.underlay), JOBS_PORT), admin_token()
    )
    try:
        return supervise(spec.name, egressd("agent", "serve", "--config", str(config)))
    finally:
        server.shutdown()


def role_udf(argv: list[str]) -> int:
    """`python -m egressd_harness.deploy udf [--allow HOST:PORT,...]... [--rule JSON]... [--job-id ID]
    UDF ARGS...`, in a node.

    Has the control plane sign a policy for this node (the given host rules;
    `--rule` takes a whole egress rule, `http` and `tls` included),
    runs the UDF (a file of sandbox/udfs) in a gVisor sandbox here, passes its
    stdout through, and returns its exit code. For operators and the compose test.
    """
    import argparse
    import tempfile
    import uuid

    from egressd_harness.deploy import jobs

    parser = argparse.ArgumentParser(prog="python -m egressd_harness.deploy udf")
    parser.add_argument("--allow", action="append", default=[], metavar="HOST:PORT[,PORT]")
    parser.add_argument("--rule", action="append", default=[], type=json.loads, metavar="JSON")
    parser.add_argument("--job-id", default=None)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("udf")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    node = env().node_name
    job_id = args.job_id or str(uuid.uuid4())
    egress = []
    for rule in args.allow:
        host, _, ports = rule.partition(":")
        egress.append({"host": host, "ports": [int(p) for p in (ports or "443").split(",")]})
    egress.extend(args.rule)  # checked by the control plane, which signs nothing invalid
    payload = {"v": 1, "job_id": job_id, "account": "compose", "nodes": [node], "egress": egress}
    jws = str(control("PUT", f"/v1/jobs/{job_id}/policy", payload)["jws"])
    log("udf_job", job_id=job_id, node=node)
    with tempfile.NamedTemporaryFile("w", suffix=".jws", dir=env().run_dir / "config") as fh:
        fh.write(jws + "\n")
        fh.flush()
        argv_ = jobs.sandbox_argv(
            node, env().run_dir, Path(fh.name), args.udf, args.args, args.timeout
        )
        return subprocess.run(argv_, check=False).returncode


# --- health checks ---------------------------------------------------------------------------
