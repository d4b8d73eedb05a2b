"""The "internet" daemon in its own topology: HTTPS with the test CA, bytes, DNS, metadata.

The daemon runs as `python -m egressd_harness.topology.inet` inside the test's
`{prefix}inet` namespace (nsenter, not `ip netns exec`); clients run in the
test's proxy and node namespaces (curl under nsenter, or sockets created in
the namespace). Everything is removed in fixture finalizers.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from egressd.layout import INET_DNS, METADATA, default_layout
from egressd.net import netns as kn
from egressd_harness.topology import network
from egressd_harness.topology.inet import CONTENT_SHA256_HEADER, FAKE_CREDENTIAL, content_sha256
from tests.support.netns import fresh_prefix
from tests.support.processes import stop_process

pytestmark = pytest.mark.root("nsenter", "curl")

LAYOUT = default_layout()
REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 30.0
TIMEOUT_S = 10.0


@dataclass
class Inet:
    prefix: str
    run_dir: Path
    log: Path
    process: subprocess.Popen[bytes]

    def ns(self, layout_name: str) -> str:
        return network.netns_name(layout_name, self.prefix)

    @property
    def ca(self) -> Path:
        return self.run_dir / "ca" / "ca.pem"

    def events(self) -> list[dict[str, object]]:
        out = []
        for line in self.log.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"event": "unparsed", "line": line})
        return out

    def curl(
        self, layout_ns: str, *args: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return kn.run_in_netns(
            self.ns(layout_ns), ["curl", "-sS", "--max-time", str(TIMEOUT_S), *args], check=check
        )


def _wait_ready(inet: Inet) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if any(e.get("event") == "ready" for e in inet.events()):
            return
        if inet.process.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(
        f"inet daemon not ready (rc={inet.process.poll()}):\n{inet.log.read_text()}"
    )


@pytest.fixture(scope="module")
def inet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Inet]:
    prefix = fresh_prefix()
    run_dir = tmp_path_factory.mktemp("inet-run")
    log = run_dir / "inet.log"
    try:
        network.build(LAYOUT, prefix)
        with open(log, "wb") as out:
            process = kn.popen_in_netns(
                network.netns_name("egd-inet", prefix),
                [sys.executable, "-m", "egressd_harness.topology.inet", "--run-dir", str(run_dir)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                cwd=REPO,
            )
        daemon = Inet(prefix, run_dir, log, process)
        try:
            _wait_ready(daemon)
            yield daemon
        finally:
            stop_process(process, 10)
        assert process.returncode == 0, log.read_text()
        assert any(e.get("event") == "stopped" for e in daemon.events())
    finally:
        network.destroy(LAYOUT, prefix)
        for name in kn.list_netns(prefix):
            kn.delete_netns(name)
    assert kn.list_netns(prefix) == ()


def test_ready_lists_every_listener(inet: Inet) -> None:
    ready = next(e for e in inet.events() if e.get("event") == "ready")
    listeners = ready["listeners"]
    assert isinstance(listeners, dict)
    addresses = sorted({str(site.address) for site in LAYOUT.sites})
    assert listeners["http"] == [f"{a}:80" for a in addresses]
    assert listeners["https"] == [f"{a}:443" for a in addresses]
    assert listeners["https_untrusted"] == [f"{a}:8443" for a in addresses]
    assert listeners["h2"] == [f"{a}:9443" for a in addresses]
    assert listeners["metadata"] == [f"{METADATA}:80"]
    assert listeners["dns"] == [f"udp:{INET_DNS}:53", f"tcp:{INET_DNS}:53"]


def test_https_verifies_against_the_test_ca(inet: Inet) -> None:
    result = inet.curl(
        "egd-proxy1",
        "--cacert",
        str(inet.ca),
        "--resolve",
        "api.allowed.test:443:203.0.113.10",
        "https://api.allowed.test/",
    )
    body = json.loads(result.stdout)
    assert body["site"] == "api.allowed.test"
    assert body["path"] == "/"
    assert body["client"] == "203.0.113.21"
    assert body["local"] == "203.0.113.10"
    assert body["scheme"] == "https"


def test_http2_site(inet: Inet) -> None:
    result = inet.curl(
        "egd-proxy1",
        "--http2",
        "--cacert",
        str(inet.ca),
        "--resolve",
        "api.allowed.test:9443:203.0.113.10",
        "-w",
        "\n%{http_version}",
        "https://api.allowed.test:9443/data?x=1",
    )
    body, version = result.stdout.rsplit("\n", 1)
    assert version == "2"
    about = json.loads(body)
    assert (about["site"], about["path"], about["protocol"]) == ("api.allowed.test", "/data", "h2")
    assert about["client"] == "203.0.113.21"


@pytest.mark.parametrize("name", ["eu.data.allowed.test", "zz.data.allowed.test"])
def test_https_wildcard_names(inet: Inet, name: str) -> None:
    result = inet.curl(
        "egd-proxy2",
        "--cacert",
        str(inet.ca),
        "--resolve",
        f"{name}:443:203.0.113.11",
        f"https://{name}/data",
    )
    body = json.loads(result.stdout)
    assert (body["site"], body["path"], body["client"]) == (name, "/data", "203.0.113.22")


def test_https_refuses_a_name_outside_the_certificate(inet: Inet) -> None:
    result = inet.curl(
        "egd-proxy1",
        "--cacert",
        str(inet.ca),
        "--resolve",
        "www.example.com:443:203.0.113.10",
        "https://www.example.com/",
        check=False,
    )
    assert result.returncode == 60, result.stderr  # peer certificate cannot be authenticated


def test_plain_http_reports_the_host_header(inet: Inet) -> None:
    result = inet.curl("egd-proxy1", "-H", "Host: evil.test:80", "http://203.0.113.10/data?x=1")
    body = json.loads(result.stdout)
    assert (body["site"], body["query"], body["local"], body["scheme"]) == (
        "evil.test",
        "x=1",
        "203.0.113.10",
        "http",
    )


def test_bytes_match_their_sha256_header(inet: Inet, tmp_path: Path) -> None:
    target = tmp_path / "body"
    headers = inet.curl(
        "egd-proxy1", "-D", "-", "-o", str(target), "http://203.0.113.66/bytes/1000000"
    ).stdout
    fields = {
        k.strip().lower(): v.strip()
        for k, _, v in (line.partition(":") for line in headers.splitlines()[1:] if line)
    }
    data = target.read_bytes()
    assert len(data) == 1_000_000
    assert fields["content-length"] == "1000000"
    assert (
        fields[CONTENT_SHA256_HEADER.lower()]
        == hashlib.sha256(data).hexdigest()
        == content_sha256(1_000_000)
    )


def test_bytes_rejects_out_of_range(inet: Inet) -> None:
    result = inet.curl(
        "egd-proxy1",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "http://203.0.113.66/bytes/999999999999",
    )
    assert result.stdout == "400"


class _NamespacedHTTPS(http.client.HTTPSConnection):
    """Never opens a socket of its own: that one would be in the host's namespace."""

    def connect(self) -> None:
        raise AssertionError("the connection was closed; refusing to reconnect from the host")


