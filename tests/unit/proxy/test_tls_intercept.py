"""TLS interception's pure parts: the CA, leaf minting and its cache, ALPN choices,
the ClientHello's ALPN offer, the proxy's configuration keys, and
`http_rules.inspectable` for intercepted rules."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import ssl
import struct
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from egressd.control import interception_ca
from egressd.policy.matcher import Decision, Verdict
from egressd.policy.model import parse_policy
from egressd.proxy import http_rules, sniff, tls_intercept
from egressd.proxy.config import ConfigError, InterceptionCaPaths, config_from_mapping
from egressd_harness.topology import ca as test_ca
from tests.support import tls_hellos

NOW = dt.datetime(2026, 12, 6, 12, 0, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def ca_files(tmp_path_factory: pytest.TempPathFactory) -> interception_ca.InterceptionCaFiles:
    return interception_ca.ensure_interception_ca(tmp_path_factory.mktemp("icpt"))


@pytest.fixture(scope="module")
def ica(ca_files: interception_ca.InterceptionCaFiles) -> tls_intercept.InterceptionCa:
    return tls_intercept.InterceptionCa.load(ca_files.cert, ca_files.key)


# --- the CA ------------------------------------------------------------------------------


def test_ca_made_once_and_kept(tmp_path: Path) -> None:
    files = interception_ca.ensure_interception_ca(tmp_path / "d", now=NOW)
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    assert "interception" in cert.subject.rfc4514_string()
    assert os.stat(files.key).st_mode & 0o777 == 0o600
    assert os.stat(files.cert).st_mode & 0o777 == 0o644
    before = files.cert.read_bytes(), files.key.read_bytes()
    interception_ca.ensure_interception_ca(tmp_path / "d", now=NOW + dt.timedelta(days=30))
    assert (files.cert.read_bytes(), files.key.read_bytes()) == before


def test_ca_remade_when_unusable(tmp_path: Path) -> None:
    files = interception_ca.ensure_interception_ca(tmp_path, now=NOW)
    first = files.cert.read_bytes()
    files.key.write_bytes(b"garbage")
    interception_ca.ensure_interception_ca(tmp_path, now=NOW)
    assert files.cert.read_bytes() != first
    assert interception_ca.usable(tmp_path, NOW)
    # Near its end it is made anew too.
    late = NOW + interception_ca.VALIDITY - dt.timedelta(hours=1)
    assert not interception_ca.usable(tmp_path, late)


def test_ca_is_not_the_test_ca(tmp_path: Path) -> None:
    icpt = interception_ca.ensure_interception_ca(tmp_path / "i")
    other = test_ca.ensure_ca(tmp_path / "t")
    assert icpt.cert.read_bytes() != other.ca_cert.read_bytes()


def test_ca_load_refuses_bad_pairs(
    tmp_path: Path, ca_files: interception_ca.InterceptionCaFiles
) -> None:
    other = test_ca.ensure_ca(tmp_path / "t")
    with pytest.raises(tls_intercept.InterceptionError, match="not the certificate's"):
        tls_intercept.InterceptionCa.load(ca_files.cert, other.server_cert.with_name("server.key"))
    with pytest.raises(tls_intercept.InterceptionError, match="not a CA"):
        tls_intercept.InterceptionCa.load(
            other.server_cert, other.server_cert.with_name("server.key")
        )
    with pytest.raises(tls_intercept.InterceptionError, match=r"interception_ca.cert"):
        tls_intercept.InterceptionCa.load(tmp_path / "missing.pem", ca_files.key)
    with pytest.raises(tls_intercept.InterceptionError) as exc:
        tls_intercept.Interception.load(
            ca_files.cert, ca_files.key, upstream_ca_file=tmp_path / "nope.pem"
        )
    assert exc.value.reason == "interception_ca_invalid"


# --- leaves ------------------------------------------------------------------------------


def test_leaf_for_the_sni(ica: tls_intercept.InterceptionCa) -> None:
    leaf = ica.mint("api.allowed.test", NOW)
    cert = x509.load_pem_x509_certificate(leaf.cert_pem)
    cert.verify_directly_issued_by(ica.cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["api.allowed.test"]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    assert cert.not_valid_after_utc - NOW == tls_intercept.LEAF_VALIDITY
    assert cert.not_valid_before_utc < NOW


def test_leaf_never_outlives_the_ca(ica: tls_intercept.InterceptionCa) -> None:
    late = ica.cert.not_valid_after_utc - dt.timedelta(hours=2)
    leaf = ica.mint("api.allowed.test", late)
    assert leaf.not_after == ica.cert.not_valid_after_utc


def test_leaf_cache_lru_and_renewal(ica: tls_intercept.InterceptionCa) -> None:
    now = [NOW]
    cache = tls_intercept.LeafCache(ica, size=2, clock=lambda: now[0])
    a = cache.context("a.allowed.test", ("http/1.1",))
    assert cache.context("a.allowed.test", ("http/1.1",)) is a
    assert (cache.minted, cache.hits) == (1, 1)
    # Another ALPN answer is another context (the server side picks from its list).
    assert cache.context("a.allowed.test", ()) is not a
    cache.context("a.allowed.test", ("http/1.1",))  # a is the most recent now
    cache.context("b.allowed.test", ())  # evicts ("a", ()), the least recent
    assert len(cache) == 2
    assert cache.context("a.allowed.test", ("http/1.1",)) is a
    minted = cache.minted
    cache.context("a.allowed.test", ())
    assert cache.minted == minted + 1
    # Within LEAF_RENEW_BEFORE of its end, a leaf is minted anew.
    now[0] = NOW + tls_intercept.LEAF_VALIDITY - tls_intercept.LEAF_RENEW_BEFORE
    assert cache.context("a.allowed.test", ("http/1.1",)) is not a
    with pytest.raises(ValueError):
        tls_intercept.LeafCache(ica, size=0)


def test_leaf_context_serves_a_verifying_client(
    ica: tls_intercept.InterceptionCa, ca_files: interception_ca.InterceptionCaFiles
) -> None:
    """In memory: a client that trusts the CA completes a handshake with the leaf."""
    server_ctx = tls_intercept.LeafCache(ica).context("api.allowed.test", ("http/1.1",))
    client_ctx = ssl.create_default_context(cafile=str(ca_files.cert))
    client_ctx.set_alpn_protocols(["h2", "http/1.1"])
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="api.allowed.test")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for obj in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                obj.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    client.do_handshake()
    assert client.selected_alpn_protocol() == "http/1.1"


# --- ALPN ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client", "offer"),
    [
        ((), ()),
        (("h2", "http/1.1"), ("h2", "http/1.1")),
        (("http/1.1", "h2"), ("http/1.1", "h2")),  # the client's order
        (("http/1.1",), ("http/1.1",)),
        (("spdy/3", "http/1.1", "http/1.1"), ("http/1.1",)),  # only what the proxy reads
        (("h3",), ()),
    ],
)
def test_alpn_offer(client: tuple[str, ...], offer: tuple[str, ...]) -> None:
    assert tls_intercept.alpn_offer(client) == offer


def test_alpn_offer_http1_only() -> None:
    only = tls_intercept.HTTP1_ONLY
    assert tls_intercept.alpn_offer(("h2", "http/1.1"), only) == ("http/1.1",)
    assert tls_intercept.alpn_offer(("h2",), only) == ()


def test_h2_only_for_policies_without_credentials() -> None:
    assert tls_intercept.supported_alpn(POLICY) == ("h2", "http/1.1")
    with_credentials = parse_policy(
        {
            "v": 1,
            "job_id": "2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2",
            "account": "acme",
            "nodes": ["node1"],
            "egress": [
                {
                    "host": "api.allowed.test",
                    "ports": [443],
                    "tls": "intercept",
                    "http": {"allow": [{"methods": ["GET"], "paths": ["/data"]}]},
                },
                {
                    "host": "eu.data.allowed.test",
                    "ports": [80],
                    "http": {
                        "allow": [{"methods": ["GET"], "paths": ["/data"]}],
                        "credentials": [{"header": "Authorization", "secret": "tok"}],
                    },
                },
            ],
        },
        require_timestamps=False,
    )
    # A credential anywhere in the policy: exfiltration is checked on every request.
    assert tls_intercept.supported_alpn(with_credentials) == ("http/1.1",)


def test_client_alpn_is_the_servers_choice() -> None:
    assert tls_intercept.client_alpn("http/1.1") == ("http/1.1",)
    assert tls_intercept.client_alpn(None) == ()


def _hello(extensions: bytes) -> bytes:
    """A ClientHello (TLS 1.2 layout) around `extensions`, in one record."""
    body = (
        b"\x03\x03"
        + b"\x11" * 32
        + b"\x00"
        + b"\x00\x02\x13\x01"
        + b"\x01\x00"
        + struct.pack("!H", len(extensions))
        + extensions
    )
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + struct.pack("!H", len(message)) + message


def _alpn_ext(*names: bytes) -> bytes:
    body = b"".join(bytes([len(n)]) + n for n in names)
    return tls_hellos.ext(0x10, struct.pack("!H", len(body)) + body)


def test_sniff_reads_the_alpn_offer() -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname="api.allowed.test")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    result = sniff.sniff_tls_sni(out.read())
    assert (result.status, result.host, result.alpn) == (
        sniff.OK,
        "api.allowed.test",
        ("h2", "http/1.1"),
    )
    assert sniff.sniff_tls_sni(tls_hellos.client_hello("a.test")).alpn == ("h2", "http/1.1")
    assert sniff.sniff_tls_sni(_hello(tls_hellos.sni_ext("a.test"))).alpn == ()


@pytest.mark.parametrize(
    "alpn",
    [
        tls_hellos.ext(0x10, b""),  # no list
        tls_hellos.ext(0x10, b"\x00\x00"),  # an empty list
        tls_hellos.ext(0x10, b"\x00\x01\x00"),  # an empty name
        tls_hellos.ext(0x10, b"\x00\x03\x05h2"),  # a name running past its list
    ],
)
def test_sniff_refuses_malformed_alpn(alpn: bytes) -> None:
    hello = _hello(tls_hellos.sni_ext("a.test") + alpn)
    assert sniff.sniff_tls_sni(hello).status == sniff.MALFORMED


def test_sniff_alpn_with_sni() -> None:
    hello = _hello(tls_hellos.sni_ext("a.test") + _alpn_ext(b"http/1.1"))
    assert sniff.sniff_tls_sni(hello).alpn == ("http/1.1",)


# --- configuration and inspectability ------------------------------------------------------

BASE = {"name": "p1", "underlay": "198.18.0.21", "egress": "203.0.113.21"}


def test_config_keys() -> None:
    config = config_from_mapping(
        {**BASE, "interception_ca": {"cert": "/c.pem", "key": "/c.key"}, "upstream_ca_file": "/u"}
    )
    assert config.interception_ca == InterceptionCaPaths(Path("/c.pem"), Path("/c.key"))
    assert config.upstream_ca_file == Path("/u")
    assert config_from_mapping(BASE).interception_ca is None
    for bad in (
        {"cert": "/c"},
        {"cert": "/c", "key": "/k", "chain": "/x"},
        "/c",
        {"cert": "", "key": "/k"},
    ):
        with pytest.raises(ConfigError, match="interception_ca"):
            config_from_mapping({**BASE, "interception_ca": bad})
    with pytest.raises(ConfigError, match="upstream_ca_file"):
        config_from_mapping({**BASE, "upstream_ca_file": 3})


POLICY = parse_policy(
    {
        "v": 1,
        "job_id": "2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2",
        "account": "acme",
        "nodes": ["node1"],
        "egress": [
            {
                "host": "api.allowed.test",
                "ports": [443],
                "tls": "intercept",
                "http": {"allow": [{"methods": ["GET"], "paths": ["/data"]}]},
            },
            {
                "host": "eu.data.allowed.test",
                "ports": [443, 80],
                "http": {"allow": [{"methods": ["GET"], "paths": ["/data"]}]},
            },
        ],
    },
    require_timestamps=False,
)


def test_inspectable_when_intercepted() -> None:
    intercepting, spliced = POLICY.egress
    allowed = Decision(Verdict.ALLOW, "allowed_host", intercepting)
    assert http_rules.inspectable(allowed, "tls") is allowed
    assert http_rules.inspectable(allowed, "http") is allowed
    assert http_rules.inspectable(allowed, None).reason == "http_not_inspectable"
    not_intercepted = Decision(Verdict.ALLOW, "allowed_host", spliced)
    assert http_rules.inspectable(not_intercepted, "tls").reason == "http_not_inspectable"
