"""`docker compose up`: the whole fleet as containers really comes up and carries traffic.

In order, on one fleet (the module's `fleet` fixture: deploy/up.sh under a
unique project name, `down -v` in a finalizer):

1. every container is healthy, the demo service's ten verdicts included;
2. a UDF with plain `requests` in a gVisor sandbox on the node reaches an
   allowed HTTPS name, carried by the fleet's data path (EGRESSD_DATAPATH,
   kernel by default: tc programs on the node's and the proxy's underlay, the
   proxy's kernel counters);
3. a denied name is blocked, and the proxy's audit log has the event;
4. `--scale proxy=3`: the node discovers the new proxies through the control
   plane and new flows spread over all three;
5. Prometheus (profile `monitoring`) scrapes every member, the three proxies too;
6. one proxy killed: the node marks it down and every new flow succeeds on
   the others;
7. `down -v` leaves no container, network or volume of the project.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from typing import Any

import pytest

from egressd.metrics_text import matching, parse
from tests.compose.conftest import CREDENTIAL, ComposeFleet, run
from tests.support.waits import wait_for

pytestmark = [pytest.mark.compose, pytest.mark.root, pytest.mark.timeout(900)]

ALLOW_API = ("api.allowed.test:443",)


def results(done: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def proxies_up(fleet: ComposeFleet) -> dict[str, float]:
    samples = matching(parse(fleet.node_metrics()), "egressd_proxy_up")
    return {s.labels["proxy"]: s.value for s in samples}


def test_fleet_is_healthy_and_demo_passed(fleet: ComposeFleet) -> None:
    states = [fleet.state(c) for c in fleet.containers()]
    services = sorted(fleet.service(c) for c in fleet.containers())
    assert services == ["control", "demo", "inet", "node", "prometheus", "proxy"]
    assert all(s == "running" and h == "healthy" for _, s, h in states), states
    (demo,) = fleet.containers("demo")
    logs = run(["docker", "logs", demo]).stdout
    assert "10 of 10 verdicts as expected" in logs, logs[-3000:]


def test_allowed_https_through_gvisor(fleet: ComposeFleet) -> None:
    job = str(uuid.uuid4())
    done = fleet.udf(
        "fetch_allowed.py", "https://api.allowed.test/data", allow=ALLOW_API, job_id=job
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (answer,) = results(done)
    assert answer["status"] == 200 and answer["bytes"] > 0
    time.sleep(1.0)  # the connection event is logged when the relay closes
    events = [
        e for evs in fleet.proxy_events(job).values() for e in evs if e["event"] == "connection"
    ]
    assert any(e["verdict"] == "allow" and e["host"] == "api.allowed.test" for e in events), events


def underlay_filters(fleet: ComposeFleet, cid: str) -> str:
    """`tc filter show` of the tc ingress hook of the container's underlay interface."""
    script = (
        "dev=$(ip -o -4 addr show to 198.18.0.0/24 | awk '{print $2; exit}') && "
        'test -n "$dev" && tc filter show dev "$dev" ingress'
    )
    return fleet.exec(cid, "sh", "-c", script).stdout


def proxy_metrics(fleet: ComposeFleet, cid: str) -> str:
    """A proxy's /metrics (its admin port listens on its underlay address), from the node."""
    fmt = "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}"
    ips = run(["docker", "inspect", "-f", fmt, cid]).stdout.split()
    (underlay,) = [ip for ip in ips if ip.startswith("198.18.0.")]
    return fleet.exec(
        fleet.node(),
        "python3",
        "-c",
        "import sys, urllib.request as u; "
        "print(u.urlopen(f'http://{sys.argv[1]}:9090/metrics', timeout=5).read().decode())",
        underlay,
    ).stdout


def test_the_fleet_runs_its_datapath(fleet: ComposeFleet) -> None:
    """Kernel (the default): bpf/node.c on the node's underlay, bpf/proxy.c on each proxy's,
    and the allowed connections above went through the proxies' kernel fast path
    (decapsulated and re-encapsulated in tc, not by the Python endpoint). Userspace: no
    tc program on either underlay."""
    datapath = fleet.env.get("EGRESSD_DATAPATH", "kernel")
    proxies = fleet.containers("proxy")
    node_filters = underlay_filters(fleet, fleet.node())
    proxy_filters = [underlay_filters(fleet, cid) for cid in proxies]
    # tc shows the program's name as the kernel keeps it: its first 15 bytes.
    node_prog, proxy_prog = (
        f"name {prog[:15]} " for prog in ("node_underlay_ingress", "px_ingress")
    )
    if datapath == "userspace":
        assert node_prog not in node_filters, node_filters
        assert not any(proxy_prog in f for f in proxy_filters), proxy_filters
        return
    assert datapath == "kernel", datapath
    assert node_prog in node_filters, node_filters
    assert proxy_filters and all(proxy_prog in f for f in proxy_filters), proxy_filters
    paths: dict[str, float] = {}
    for cid in proxies:
        for sample in matching(parse(proxy_metrics(fleet, cid)), "egressd_kernel_packets_total"):
            path = sample.labels["path"]
            paths[path] = paths.get(path, 0.0) + sample.value
    assert paths.get("fast", 0) > 0 and paths.get("return", 0) > 0, paths


