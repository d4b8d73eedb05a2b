"""`egressd keys generate`, `egressd policy sign` and `egressd policy verify`, run
as the user runs them: a subprocess, one line on stderr per failure, exit 2."""

from __future__ import annotations

import base64
import json
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from egressd.policy.jws import TYP, policy_digest, sign_payload
from egressd.policy.keys import load_signing_key, public_jwk

POLICY = {
    "v": 1,
    "job_id": "2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2",
    "account": "acme",
    "nodes": ["node1"],
    "egress": [
        {"host": "api.allowed.test", "ports": [443, 80]},
        {"host": "*.data.allowed.test", "ports": [443]},
        {"cidr": "203.0.113.64/28", "ports": [5432]},
    ],
}


def egressd(cwd: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "egressd", *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("egressd")
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    result = egressd(tmp_path, "keys", "generate", "--out", "keys")
    assert result.returncode == 0, result.stderr
    return tmp_path / "keys"


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(POLICY))
    return path


def sign(tmp_path: Path, policy_file: Path, *extra: str) -> str:
    result = egressd(
        tmp_path, "policy", "sign", "--key", "keys/signing.key", *extra, str(policy_file)
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    return lines[0]


def test_keys_generate(tmp_path: Path) -> None:
    result = egressd(tmp_path, "keys", "generate", "--out", "keys")
    assert result.returncode == 0, result.stderr
    kid = result.stdout.strip()
    assert result.stdout == kid + "\n"
    key = load_signing_key(tmp_path / "keys" / "signing.key")
    assert key.kid == kid
    jwk = json.loads((tmp_path / "keys" / f"{kid}.jwk").read_text())
    assert jwk == public_jwk(key.public)
    assert stat.S_IMODE((tmp_path / "keys" / "signing.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700


def test_keys_generate_refuses_to_overwrite(tmp_path: Path, keydir: Path) -> None:
    before = (keydir / "signing.key").read_bytes()
    result = egressd(tmp_path, "keys", "generate", "--out", "keys")
    assert_one_line_error(result, "exists", "signing.key")
    assert (keydir / "signing.key").read_bytes() == before


def test_sign_then_verify(tmp_path: Path, keydir: Path, policy_file: Path) -> None:
    before = int(time.time())
    token = sign(tmp_path, policy_file)
    after = int(time.time())
    header, body, _ = token.split(".")
    assert json.loads(unb64(header))["typ"] == TYP
    signed = json.loads(unb64(body))
    assert before <= signed["iat"] == signed["nbf"] <= after
    assert signed["exp"] == signed["nbf"] + 3600

    (tmp_path / "policy.jws").write_text(token + "\n")
    result = egressd(tmp_path, "policy", "verify", "--keys", "keys", "policy.jws")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    shown = json.loads(result.stdout)
    assert shown == signed
    assert result.stdout == json.dumps(signed, indent=2, sort_keys=True) + "\n"
    assert len(policy_digest(token)) == 8


def test_sign_ttl_and_given_timestamps(tmp_path: Path, keydir: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(POLICY))
    signed = json.loads(unb64(sign(tmp_path, path, "--ttl", "60").split(".")[1]))
    assert signed["exp"] - signed["nbf"] == 60
    # Given timestamps are kept; exp defaults to nbf + ttl.
    nbf = int(time.time()) + 100
    path.write_text(json.dumps({**POLICY, "nbf": nbf}))
    signed = json.loads(unb64(sign(tmp_path, path, "--ttl", "60").split(".")[1]))
    assert (signed["nbf"], signed["exp"]) == (nbf, nbf + 60)


def test_sign_and_verify_through_stdin(tmp_path: Path, keydir: Path) -> None:
    result = egressd(
        tmp_path, "policy", "sign", "--key", "keys/signing.key", "-", stdin=json.dumps(POLICY)
    )
    assert result.returncode == 0, result.stderr
    result = egressd(tmp_path, "policy", "verify", "--keys", "keys", "-", stdin=result.stdout)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["account"] == "acme"


def test_verify_of_a_tampered_token(tmp_path: Path, keydir: Path, policy_file: Path) -> None:
    header, body, signature = sign(tmp_path, policy_file).split(".")
    doc = json.loads(unb64(body))
    doc["egress"].append({"cidr": "0.0.0.0/0", "ports": ["1-65535"]})
    forged = base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()
    (tmp_path / "tampered.jws").write_text(f"{header}.{forged}.{signature}\n")
    result = egressd(tmp_path, "policy", "verify", "--keys", "keys", "tampered.jws")
    line = assert_one_line_error(result, "bad_signature")
    assert line.startswith("egressd: error: policy rejected: bad_signature: ")


def test_verify_with_other_keys_and_expired(
    tmp_path: Path, keydir: Path, policy_file: Path
) -> None:
    token = sign(tmp_path, policy_file)
    (tmp_path / "policy.jws").write_text(token)
    assert egressd(tmp_path, "keys", "generate", "--out", "other").returncode == 0
    result = egressd(tmp_path, "policy", "verify", "--keys", "other", "policy.jws")
    assert_one_line_error(result, "policy rejected: unknown_kid: ")

    now = int(time.time())
    expired = {**POLICY, "iat": now - 7200, "nbf": now - 7200, "exp": now - 100}
    # `policy sign` refuses an expired policy: sign it with the library.
    key = load_signing_key(keydir / "signing.key")
    (tmp_path / "old.jws").write_text(sign_payload(expired, key))
    result = egressd(tmp_path, "policy", "verify", "--keys", "keys", "old.jws")
    line = assert_one_line_error(result, "policy rejected: expired: expired ")
    assert re.search(
        r"expired \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ, 1\d\d s ago \(exp; leeway 30 s\)", line
    ), line
    result = egressd(tmp_path, "policy", "verify", "--keys", "keys", "--leeway", "200", "old.jws")
    assert result.returncode == 0, result.stderr


def test_verify_of_garbage(tmp_path: Path, keydir: Path) -> None:
    (tmp_path / "junk.jws").write_text("not\na\ntoken\n")
    result = egressd(tmp_path, "policy", "verify", "--keys", "keys", "junk.jws")
    assert_one_line_error(result, "policy rejected: malformed: ")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"egress": [{"host": "api.allowed.test", "ports": [70000]}]}, "egress[0].ports[0]"),
        ({"job_id": "not-a-uuid"}, "job_id"),
        ({"job_id": None}, "job_id"),
        ({"mode": "audit"}, "mode"),
        ({"exp": 5}, "exp"),
        ({"surprise": True}, "surprise"),
    ],
)
def test_sign_of_an_invalid_policy(
    tmp_path: Path, keydir: Path, change: dict[str, object], field: str
) -> None:
    doc: dict[str, object] = {**POLICY, **change}
    doc = {name: value for name, value in doc.items() if value is not None}
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    result = egressd(tmp_path, "policy", "sign", "--key", "keys/signing.key", "bad.json")
    assert_one_line_error(result, "invalid policy", field)


