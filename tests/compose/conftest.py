"""The compose fleet under test: built and brought up once per module, torn down always.

The fleet runs under its own compose project name (`egressd-test-<pid>-<hex>`),
so it never touches a developer's `egressd` project; the finalizer runs
`down -v` even when a test or the start-up fails. Docker's networks are
`internal: true`: nothing the test starts can route off the machine.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from egressd.metrics_text import matching, parse

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SUBNETS = ("198.18.0.0/24", "203.0.113.0/24")
#: The secret the fleet's proxies hold (the local topology's test secret's name).
CREDENTIAL = "allowed-api-token"
# The compose command, as deploy/lib.sh picks it: EGRESSD_COMPOSE, else docker-compose.
COMPOSE = (os.environ.get("EGRESSD_COMPOSE") or "docker-compose").split()


def run(
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        argv, capture_output=True, text=True, env=env, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return done


def docker_available() -> str | None:
    """None if docker and compose can be used (starting dockerd if needed), else why not."""
    if shutil.which("docker") is None or shutil.which(COMPOSE[0]) is None:
        return "docker / docker-compose not installed (apt-get install docker.io docker-compose debootstrap)"
    done = subprocess.run(
        ["bash", "-c", f"source {DEPLOY / 'lib.sh'} && ensure_dockerd"],
        capture_output=True,
        text=True,
        check=False,
    )
    return None if done.returncode == 0 else f"dockerd not usable: {done.stderr.strip()[-500:]}"


def networks_holding_our_subnets() -> list[str]:
    names = run(["docker", "network", "ls", "-q"]).stdout.split()
    if not names:
        return []
    out = run(["docker", "network", "inspect", *names]).stdout
    busy = []
    for net in json.loads(out):
        for cfg in (net.get("IPAM") or {}).get("Config") or []:
            if cfg.get("Subnet") in SUBNETS:
                busy.append(f"{net['Name']} ({cfg['Subnet']})")
    return busy


@dataclass
class ComposeFleet:
    project: str
    env: dict[str, str]
    log: Path
    timings: dict[str, float] = field(default_factory=dict)

    def compose(
        self, *args: str, timeout: float = 300, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        argv = [*COMPOSE, "-p", self.project, "-f", str(DEPLOY / "compose.yaml"), *args]
        return run(argv, env=self.env, timeout=timeout, check=check)

    def containers(self, service: str | None = None, *, all_states: bool = False) -> list[str]:
        filters = ["--filter", f"label=com.docker.compose.project={self.project}"]
        if service is not None:
            filters += ["--filter", f"label=com.docker.compose.service={service}"]
        flags = ["-a"] if all_states else []
        return run(["docker", "ps", "-q", *flags, *filters]).stdout.split()

    def service(self, cid: str) -> str:
        fmt = '{{index .Config.Labels "com.docker.compose.service"}}'
        return run(["docker", "inspect", "-f", fmt, cid]).stdout.strip()

    def state(self, cid: str) -> tuple[str, str, str]:
        fmt = "{{.Name}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}"
        name, status, health = run(["docker", "inspect", "-f", fmt, cid]).stdout.split()
        return name.lstrip("/"), status, health

    def wait_healthy(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        pending: list[str] = []
        while time.monotonic() < deadline:
            states = [self.state(c) for c in self.containers()]
            pending = [f"{n}:{s}/{h}" for n, s, h in states if s != "running" or h != "healthy"]
            if states and not pending:
                return
            time.sleep(1)
        raise AssertionError(f"not healthy after {timeout:.0f}s: {pending}")

    def node(self) -> str:
        (cid,) = self.containers("node")
        return cid

    def exec(
        self, cid: str, *argv: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return run(["docker", "exec", cid, *argv], timeout=timeout, check=check)

    def udf(
        self, udf: str, *args: str, allow: tuple[str, ...], job_id: str
    ) -> subprocess.CompletedProcess[str]:
        """Sign a policy at the control plane and run UDF in a gVisor sandbox on the node."""
        allows = [f"--allow={a}" for a in allow]
        return self.exec(
            self.node(),
            "python3",
            "-m",
            "egressd_harness.deploy",
            "udf",
            *allows,
            "--job-id",
            job_id,
            udf,
            *args,
            timeout=180,
            check=False,
        )

    def node_metrics(self) -> str:
        return self.exec(
            self.node(),
            "python3",
            "-c",
            "import urllib.request as u; print(u.urlopen('http://198.18.0.11:9090/metrics', timeout=5).read().decode())",
        ).stdout

    def proxy_events(self, job_id: str) -> dict[str, list[dict[str, object]]]:
        """Audit events of `job_id`, per proxy container (from its log, `docker logs`)."""
        out: dict[str, list[dict[str, object]]] = {}
        for cid in self.containers("proxy", all_states=True):
            name = self.state(cid)[0]
            logs = run(["docker", "logs", cid]).stderr
            events = []
            for line in logs.splitlines():
                if job_id not in line:
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("job_id") == job_id and event.get("event") in ("dns", "connection"):
                    events.append(event)
            out[name] = events
        return out


def metric(text: str, name: str, **labels: str) -> float | None:
    """The first sample of `name` whose labels include `labels`; None if there is none."""
    return next((s.value for s in matching(parse(text), name, **labels)), None)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposeFleet]:
    why = docker_available()
    if why is not None:
        pytest.fail(why)
    busy = networks_holding_our_subnets()
    if busy:
        pytest.fail(
            f"another compose fleet holds the fleet's subnets: {busy}; run deploy/down.sh first"
        )
    project = f"egressd-test-{os.getpid()}-{secrets.token_hex(3)}"
    env = {
        **os.environ,
        "EGRESSD_PROJECT": project,
        "EGRESSD_UP_TIMEOUT": "300",
        "EGRESSD_WRITE_ENV": "0",
        # Prometheus too (deploy/prometheus): the test checks it scrapes every member.
        "EGRESSD_PROFILES": "monitoring",
    }
    # The proxies' credentials (compose secret egressd-credentials): a test secret
    # of this run, never in the repository's deploy/credentials/.
    credentials = tmp_path_factory.mktemp("credentials")
    (credentials / CREDENTIAL).write_text(f"egd-compose-{secrets.token_urlsafe(24)}\n")
    env["EGRESSD_CREDENTIALS_DIR"] = str(credentials)
    log = tmp_path_factory.mktemp("compose") / "up.log"
    fleet = ComposeFleet(project, env, log)
    try:
        start = time.monotonic()
        with log.open("w") as out:
            done = subprocess.run(
                [str(DEPLOY / "up.sh")],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                timeout=720,
                check=False,
            )
        fleet.timings["build_and_up_s"] = time.monotonic() - start
        if done.returncode != 0:
            tail = log.read_text()[-4000:]
            raise AssertionError(f"deploy/up.sh exited {done.returncode}; last output:\n{tail}")
        env["EGRESSD_TAG"] = _tag(log)
        yield fleet
    finally:
        subprocess.run(
            [
                *COMPOSE,
                "-p",
                project,
                "-f",
                str(DEPLOY / "compose.yaml"),
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
            ],
            env={**env, "EGRESSD_TAG": env.get("EGRESSD_TAG", "latest")},
            capture_output=True,
            timeout=180,
            check=False,
        )
        print(f"compose fleet {project}: {fleet.timings}")


def _tag(log: Path) -> str:
    match = re.search(r"images: egressd\*:(\w+)", log.read_text())
    assert match, "up.sh did not name the image tag"
    return match.group(1)