def test_denied_name_blocked_and_audited(fleet: ComposeFleet) -> None:
    job = str(uuid.uuid4())
    done = fleet.udf(
        "fetch_allowed.py", "--timeout", "5", "https://evil.test/", allow=ALLOW_API, job_id=job
    )
    assert done.returncode == 2, done.stdout + done.stderr[-2000:]  # no answer came
    (answer,) = results(done)
    assert "error" in answer and "status" not in answer
    events = [e for evs in fleet.proxy_events(job).values() for e in evs]
    assert any(
        e["event"] == "dns"
        and e["verdict"] == "deny"
        and str(e.get("qname", "")).rstrip(".") == "evil.test"
        for e in events
    ), events
    # HTTPS straight to evil.test's address (no DNS) is denied at the proxy: a
    # reset after the ClientHello, and a connection event.
    job2 = str(uuid.uuid4())
    done = fleet.udf(
        "probe.py", "--timeout", "3", "https://203.0.113.66/", allow=ALLOW_API, job_id=job2
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (attempt,) = results(done)
    assert attempt["ok"] is False
    time.sleep(1.0)
    events = [
        e for evs in fleet.proxy_events(job2).values() for e in evs if e["event"] == "connection"
    ]
    assert any(
        e["verdict"] == "deny" and str(e["dst"]).startswith("203.0.113.66") for e in events
    ), events


def http_events(fleet: ComposeFleet, job_id: str) -> list[dict[str, Any]]:
    """The proxies' `http_request` audit events of `job_id`."""
    found = []
    for cid in fleet.containers("proxy"):
        for line in run(["docker", "logs", cid]).stderr.splitlines():
            if job_id in line and '"http_request"' in line:
                event = json.loads(line)
                if event.get("event") == "http_request" and event.get("job_id") == job_id:
                    found.append(event)
    return found


def test_proxies_hold_the_interception_ca_and_credentials(fleet: ComposeFleet) -> None:
    """The proxies' secrets, as compose provides them: the interception CA from the
    control plane's `interception` volume (an intercepted HTTPS rule: GET allowed,
    a path outside the rule denied with 403; the sandbox trusts the CA), a credential
    from the `egressd-credentials` compose secret (injected: 200, never
    credential_unavailable); the node has neither the key nor the credential."""
    job = str(uuid.uuid4())
    rules = [
        {
            "host": "api.allowed.test",
            "ports": [443],
            "tls": "intercept",
            "http": {"allow": [{"methods": ["GET"], "paths": ["/data"]}]},
        },
        {
            "host": "api.allowed.test",
            "ports": [80],
            "http": {
                "allow": [{"methods": ["GET"], "paths": ["/data"]}],
                "credentials": [
                    {"header": "Authorization", "secret": CREDENTIAL, "format": "Bearer {}"}
                ],
            },
        },
    ]
    done = fleet.exec(
        fleet.node(),
        "python3",
        "-m",
        "egressd_harness.deploy",
        "udf",
        *[f"--rule={json.dumps(r)}" for r in rules],
        "--job-id",
        job,
        "probe.py",
        "--timeout",
        "10",
        "https://api.allowed.test/data",
        "https://api.allowed.test/echo-headers",
        "http://api.allowed.test/data",
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    got = {r["target"]: r for r in results(done)}
    assert got["https://api.allowed.test/data"]["status"] == 200, got
    assert got["https://api.allowed.test/echo-headers"]["status"] == 403, got
    assert got["http://api.allowed.test/data"]["status"] == 200, got
    deadline = time.monotonic() + 10
    while len(events := http_events(fleet, job)) < 3 and time.monotonic() < deadline:
        time.sleep(0.5)
    seen = sorted((e["path"], e["status"], e.get("injected", [])) for e in events)
    assert seen == [
        ("/data", 200, []),
        ("/data", 200, ["Authorization"]),
        ("/echo-headers", 403, []),
    ], events
    # Only the control plane and the proxies have the key; only proxies the credential.
    (proxy,) = fleet.containers("proxy")
    key = fleet.exec(proxy, "cat", "/interception-ca/ca.key").stdout
    assert "PRIVATE KEY" in key
    line = key.splitlines()[1]  # a line of the key's base64 body
    node = fleet.exec(
        fleet.node(),
        "sh",
        "-c",
        f"test ! -e /interception-ca && test ! -e /run/secrets/{CREDENTIAL} "
        f"&& ! grep -rqF -- '{line}' /fleet /run/egressd/ca && echo clean",
        check=False,
    )
    assert node.stdout.strip() == "clean", node.stdout + node.stderr


def test_scale_to_three_proxies_spreads_flows(fleet: ComposeFleet) -> None:
    start = time.monotonic()
    fleet.compose("up", "-d", "--no-recreate", "--scale", "proxy=3")
    fleet.wait_healthy(timeout=120)
    assert len(fleet.containers("proxy")) == 3
    # The node learns them from the control plane's registry, and probes them up.
    wait_for(
        lambda: sorted(proxies_up(fleet).values()) == [1.0, 1.0, 1.0],
        30,
        "node sees 3 proxies up",
        interval=0.5,
    )
    fleet.timings["scale_to_3_s"] = time.monotonic() - start
    job = str(uuid.uuid4())
    targets = ["https://api.allowed.test/data"] * 30
    done = fleet.udf("probe.py", "--timeout", "5", *targets, allow=ALLOW_API, job_id=job)
    assert done.returncode == 0, done.stderr[-2000:]
    attempts = results(done)
    assert len(attempts) == 30 and all(a["ok"] for a in attempts), attempts
    time.sleep(1.5)
    per_proxy = {
        name: sum(1 for e in evs if e["event"] == "connection" and e["verdict"] == "allow")
        for name, evs in fleet.proxy_events(job).items()
    }
    assert sum(per_proxy.values()) == 30, per_proxy
    assert len(per_proxy) == 3 and all(n > 0 for n in per_proxy.values()), per_proxy


def prometheus_api(fleet: ComposeFleet, path: str) -> dict[str, Any]:
    """GET the fleet's Prometheus API (198.18.0.9, profile `monitoring`) from the node."""
    done = fleet.exec(
        fleet.node(),
        "python3",
        "-c",
        "import sys, urllib.request as u; "
        "print(u.urlopen('http://198.18.0.9:9090' + sys.argv[1], timeout=5).read().decode())",
        path,
    )
    body = json.loads(done.stdout)
    assert body["status"] == "success", body
    return body["data"]


def test_prometheus_scrapes_every_member(fleet: ComposeFleet) -> None:
    """Profile `monitoring`: every member with metrics is a healthy target, scaled proxies too."""
    want = {"control": 1, "node": 1, "proxy": len(fleet.containers("proxy"))}
    assert want["proxy"] >= 1
    seen: dict[str, list[tuple[str, str]]] = {}

    def all_up() -> bool:
        seen.clear()
        for target in prometheus_api(fleet, "/api/v1/targets?state=active")["activeTargets"]:
            seen.setdefault(target["labels"]["job"], []).append(
                (target["labels"]["instance"], target["health"])
            )
        return {job: len(ts) for job, ts in seen.items()} == want and all(
            health == "up" for ts in seen.values() for _, health in ts
        )

    try:
        wait_for(all_up, 40, "prometheus scrapes every member", interval=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {seen}") from None
    assert all(i.endswith(":8080") for i, _ in seen["control"]), seen
    assert all(i.endswith(":9090") for j in ("proxy", "node") for i, _ in seen[j]), seen
    # The demo's and the tests' connections are in Prometheus, as the dashboard queries them.
    result = prometheus_api(fleet, "/api/v1/query?query=sum(egressd_connections_total)")["result"]
    assert result and float(result[0]["value"][1]) > 0, result


def test_killed_proxy_fails_over(fleet: ComposeFleet) -> None:
    proxies = fleet.containers("proxy")
    assert len(proxies) == 3
    victim = proxies[0]
    victim_name = fleet.state(victim)[0]
    # SIGKILL: no clean deregistration; the node's health probes must notice.
    run(["docker", "kill", victim])
    up_before = proxies_up(fleet)
    killed = time.monotonic()
    wait_for(
        lambda: sorted(proxies_up(fleet).values()) in ([0.0, 1.0, 1.0], [1.0, 1.0]),
        15,
        "node marks the proxy down",
        interval=0.5,
    )
    fleet.timings["failover_detect_s"] = time.monotonic() - killed
    job = str(uuid.uuid4())
    done = fleet.udf(
        "probe.py",
        "--timeout",
        "5",
        *["https://api.allowed.test/data"] * 15,
        allow=ALLOW_API,
        job_id=job,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    attempts = results(done)
    assert len(attempts) == 15 and all(a["ok"] for a in attempts), (up_before, attempts)
    time.sleep(1.5)
    events = fleet.proxy_events(job)
    assert not events.get(victim_name), events[victim_name]
    assert sum(1 for evs in events.values() for e in evs if e["event"] == "connection") == 15


def test_down_leaves_nothing(fleet: ComposeFleet) -> None:
    fleet.compose(
        "--profile",
        "images",
        "--profile",
        "load",
        "--profile",
        "monitoring",
        "down",
        "-v",
        "--remove-orphans",
        "--timeout",
        "10",
    )
    label = f"label=com.docker.compose.project={fleet.project}"
    assert run(["docker", "ps", "-aq", "--filter", label]).stdout.split() == []
    assert run(["docker", "network", "ls", "-q", "--filter", label]).stdout.split() == []
    assert run(["docker", "volume", "ls", "-q", "--filter", label]).stdout.split() == []
