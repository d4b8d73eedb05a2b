"""A denied name under real resolvers: glibc and musl fail at once, and finally.

Issue 14: a DNS denial must be immediate and recognisable. The proxy's
default refusal rcode (NXDOMAIN, `egressd.proxy.dns.DEFAULT_REFUSAL_RCODE`)
is tested here with the resolvers a UDF actually uses, against the real
responder (the world of test_intercept): `probes/gai.c` built with the
system's cc (glibc) and with musl-gcc (musl-tools, from the Makefile's
APT_PACKAGES; statically linked, so it is musl's resolver end to end), and
Python's own `socket.getaddrinfo` (glibc, A and AAAA). The client
namespace's resolv.conf has a search domain and `attempts:2`, so a resolver
that retries, or walks on after a final answer, shows it in the number of
queries the responder logged. REFUSED, for contrast, gives glibc EAI_AGAIN
after asking every candidate twice (docs/decisions.md has the measurements).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from egressd.proxy.config import config_from_mapping
from tests.support.intercept_world import API, World, make_world
from tests.support.root import NETNS_TOOLS

pytestmark = [pytest.mark.root(*NETNS_TOOLS), pytest.mark.timeout(180)]

PROBE = Path(__file__).parent / "probes" / "gai.c"
SEARCH = "corp.test"
RESOLV_CONF = f"nameserver 100.100.100.53\nsearch {SEARCH}\noptions attempts:2 timeout:2\n"
#: An immediate error: well under a retry timeout (2 s here, 5 s by default).
IMMEDIATE_MS = 200.0
#: (name asked, the names a resolver may try: the search list's candidates)
DENIED = {
    "evil.test": {"evil.test", f"evil.test.{SEARCH}"},
    "evil": {"evil", f"evil.{SEARCH}"},
}

PY_PROBE = """
import socket, sys, time
t = time.monotonic()
try:
    socket.getaddrinfo(sys.argv[1], 80, type=socket.SOCK_STREAM)
    print("ok - %.1f" % ((time.monotonic() - t) * 1000))
except socket.gaierror as e:
    name = {socket.EAI_NONAME: "EAI_NONAME", socket.EAI_AGAIN: "EAI_AGAIN"}.get(e.errno, "EAI_OTHER")
    print("err %s %.1f %s" % (name, (time.monotonic() - t) * 1000, e.strerror))
"""


@pytest.fixture(scope="module")
def probes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """The resolvers, as argv prefixes: glibc (C and Python) and musl."""
    out = tmp_path_factory.mktemp("probes")
    cc, musl_gcc = shutil.which("cc") or shutil.which("gcc"), shutil.which("musl-gcc")
    assert cc is not None, "no C compiler"
    assert musl_gcc is not None, "musl-gcc missing: `make deps` installs musl-tools"
    subprocess.run([cc, "-O2", "-o", str(out / "gai-glibc"), str(PROBE)], check=True)
    subprocess.run(
        [musl_gcc, "-static", "-O2", "-o", str(out / "gai-musl"), str(PROBE)], check=True
    )
    return {
        "glibc": [str(out / "gai-glibc")],
        "musl": [str(out / "gai-musl")],
        "python": [sys.executable, "-c", PY_PROBE],
    }


def _resolv_conf(world: World) -> Iterator[World]:
    """resolv.conf for the client namespace (`ip netns exec` mounts it over /etc's)."""
    etc = Path("/etc/netns") / world.client_ns
    etc.mkdir(parents=True, exist_ok=True)
    try:
        (etc / "resolv.conf").write_text(RESOLV_CONF)
        yield world
    finally:
        (etc / "resolv.conf").unlink(missing_ok=True)
        etc.rmdir()


@pytest.fixture(scope="module")
def default_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """The responder with a proxy configuration's default refusal rcode."""
    rcode = config_from_mapping(
        {"name": "proxy-t", "underlay": "198.18.0.21", "egress": "203.0.113.21"}
    ).dns_refusal_rcode
    with make_world(tmp_path_factory.mktemp("resolvers"), dns_refusal_rcode=rcode) as w:
        yield from _resolv_conf(w)


@pytest.fixture(scope="module")
def refused_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with make_world(tmp_path_factory.mktemp("refused"), dns_refusal_rcode="REFUSED") as w:
        yield from _resolv_conf(w)


def resolve(world: World, argv: list[str], name: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Run a probe for `name` in the client namespace: (its output words, the
    (qname, qtype) of every query the responder logged meanwhile)."""
    before = len(world.events(event="dns"))
    proc = subprocess.run(
        ["ip", "netns", "exec", world.client_ns, *argv, name],
        check=False,  # the probe exits 1 on an error: its output says which
        capture_output=True,
        text=True,
        timeout=30,
    )
    # The responder logs a query before it answers: every query is in the log now.
    asked = [(e["qname"], e["qtype"]) for e in world.events(event="dns")[before:]]
    words = proc.stdout.split(maxsplit=3)
    assert words and words[0] in ("ok", "err"), (proc.stdout, proc.stderr)
    return words, asked


@pytest.mark.parametrize("resolver", ["glibc", "musl", "python"])
def test_allowed_name_resolves(
    default_world: World, probes: dict[str, list[str]], resolver: str
) -> None:
    words, _ = resolve(default_world, probes[resolver], "api.allowed.test")
    assert words[0] == "ok", words
    if resolver != "python":
        assert words[1] == API, words


@pytest.mark.parametrize("name", sorted(DENIED))
@pytest.mark.parametrize("resolver", ["glibc", "musl", "python"])
def test_denied_name_fails_at_once_without_retries(
    default_world: World, probes: dict[str, list[str]], resolver: str, name: str
) -> None:
    words, asked = resolve(default_world, probes[resolver], name)
    assert words[0] == "err" and words[1] == "EAI_NONAME", words  # final, not "try again"
    assert float(words[2]) < IMMEDIATE_MS, words
    # No retries: each candidate of the search list asked at most once per type.
    assert asked, "the responder saw no query"
    assert len(asked) == len(set(asked)), asked
    assert {qname for qname, _ in asked} <= DENIED[name], asked
    qtypes = {"A", "AAAA"} if resolver == "python" else {"A"}
    assert {qtype for _, qtype in asked} <= qtypes, asked
    assert len(asked) <= len(DENIED[name]) * len(qtypes), asked
    for event in default_world.events(event="dns")[-len(asked) :]:
        assert (event["verdict"], event["reason"], event["rcode"]) == (
            "deny",
            "no_matching_rule",
            "NXDOMAIN",
        ), event


def test_refused_makes_glibc_retry_and_say_try_again(
    refused_world: World, probes: dict[str, list[str]]
) -> None:
    """Why REFUSED is not the default: the same name under REFUSED."""
    words, asked = resolve(refused_world, probes["glibc"], "evil.test")
    assert words[:2] == ["err", "EAI_AGAIN"], words
    assert sorted(set(asked)) == sorted((n, "A") for n in DENIED["evil.test"]), asked
    assert len(asked) == 2 * len(DENIED["evil.test"]), asked  # attempts:2, every candidate