def test_sign_of_non_json_and_non_object(tmp_path: Path, keydir: Path) -> None:
    (tmp_path / "bad.json").write_text("{ nope\n\n")
    result = egressd(tmp_path, "policy", "sign", "--key", "keys/signing.key", "bad.json")
    assert_one_line_error(result, "not JSON")
    (tmp_path / "list.json").write_text("[1, 2]")
    result = egressd(tmp_path, "policy", "sign", "--key", "keys/signing.key", "list.json")
    assert_one_line_error(result, "invalid policy", "$")


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("policy", "sign", "--key", "keys/signing.key", "missing.json"), ("missing.json",)),
        (("policy", "sign", "--key", "nokey", "policy.json"), ("missing", "nokey")),
        (("policy", "sign", "--key", "keys", "policy.json"), ("unreadable",)),
        (("policy", "verify", "--keys", "keys", "missing.jws"), ("missing.jws",)),
        (("policy", "verify", "--keys", "nodir", "policy.json"), ("missing", "nodir")),
        (("policy", "verify", "--keys", "empty", "policy.json"), ("no_keys",)),
        (("keys", "generate", "--out", "policy.json"), ("unwritable",)),
    ],
)
def test_file_errors(
    tmp_path: Path,
    keydir: Path,
    policy_file: Path,
    args: tuple[str, ...],
    needles: tuple[str, ...],
) -> None:
    (tmp_path / "empty").mkdir()
    assert_one_line_error(egressd(tmp_path, *args), *needles)


@pytest.mark.parametrize(
    "args",
    [
        ("keys",),
        ("keys", "generate"),
        ("policy",),
        ("policy", "sign", "policy.json"),
        ("policy", "sign", "--key", "k", "--ttl", "0", "policy.json"),
        ("policy", "sign", "--key", "k", "--ttl", "soon", "policy.json"),
        ("policy", "verify", "--keys", "k"),
        ("policy", "verify", "--keys", "k", "--leeway", "-1", "x.jws"),
    ],
)
def test_usage_errors_are_one_line(tmp_path: Path, args: tuple[str, ...]) -> None:
    assert_one_line_error(egressd(tmp_path, *args), "error")


@pytest.mark.parametrize(
    ("times", "needle"),
    [
        ({"exp": 1000}, "exp: expired 1970-01-01T00:16:40Z, 56 years ago"),
        ({"nbf": 1000, "exp": 2000}, "exp: expired 1970-01-01T00:33:20Z, 56 years ago"),
    ],
)
def test_sign_refuses_an_expired_policy(
    tmp_path: Path, keydir: Path, times: dict[str, int], needle: str
) -> None:
    (tmp_path / "old.json").write_text(json.dumps({**POLICY, **times}))
    result = egressd(tmp_path, "policy", "sign", "--key", "keys/signing.key", "old.json")
    line = assert_one_line_error(result, needle, "refusing to sign an expired policy")
    assert "must be after nbf" not in line


def test_sign_names_times_in_iso_when_exp_is_before_nbf(tmp_path: Path, keydir: Path) -> None:
    nbf = int(time.time()) + 7200
    (tmp_path / "p.json").write_text(json.dumps({**POLICY, "nbf": nbf, "exp": nbf - 60}))
    result = egressd(tmp_path, "policy", "sign", "--key", "keys/signing.key", "p.json")
    line = assert_one_line_error(result, "invalid policy: exp: must be after nbf (")
    assert re.search(r"\(\d{4}-\d\d-\d\dT[\d:]{8}Z is not after \d{4}-\d\d-\d\dT[\d:]{8}Z\)", line)