def _tls_connection(
    inet: Inet, layout_ns: str, address: str, name: str
) -> http.client.HTTPSConnection:
    """An HTTPS connection whose socket lives in `layout_ns`, verified against the test CA."""
    sock = kn.netns_socket(inet.ns(layout_ns), socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT_S)
    sock.connect((address, 443))
    ctx = ssl.create_default_context(cafile=str(inet.ca))
    conn = _NamespacedHTTPS(name, 443, timeout=TIMEOUT_S, context=ctx)
    conn.sock = ctx.wrap_socket(sock, server_hostname=name)
    return conn


def test_keep_alive_serves_several_requests_on_one_connection(inet: Inet) -> None:
    conn = _tls_connection(inet, "egd-proxy1", "203.0.113.10", "api.allowed.test")
    try:
        sock = conn.sock
        for path in ("/", "/data", "/echo-headers", "/bytes/70000"):
            conn.request("GET", path, headers={"X-Probe": "1"})
            response = conn.getresponse()
            body = response.read()
            assert response.status == 200
            assert conn.sock is sock  # not reconnected
        assert len(body) == 70000
        conn.request("GET", "/echo-headers", headers={"X-Probe": "yes"})
        echoed = json.loads(conn.getresponse().read())
        assert ["X-Probe", "yes"] in echoed["headers"]
        conn.request("POST", "/upload", body=b"a" * 100_000)
        uploaded = json.loads(conn.getresponse().read())
        assert uploaded == {"bytes": 100_000, "sha256": hashlib.sha256(b"a" * 100_000).hexdigest()}
    finally:
        conn.close()


