"""The shared config converters (`egressd.config_reader`): values in, typed values or errors naming the field out."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from egressd import config_reader as cr
from egressd.agent import config as agent_config
from egressd.config_reader import ConfigError
from egressd.control import config as control_config
from egressd.proxy import config as proxy_config


def error(fn: object, *args: object, **kwargs: object) -> ConfigError:
    assert callable(fn)
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    return info.value


def test_the_error_names_the_field_and_has_one_reason() -> None:
    exc = ConfigError("health.port", "must be in 1..65535")
    assert (exc.reason, exc.field, exc.problem) == (
        "invalid_config",
        "health.port",
        "must be in 1..65535",
    )
    assert exc.detail == "health.port: must be in 1..65535"
    assert str(exc) == "invalid_config: health.port: must be in 1..65535"


def test_every_daemon_config_raises_the_same_error_type() -> None:
    assert agent_config.ConfigError is ConfigError
    assert proxy_config.ConfigError is ConfigError
    assert control_config.ConfigError is ConfigError


@pytest.mark.parametrize(
    ("fn", "value", "expected"),
    [
        (cr.as_int, 7, 7),
        (cr.as_number, 7, 7.0),
        (cr.as_number, 0.5, 0.5),
        (cr.as_bool, False, False),
        (cr.as_str, "", ""),
        (cr.as_path, "rel/dir", Path("rel/dir")),
        (cr.as_address, "198.18.0.11", IPv4Address("198.18.0.11")),
        (cr.as_network, "100.96.0.0/16", IPv4Network("100.96.0.0/16")),
    ],
)
def test_converters_accept(fn: cr.Converter[object], value: object, expected: object) -> None:
    got = fn("f", value)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(
    ("fn", "value", "words"),
    [
        (cr.as_int, True, "must be an integer"),
        (cr.as_int, 1.0, "must be an integer"),
        (cr.as_number, True, "must be a number"),
        (cr.as_number, "1", "must be a number"),
        (cr.as_bool, 1, "must be true or false"),
        (cr.as_str, 3, "must be a string"),
        (cr.as_path, "", "must be a non-empty path string"),
        (cr.as_address, "198.18.0.300", "not an IPv4 address"),
        (cr.as_address, 1, "must be an IPv4 address string"),
        (cr.as_network, "100.96.0.1/16", "not a strict IPv4 network"),
        (cr.as_network, "100.96.0.0", "needs a prefix length"),
        (cr.as_network, ["100.96.0.0/16"], "must be an IPv4 CIDR string"),
    ],
)
def test_converters_refuse_naming_the_field(
    fn: cr.Converter[object], value: object, words: str
) -> None:
    exc = error(fn, "x.y", value)
    assert exc.field == "x.y" and words in exc.problem, exc.detail


def test_ranges() -> None:
    assert cr.as_int("p", 65535, 1, 65535) == 65535
    assert error(cr.as_int, "p", 0, 1, 65535).problem == "must be an integer in 1..65535"
    assert error(cr.as_int, "p", "1", 1, 65535).problem == "must be an integer in 1..65535"
    assert cr.as_number("t", 0, 0.0, 300.0, unit="seconds") == 0.0
    for bad in (300.5, float("inf"), float("nan"), True):
        exc = error(cr.as_number, "t", bad, 0.0, 300.0, unit="seconds")
        assert exc.problem == "must be a number of seconds in 0..300"


def test_strings_paths_and_choices() -> None:
    assert error(cr.as_str, "n", "", nonempty=True).problem == "must be a non-empty string"
    assert cr.as_path("d", "/run/x", absolute=True) == Path("/run/x")
    assert error(cr.as_path, "d", "run/x", absolute=True).problem == "must be an absolute path"
    assert cr.as_one_of("rc", "REFUSED", ("NXDOMAIN", "REFUSED")) == "REFUSED"
    exc = error(cr.as_one_of, "rc", "nx", ("NXDOMAIN", "REFUSED"))
    assert exc.problem == 'must be "NXDOMAIN" or "REFUSED", got \'nx\''


def test_lists_name_each_item() -> None:
    nets = cr.as_list("r", ["10.0.0.0/8", "192.168.0.0/16"], cr.as_network, what="CIDRs")
    assert nets == (IPv4Network("10.0.0.0/8"), IPv4Network("192.168.0.0/16"))
    assert cr.as_list("r", [], cr.as_network, what="CIDRs") == ()
    assert error(cr.as_list, "r", "10.0.0.0/8", cr.as_network, what="CIDRs").problem == (
        "must be a list of CIDRs"
    )
    assert (
        error(cr.as_list, "r", ["10.0.0.0/8", "x/1"], cr.as_network, what="CIDRs").field == "r[1]"
    )
    exc = error(cr.as_list, "a", [], cr.as_address, what="addresses", nonempty=True)
    assert exc.problem == "must be a non-empty list of addresses"
    exc = error(cr.as_list, "a", ["1.2.3.4", "1.2.3.4"], cr.as_address, what="x", distinct=True)
    assert (exc.field, exc.problem) == ("a", "must be distinct")


def test_objects_refuse_unknown_and_missing_keys() -> None:
    known = {"a", "b"}
    assert cr.as_object("h", {"a": 1}, known) == {"a": 1}
    assert error(cr.as_object, "", [], known, what="a JSON object").field == "$"
    assert error(cr.as_object, "h", [], known, what="an object").detail == "h: must be an object"
    exc = error(cr.as_object, "h", {"a": 1, "z": 2, "c": 3}, known)
    assert (exc.field, exc.problem) == ("h.c", "unknown field")  # the first in sorted order
    exc = error(cr.as_object, "", {"a": 1}, known, required=("a", "b"), missing="is required")
    assert (exc.field, exc.problem) == ("b", "is required")


def test_convert_uses_the_table_and_nested_names() -> None:
    table: dict[str, cr.Converter[object]] = {"port": cr.as_int, "path": cr.as_str}
    assert cr.convert("health", {"port": 1}, table) == {"port": 1}
    assert error(cr.convert, "health", {"port": "1"}, table).field == "health.port"
    assert cr.child("", "name") == "name"
    assert cr.child("proxies", 2) == "proxies[2]"


def test_read_json_file(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"a": [1, 2]}))
    assert cr.read_json_file(good, 1024) == {"a": [1, 2]}
    assert "cannot read" in error(cr.read_json_file, tmp_path / "absent.json", 1024).problem
    exc = error(cr.read_json_file, good, 4)
    assert (exc.field, exc.problem) == ("$", f"{good} is larger than 4 bytes")
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'{"a": 1, "a": 2}')  # duplicate keys: refused by strictjson
    assert "is not JSON" in error(cr.read_json_file, bad, 1024).problem
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe{")
    assert "is not JSON" in error(cr.read_json_file, binary, 1024).problem


def test_control_flags_use_the_flag_as_the_field() -> None:
    exc = error(control_config.parse_listen, "localhost:8080")
    assert exc.field == "--listen" and exc.detail.startswith("--listen: 'localhost:8080'")
    exc = error(control_config.ControlConfig.build, policy_ttl_s=5)
    assert (exc.field, exc.problem) == ("--policy-ttl", "must be an integer in 60..604800")
