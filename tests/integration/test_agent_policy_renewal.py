"""A sandbox outlives its first policy copy: a real agent (`egressd agent serve`) renews the
held copy from a real control plane (`egressd control serve --policy-ttl 60`, the smallest
TTL it accepts) ahead of its exp (`egressd.agent.policy_watch`, renewal).

Same topology as `test_agent_live_policies` (namespaces ``egd-t<run id>...``, no proxies:
tier 1's per-sandbox counters tell how a frame was decided). One sandbox runs for
~95 s on a policy signed for 60 s: without renewal the agent withdraws it at the first
copy's exp plus the 30 s verification leeway, and its SYNs drop as ``no_policy``.

Takes about 100 s.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator

import pytest

from egressd.policy.jws import DEFAULT_LEEWAY_S, policy_digest
from egressd.policy.keys import generate_signing_key
from tests.support.agent_control import JOB, Env, bring_up, count, policy_body, syn, tear_down
from tests.support.agent_fleet import metric
from tests.support.root import AGENT_NEEDS

pytestmark = pytest.mark.root(*AGENT_NEEDS)

TTL_S = 60  # egressd.control.config.MIN_POLICY_TTL_S
EXPIRY_TICK_S = 1.0  # egressd.agent.service.EXPIRY_INTERVAL_S
RENEWALS = "egressd_agent_policy_renewals_total"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = f"egd-t{secrets.token_hex(3)}"
    root = tmp_path_factory.mktemp("agent-renewal")
    env = Env(
        root=root,
        key=generate_signing_key(),
        under=f"{base}u",
        node=f"{base}n",
        ctl=f"{base}c",
        sandbox_prefix=f"{base}s-",
        run_dir=root / "run",
        state_dir=root / "state",
        control_args=["--policy-ttl", str(TTL_S)],
    )
    (env.run_dir / "agents").mkdir(parents=True)
    try:
        bring_up(env)
        yield env
    finally:
        tear_down(env)


def log_events(text: str, event: str) -> list[dict[str, object]]:
    return [
        json.loads(line)
        for line in text.splitlines()
        if line.startswith("{") and f'"{event}"' in line
    ]


def test_a_sandbox_outlives_its_first_policy_copy(env: Env) -> None:
    agent = env.agent()
    status, held = env.control("PUT", f"/v1/jobs/{JOB}/policy", policy_body(443))
    assert status in (200, 201), held
    first_exp = int(held["exp"])
    first_nbf = first_exp - TTL_S
    info = agent.register("sbx-renew", held["jws"])
    ns = info.netns
    assert info.raw["digest"] == held["digest"] == policy_digest(held["jws"]).hex()
    assert info.raw["exp"] == first_exp

    def redirected() -> float:
        return count(env, "sbx-renew", "redirect", "redirected")

    syn(ns, 443)
    time.sleep(0.2)
    assert redirected() >= 1

    # The agent moves to a re-signed copy at 2/3 of the first one's lifetime.
    moved_at = None
    while time.time() < first_exp:
        raw = agent.list()[0].raw
        if raw["digest"] != held["digest"]:
            moved_at = time.time()
            break
        time.sleep(0.2)
    assert moved_at is not None, "the held copy was not renewed before its exp"
    print(f"renewed {moved_at - first_nbf:.1f} s into a {TTL_S} s copy")
    assert first_nbf + TTL_S * 2 / 3 - 1 <= moved_at < first_exp
    assert raw["state"] == "active" and raw["exp"] > first_exp
    status, current = env.control("GET", f"/v1/jobs/{JOB}/policy")
    assert status == 200
    assert (raw["digest"], raw["exp"]) == (current["digest"], current["exp"])
    renewed = log_events(env.agent_log(), "job_policy_renewed")
    assert renewed and renewed[0]["sandbox_ids"] == ["sbx-renew"]
    assert renewed[0]["digest"] == current["digest"]
    assert log_events(env.agent_log(), "job_policy_updated") == []  # tier 1 untouched

    # Past the first copy's exp + leeway (when it would have been withdrawn): still running.
    deadline = first_exp + DEFAULT_LEEWAY_S + EXPIRY_TICK_S + 2
    while time.time() < deadline:
        time.sleep(min(1.0, max(0.0, deadline - time.time())))
    raw = agent.list()[0].raw
    assert raw["state"] == "active", raw
    assert raw["exp"] > time.time()
    before, dropped = redirected(), count(env, "sbx-renew", "drop", "no_policy")
    syn(ns, 443)
    time.sleep(0.2)
    assert redirected() > before
    assert count(env, "sbx-renew", "drop", "no_policy") == dropped == 0
    text = env.agent_log()
    assert '"sandbox_policy_expired"' not in text and '"job_policy_withdrawn"' not in text
    # By now the second copy was due too (~80 s): renewed again.
    renewals = metric(agent.metrics(), RENEWALS, result="renewed") or 0.0
    assert renewals >= 2, renewals
    assert raw["digest"] != held["digest"]
    print(
        f"renewals: {renewals:.0f}, sandbox alive {time.time() - first_exp:.0f} s past "
        f"its first copy's exp"
    )
    agent.unregister("sbx-renew")
    assert agent.list() == []
