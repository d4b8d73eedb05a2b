"""deploy/kubernetes: the kustomize base and the example overlay render with a real
kustomize (`kubectl kustomize`, Debian's kubernetes-client), every object validates
against the Kubernetes API schemas offline (kubernetes-validate, strict: an unknown
field is an error), and the fleet's invariants hold: probes on /readyz and
/healthz at the compose fleet's ports, resources, securityContext without
`privileged`, the compose fleet's images and roles."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from egressd.layout import ADMIN_PORT, CONTROL_PORT, UNDERLAY
from egressd_harness.deploy import settings
from tests.support.deploy import compose, image_name
from tests.support.kubernetes import (
    COMPOSE_SERVICE,
    FIELD_VALUES,
    K8S_VERSION,
    TARGETS,
    component,
    containers,
    entry_env,
    one,
    port_number,
    render,
)


@pytest.mark.parametrize("target", TARGETS)
def test_every_object_validates_against_the_api_schemas(target: str) -> None:
    kinds = set()
    for doc in render(target):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        kinds.add(doc["kind"])
    assert {
        "Namespace",
        "Service",
        "StatefulSet",
        "Deployment",
        "DaemonSet",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "RuntimeClass",
        "NetworkPolicy",
    } <= kinds


def test_the_validator_rejects_a_broken_object() -> None:
    """The schema check can fail: a typo'd field and a wrong type are errors."""
    proxy = yaml.safe_load(yaml.safe_dump(one("base", "Deployment", "egressd-proxy")))
    proxy["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(proxy, K8S_VERSION, strict=True)
    proxy = yaml.safe_load(yaml.safe_dump(one("base", "Deployment", "egressd-proxy")))
    proxy["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(proxy, K8S_VERSION, strict=True)


@pytest.mark.parametrize("target", TARGETS)
def test_probes_on_readyz_and_healthz_at_the_admin_port(target: str) -> None:
    seen = set()
    for workload, container in containers(target):
        want = CONTROL_PORT if component(workload) == "control" else ADMIN_PORT
        ready = container["readinessProbe"]["httpGet"]
        live = container["livenessProbe"]["httpGet"]
        assert ready["path"] == "/readyz" and live["path"] == "/healthz", workload["metadata"]
        assert port_number(container, ready["port"]) == want
        assert port_number(container, live["port"]) == want
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == want
        assert annotations["prometheus.io/path"] == "/metrics"
        seen.add(component(workload))
    assert seen == set(COMPOSE_SERVICE)


@pytest.mark.parametrize("target", TARGETS)
def test_every_container_has_requests_and_limits(target: str) -> None:
    for _, container in containers(target):
        resources = container["resources"]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources[kind]), container["name"]


def walk(node: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


@pytest.mark.parametrize("target", TARGETS)
def test_no_privileged_and_capabilities_are_named(target: str) -> None:
    assert ("privileged", True) not in list(walk(list(render(target))))
    caps = {}
    for workload, container in containers(target):
        security = container["securityContext"]
        assert security.get("privileged", False) is False
        assert security["capabilities"]["drop"] == ["ALL"]
        added = set(security["capabilities"].get("add", []))
        caps[component(workload)] = added
        # The API server refuses allowPrivilegeEscalation=false with CAP_SYS_ADMIN.
        if "SYS_ADMIN" in added:
            assert security["allowPrivilegeEscalation"] is True
        else:
            assert security["allowPrivilegeEscalation"] is False
    assert caps["control"] == set()
    assert caps["proxy"] == {"NET_ADMIN", "NET_RAW", "BPF"}
    # The compose proxy's capabilities, and nothing it lacks besides BPF; beyond them the
    # compose proxy has only what its kernel data path needs (SYS_ADMIN: its bpffs, and
    # BPF on a docker that does not know CAP_BPF), which the cluster's proxies, on
    # `datapath: userspace`, do not.
    assert set(compose()["services"]["proxy"]["cap_add"]) - caps["proxy"] == {"SYS_ADMIN"}
    assert {"NET_ADMIN", "BPF", "SYS_ADMIN"} <= caps["node-agent"]
    # The compose node drops SYS_RESOURCE from ALL; so does the agent.
    assert "SYS_RESOURCE" not in caps["node-agent"]
    control = one(target, "StatefulSet", "egressd-control")["spec"]["template"]["spec"]
    assert control["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("target", TARGETS)
def test_images_and_roles_match_the_compose_fleet(target: str) -> None:
    services = compose()["services"]
    for workload, container in containers(target):
        service = services[COMPOSE_SERVICE[component(workload)]]
        assert image_name(container["image"]) == image_name(service["image"])
        if component(workload) != "control":  # control runs `egressd control serve` itself
            assert container["args"] == service["command"]
        ports = {p["containerPort"] for p in container["ports"]}
        assert (CONTROL_PORT if component(workload) == "control" else ADMIN_PORT) in ports


def test_overlay_pins_images_and_scales_proxies() -> None:
    for _, container in containers("overlays/example"):
        assert container["image"].startswith("registry.example.com/egressd/")
        assert container["image"].endswith(":0.1.0")
    assert one("overlays/example", "Deployment", "egressd-proxy")["spec"]["replicas"] == 3
    hpa = one("overlays/example", "HorizontalPodAutoscaler", "egressd-proxy")
    assert hpa["spec"]["minReplicas"] == 3
    policy = one("overlays/example", "NetworkPolicy", "sandbox-only-via-node-agent")
    assert "10.244.0.0/16" in policy["spec"]["egress"][1]["to"][0]["ipBlock"]["except"]


@pytest.mark.parametrize("target", TARGETS)
def test_proxies_spread_over_hosts_with_a_budget_and_cpu_autoscaling(target: str) -> None:
    proxy = one(target, "Deployment", "egressd-proxy")
    selector = proxy["spec"]["selector"]["matchLabels"]
    (term,) = proxy["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"] == selector
    pdb = one(target, "PodDisruptionBudget", "egressd-proxy")
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    assert 0 < pdb["spec"]["minAvailable"] < proxy["spec"]["replicas"]
    hpa = one(target, "HorizontalPodAutoscaler", "egressd-proxy")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "egressd-proxy",
    }
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    service = one(target, "Service", "egressd-proxy")
    assert service["spec"]["selector"] == selector
    assert [p["port"] for p in service["spec"]["ports"]] == [ADMIN_PORT]


@pytest.mark.parametrize("target", TARGETS)
def test_control_plane_state_and_secrets(target: str) -> None:
    control = one(target, "StatefulSet", "egressd-control")
    (claim,) = control["spec"]["volumeClaimTemplates"]
    pod = control["spec"]["template"]["spec"]
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert claim["metadata"]["name"] in mounts
    secrets = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert secrets == {"egressd-signing-key", "egressd-admin-token"}
    args = pod["containers"][0]["args"]
    assert f"--listen=0.0.0.0:{CONTROL_PORT}" in args
    assert "--key=/run/secrets/signing/signing.key" in args
    # ... copied there from the Secret volumes by the init container, 0600.
    (init,) = pod["initContainers"]
    assert {m["name"] for m in init["volumeMounts"]} == {"signing-key", "admin-token", "secrets"}
    assert "install -m 0600" in init["args"][0]
    assert init["securityContext"]["capabilities"]["drop"] == ["ALL"]
    service = one(target, "Service", "egressd-control")
    assert [p["port"] for p in service["spec"]["ports"]] == [CONTROL_PORT]


@pytest.mark.parametrize("target", TARGETS)
def test_node_agent_host_network_and_host_paths(target: str) -> None:
    agent = one(target, "DaemonSet", "egressd-node-agent")["spec"]["template"]["spec"]
    assert agent["hostNetwork"] is True
    host_paths = {v["hostPath"]["path"] for v in agent["volumes"] if "hostPath" in v}
    assert {"/sys/fs/bpf", "/run/netns", "/dev/net/tun"} <= host_paths
    mounted = {m["mountPath"] for m in agent["containers"][0]["volumeMounts"]}
    assert {"/sys/fs/bpf", "/run/netns", "/dev/net/tun"} <= mounted
    # Only the agent is on the host's network or sees host paths (the proxy: the TUN device).
    for workload, _ in containers(target):
        pod = workload["spec"]["template"]["spec"]
        if component(workload) == "node-agent":
            continue
        assert not pod.get("hostNetwork", False)
        paths = {v["hostPath"]["path"] for v in pod.get("volumes", []) if "hostPath" in v}
        assert paths <= {"/dev/net/tun"}, paths


@pytest.mark.parametrize("target", TARGETS)
def test_sandboxes_runtime_class_and_network_policy(target: str) -> None:
    runtime = one(target, "RuntimeClass", "egressd-gvisor")
    assert runtime["handler"] == "runsc"
    agent = one(target, "DaemonSet", "egressd-node-agent")["spec"]["template"]["spec"]
    # Sandboxes land only where a node agent runs.
    assert runtime["scheduling"]["nodeSelector"].items() <= agent["nodeSelector"].items()
    policy = one(target, "NetworkPolicy", "sandbox-only-via-node-agent")
    assert policy["metadata"]["namespace"] == "egressd-sandboxes"
    assert policy["spec"]["podSelector"] == {}
    assert sorted(policy["spec"]["policyTypes"]) == ["Egress", "Ingress"]
    assert not policy["spec"].get("ingress")
    resolver, outside = policy["spec"]["egress"]
    assert resolver["to"] == [{"ipBlock": {"cidr": "100.100.100.53/32"}}]
    assert {p["port"] for p in resolver["ports"]} == {53}
    excluded = set(outside["to"][0]["ipBlock"]["except"])
    # The metadata service, the CGNAT range the sandbox CIDRs live in, the underlay.
    assert {"169.254.0.0/16", "100.64.0.0/10", "198.18.0.0/15"} <= excluded


# --- what the entry code reads from the environment (egressd_harness.deploy.settings) ----------

# The modules `python -m egressd_harness.deploy proxy|node` runs (demo and loadgen are compose-only).
ENTRY_MODULES = ("entry.py", "settings.py", "jobs.py")
# Read by the entry code, left unset on the cluster: their defaults are right there.
CLUSTER_DEFAULTS = {
    "EGRESSD_RUN_DIR": "/run/egressd: the agent's hostPath `state`; the proxy's own file system",
    "EGRESSD_LOG_DIR": "/var/log/egressd: the container's file system (root fs writable)",
    "EGRESSD_UDFS": "/opt/egressd/app/sandbox/udfs: shipped in the egressd-node image",
}
# What the downward API gives each variable (role -> variable -> fieldPath).
FIELD_REFS = {
    "proxy": {
        "EGRESSD_UNDERLAY_ADDRESS": "status.podIP",
        "EGRESSD_EGRESS_ADDRESS": "status.podIP",
        "EGRESSD_PROXY_NAME": "metadata.name",
    },
    "node": {"EGRESSD_UNDERLAY_ADDRESS": "status.podIP", "EGRESSD_NODE_NAME": "spec.nodeName"},
}
# Plausible downward-API values, to feed the rendered env through the real reader.


def entry_variables() -> set[str]:
    """Every EGRESSD_* string literal in the entry modules (what they can read)."""
    import ast

    from egressd_harness.deploy import entry

    found = set()
    for name in ENTRY_MODULES:
        tree = ast.parse((Path(entry.__file__).parent / name).read_text())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and re.fullmatch(r"EGRESSD_[A-Z][A-Z_]*", node.value)
            ):
                found.add(node.value)
    return found


def test_the_entry_variables_are_found() -> None:
    """The scan sees what the code reads (else the checks below would pass on nothing)."""
    found = entry_variables()
    fleet_dir = {"EGRESSD_FLEET_DIR"}
    assert set(settings.VARIABLES) | set(CLUSTER_DEFAULTS) | fleet_dir | set(settings.LOAD) == found
    assert set(settings.DIRECTORIES) == set(CLUSTER_DEFAULTS) | fleet_dir


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("role", ["proxy", "node"])
def test_every_variable_the_entry_code_reads_is_set_or_right_by_default(
    target: str, role: str
) -> None:
    env = {e["name"]: e for e in entry_env(target, role)}
    read = entry_variables()
    # No typo: everything set is something the entry code reads.
    assert set(env) <= read, set(env) - read
    # Every setting the role uses is set: the compose defaults are DESIGN.md's addresses.
    assert set(settings.ROLE_VARIABLES[role]) <= set(env)
    # The load generator's (settings.LOAD) are read by the compose-only loadgen role.
    unset = read - set(env) - set(settings.VARIABLES) - set(settings.LOAD)
    assert unset <= set(CLUSTER_DEFAULTS), unset
    for name, path in FIELD_REFS[role].items():
        assert env[name]["valueFrom"]["fieldRef"]["fieldPath"] == path
    config = one(target, "ConfigMap", "egressd-fleet")
    for name in ("EGRESSD_CONTROL_URL", "EGRESSD_UNDERLAY_RANGES"):
        ref = env[name]["valueFrom"]["configMapKeyRef"]
        assert ref["name"] == "egressd-fleet" and ref["key"] in config["data"]
        assert ref.get("optional") is not True


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("role", ["proxy", "node"])
def test_the_rendered_environment_parses(target: str, role: str) -> None:
    """What a pod would get, through the entry code's own reader."""
    data = one(target, "ConfigMap", "egressd-fleet")["data"]
    values = {}
    for item in entry_env(target, role):
        source = item.get("valueFrom", {})
        if "value" in item:
            values[item["name"]] = item["value"]
        elif "fieldRef" in source:
            values[item["name"]] = FIELD_VALUES[source["fieldRef"]["fieldPath"]]
        else:
            values[item["name"]] = data[source["configMapKeyRef"]["key"]]
    got = settings.from_env(values)
    # The control plane by its Service's name and port, in the control plane's namespace.
    service = one(target, "Service", "egressd-control")
    url = urlsplit(got.control_url)
    assert url.hostname == f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc"
    assert url.port == service["spec"]["ports"][0]["port"] == CONTROL_PORT
    # The cluster's ranges are denied to sandboxes; so is the compose underlay's
    # replacement: the pod IP the member registers lies inside them.
    assert got.underlay is not None
    assert any(got.underlay in net for net in got.underlay_ranges)
    assert got.underlay_ranges != (UNDERLAY,)


def test_overlay_fleet_ranges_match_its_network_policy() -> None:
    ranges = one("overlays/example", "ConfigMap", "egressd-fleet")["data"]["underlay-ranges"]
    policy = one("overlays/example", "NetworkPolicy", "sandbox-only-via-node-agent")
    excluded = set(policy["spec"]["egress"][1]["to"][0]["ipBlock"]["except"])
    assert set(ranges.split(",")) <= excluded
