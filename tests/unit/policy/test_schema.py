"""egressd/policy/schema.json: generated from the model, and agreeing with the parser."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from egressd.policy.errors import PolicyError
from egressd.policy.model import LIMIT_BOUNDS, parse_policy
from egressd.policy.schema import build_schema, schema_text

REPO = Path(__file__).resolve().parents[3]
SCHEMA_FILE = REPO / "egressd" / "policy" / "schema.json"
TESTDATA = Path(__file__).parent / "testdata"
INVALID = json.loads((TESTDATA / "invalid_policies.json").read_text(encoding="utf-8"))
NAMES = json.loads((TESTDATA / "names.json").read_text(encoding="utf-8"))

#: Invalid payloads whose mistake JSON Schema cannot express (the parser refuses them):
#: relations between fields, whole-valued floats, host bits, lo > hi.
NOT_EXPRESSIBLE = {
    "v float",
    "iat whole float",
    "port float",
    "limits float",
    "exp equals nbf",
    "exp before nbf",
    "exp not after iat",
    "exp before nbf even when optional",
    "cidr host bits set",
    "cidr IPv6 host bits",
    "port range reversed",
}


def validator(*, require_timestamps: bool = False) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(build_schema(require_timestamps=require_timestamps))


def json_blocks(markdown: str) -> list[str]:
    return re.findall(r"```json\n(.*?)```", markdown, flags=re.DOTALL)


def test_committed_schema_is_the_generated_one() -> None:
    assert SCHEMA_FILE.read_text(encoding="utf-8") == schema_text(), (
        "regenerate: python -m egressd.policy.schema > egressd/policy/schema.json"
    )


def test_schema_is_a_valid_draft_2020_12_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(json.loads(SCHEMA_FILE.read_text()))


def test_schema_bounds_come_from_the_model() -> None:
    limits = build_schema()["properties"]["limits"]["properties"]
    assert list(limits) == list(LIMIT_BOUNDS)
    for name, (lo, hi) in LIMIT_BOUNDS.items():
        assert (limits[name]["minimum"], limits[name]["maximum"]) == (lo, hi)


def test_readme_example_validates_against_the_committed_schema() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## A job policy", 1)[1]
    example = json.loads(json_blocks(section)[0])
    jsonschema.validate(
        example, json.loads(SCHEMA_FILE.read_text()), cls=jsonschema.Draft202012Validator
    )
    parse_policy(example, require_timestamps=False)


def test_every_example_in_the_policy_reference_is_valid() -> None:
    blocks = json_blocks((REPO / "docs" / "policy.md").read_text(encoding="utf-8"))
    assert len(blocks) >= 3
    for block in blocks:
        example = json.loads(block)
        assert validator().is_valid(example), block
        parse_policy(example, require_timestamps=False)


def test_the_invalid_policies_base_is_valid() -> None:
    assert validator(require_timestamps=True).is_valid(INVALID["base"])


@pytest.mark.parametrize("case", INVALID["cases"], ids=[c["name"] for c in INVALID["cases"]])
def test_invalid_payloads_fail_schema_validation(case: dict[str, Any]) -> None:
    payload = copy.deepcopy(INVALID["base"])
    for key in case.get("unset", []):
        del payload[key]
    payload.update(copy.deepcopy(case.get("set", {})))
    require = case.get("require_timestamps", True)
    with pytest.raises(PolicyError):
        parse_policy(payload, require_timestamps=require)
    valid = validator(require_timestamps=require).is_valid(payload)
    # The list of what the schema cannot say is exact: everything else it refuses.
    assert valid == (case["name"] in NOT_EXPRESSIBLE)


def test_timestamps_are_optional_only_in_the_authoring_schema() -> None:
    payload = {k: v for k, v in INVALID["base"].items() if k not in ("iat", "nbf", "exp")}
    assert validator().is_valid(payload)
    assert not validator(require_timestamps=True).is_valid(payload)


def test_every_valid_host_is_valid_for_the_schema() -> None:
    """The host pattern never refuses a name the parser accepts."""
    host = build_schema()["properties"]["egress"]["items"]["properties"]["host"]
    check = jsonschema.Draft202012Validator(host)
    valid = [name for name, _ in NAMES["normalize"]] + [p for p, _ in NAMES["patterns"]]
    for name in valid:
        assert check.is_valid(name), name


def test_ech_allow_only_on_host_rules() -> None:
    base = {k: v for k, v in INVALID["base"].items() if k not in ("iat", "nbf", "exp")}
    ok = {**base, "egress": [{"host": "a.test", "ech": "allow"}, {"cidr": "203.0.113.0/28"}]}
    assert validator().is_valid(ok)
    bad = {**base, "egress": [{"cidr": "203.0.113.0/28", "ech": "allow"}]}
    assert not validator().is_valid(bad)