def _dns(inet: Inet, name: str, rdtype: str, *, tcp: bool = False) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    sock_type = socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM
    with kn.netns_socket(inet.ns("egd-proxy1"), socket.AF_INET, sock_type) as sock:
        if tcp:
            sock.settimeout(TIMEOUT_S)
            sock.connect((str(INET_DNS), 53))
            sock.setblocking(False)
            return dns.query.tcp(query, str(INET_DNS), timeout=TIMEOUT_S, sock=sock)
        sock.setblocking(False)
        return dns.query.udp(query, str(INET_DNS), timeout=TIMEOUT_S, sock=sock)


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_dns_a_records(inet: Inet, tcp: bool) -> None:
    response = _dns(inet, "api.allowed.test", "A", tcp=tcp)
    assert response.rcode() == dns.rcode.NOERROR
    assert [rd.to_text() for rrset in response.answer for rd in rrset] == ["203.0.113.10"]
    wildcard = _dns(inet, "any.data.allowed.test", "A", tcp=tcp)
    assert [rd.to_text() for rrset in wildcard.answer for rd in rrset] == ["203.0.113.11"]


def test_dns_txt_nxdomain_refused(inet: Inet) -> None:
    txt = _dns(inet, "api.allowed.test", "TXT")
    assert txt.answer and txt.answer[0].rdtype == dns.rdatatype.TXT
    assert _dns(inet, "missing.allowed.test", "A").rcode() == dns.rcode.NXDOMAIN
    assert _dns(inet, "example.com", "A").rcode() == dns.rcode.REFUSED
    assert _dns(inet, "example.com", "A", tcp=True).rcode() == dns.rcode.REFUSED


def test_dns_survives_malformed_datagrams(inet: Inet) -> None:
    with kn.netns_socket(inet.ns("egd-proxy1"), socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for junk in (
            b"",
            b"\x00",
            b"\xff" * 40,
            b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c",
        ):
            sock.sendto(junk, (str(INET_DNS), 53))
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if sum(1 for e in inet.events() if e.get("event") == "dns_dropped") >= 4:
            break
        time.sleep(0.05)
    dropped = [e for e in inet.events() if e.get("event") == "dns_dropped"]
    assert len(dropped) >= 4 and {e["reason"] for e in dropped} == {"malformed"}
    assert _dns(inet, "evil.test", "A").answer  # still answering


def test_metadata_answers_inside_the_internet(inet: Inet) -> None:
    result = inet.curl(
        "egd-inet", f"http://{METADATA}/latest/meta-data/iam/security-credentials/egressd-fake-role"
    )
    assert json.loads(result.stdout) == FAKE_CREDENTIAL


def test_metadata_is_unreachable_from_nodes(inet: Inet) -> None:
    # The node namespaces have no route out of the underlay; what stops a
    # sandbox is tier 1, then the proxy's always-denied 169.254/16 (the proxy
    # itself, like a cloud VM, can reach it through its default route).
    result = inet.curl("egd-node1", "--connect-timeout", "2", f"http://{METADATA}/", check=False)
    assert result.returncode == 7  # could not connect
    result = inet.curl("egd-proxy1", f"http://{METADATA}/")
    assert json.loads(result.stdout)["marker"] == "egressd-fake-metadata"
