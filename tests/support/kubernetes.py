"""deploy/kubernetes rendered by a real kustomize (`kubectl kustomize`), as plain data."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from typing import Any

import pytest
import yaml

from tests.support.deploy import DEPLOY

K8S = DEPLOY / "kubernetes"
# The schema version the manifests are written for (kubernetes-validate ships it).
K8S_VERSION = "1.32"
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet")
# component label -> the compose service running the same image and role
COMPOSE_SERVICE = {"control": "control", "proxy": "proxy", "node-agent": "node"}


@cache
def render(target: str) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl missing: `make deps` installs Debian's kubernetes-client")
    done = subprocess.run(
        [kubectl, "kustomize", str(K8S / target)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    docs = tuple(d for d in yaml.safe_load_all(done.stdout) if d)
    assert docs, f"{target} rendered nothing"
    return docs


def objects(target: str, kind: str | None = None) -> list[dict[str, Any]]:
    return [d for d in render(target) if kind is None or d["kind"] == kind]


def one(target: str, kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in objects(target, kind) if d["metadata"]["name"] == name]
    return found


def containers(target: str) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for workload in objects(target):
        if workload["kind"] in WORKLOADS:
            for container in workload["spec"]["template"]["spec"]["containers"]:
                yield workload, container


def component(workload: dict[str, Any]) -> str:
    return workload["metadata"]["labels"]["app.kubernetes.io/component"]


def port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(number)


TARGETS = ["base", "overlays/example"]

FIELD_VALUES = {
    "status.podIP": "10.244.1.7",
    "metadata.name": "egressd-proxy-5d8f7c9b4-x2kqz",
    "spec.nodeName": "worker-1",
}


def entry_env(target: str, role: str) -> list[dict[str, Any]]:
    (container,) = [c for w, c in containers(target) if COMPOSE_SERVICE[component(w)] == role]
    return list(container["env"])
