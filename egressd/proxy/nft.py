"""The proxy host's netfilter rules, policy routing and sysctls (DESIGN.md step 6).

Owned by the proxy process: `ensure()` at start, `remove()` at stop. Both are
idempotent (calling either twice gives the same state and no error) and act
only on the network namespace the process runs in.

nftables, one table `inet egressd`, replaced atomically by one `nft -f`
transaction (`table ...; delete table ...; table ... { ... }`: create-if-
missing, delete, recreate, all or nothing)::

    chain prerouting (filter, hook prerouting, priority mangle):
      iifname gnv0 ip daddr RESOLVER udp dport 53 tproxy ip to 127.0.0.1:DNS  mark 1 accept
      iifname gnv0 ip daddr RESOLVER tcp dport 53 tproxy ip to 127.0.0.1:DNS  mark 1 accept
      iifname gnv0 meta nfproto ipv4 meta l4proto tcp tproxy ip to 127.0.0.1:TCP mark 1 accept
    chain input (filter, hook input, priority filter):
      iifname gnv0 meta mark != 1 counter drop

The DNS rules come first, so TCP to the resolver's port 53 reaches the DNS
responder and not the TCP interceptor. The input chain is the backstop: a
packet from a sandbox that reaches a local socket without having been
TPROXYed (UDP to the proxy's own underlay address, say GENEVE-in-GENEVE to
port 6081, or to the admin port) is dropped and counted.

The kernel data path (`NftSpec.decap_mark`, `egressd.proxy.kernel`): packets that
tc decapsulated on the underlay carry that mark instead of arriving on gnv0, so
the three prerouting rules are repeated with ``meta mark 0x2`` in place of
``iifname gnv0``, the input chain drops a marked packet that nothing TPROXYed,
and rp_filter is 0 on the underlay too (restored by `remove()`).

Policy routing: `ip rule fwmark 1 lookup 100` and `local 0.0.0.0/0 dev lo
table 100`, so marked (TPROXYed) packets are delivered locally whatever
their destination. `SANDBOX_SUPERNET dev gnv0` in the main table is the
return path: replies to sandboxes go to the TUN, where the tunnel sends
them back to their node.

Sysctls (this namespace only): `net.ipv4.ip_forward=0` (the proxy terminates
sandbox connections and never routes a sandbox packet onward: a packet that
escapes the TPROXY rules dies here), `rp_filter=0` on `all` and on gnv0
(TPROXYed packets have non-local destinations), and IPv6 disabled on gnv0
(the kernel would otherwise send router solicitations into the tunnel). The
previous values of `ip_forward` and `all.rp_filter` are restored by
`remove()`.

After `ensure()` the state is read back (`nft -j list table inet egressd`,
the rule and routes over netlink); a difference is `NftError("not_applied")`.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from egressd.errors import EgressdError

TABLE_FAMILY = "inet"
TABLE_NAME = "egressd"
FWMARK = 1
ROUTE_TABLE = 100
RULE_PRIORITY = 1000
NFT = "nft"
COMMAND_TIMEOUT_S = 10.0
PROC_SYS = Path("/proc/sys")
RTN_LOCAL = 2
# errnos that mean "already so" when adding, "already gone" when deleting.
_EXISTS = frozenset({errno.EEXIST})
_GONE = frozenset({errno.ENOENT, errno.ESRCH, errno.ENODEV, errno.EADDRNOTAVAIL})


class NftError(EgressdError):
    """A netfilter, routing or sysctl change that failed.

    Reasons: `nft_failed`, `route_failed`, `rule_failed`, `sysctl_failed`,
    `not_applied`.
    """


@dataclass(frozen=True, slots=True)
class NftSpec:
    """What the rules need to know; see `ProxyNetfilter`."""

    tun: str
    resolver: ipaddress.IPv4Address
    tproxy_tcp_port: int
    tproxy_dns_port: int
    sandbox_supernet: ipaddress.IPv4Network
    listen_host: str = "127.0.0.1"
    fwmark: int = FWMARK
    #: The kernel data path (`egressd.proxy.kernel`): the mark its tc ingress program
    #: sets on the packets it decapsulated, and the underlay they arrive on. None: the
    #: userspace data path, where every sandbox packet comes in through the TUN.
    decap_mark: int | None = None
    underlay: str | None = None
    route_table: int = ROUTE_TABLE
    rule_priority: int = RULE_PRIORITY

    def ruleset(self) -> str:
        """The `nft -f` script that (re)creates the table atomically."""
        tun = json.dumps(self.tun)  # a quoted nft string
        mark = f"0x{self.fwmark:x}"
        dns = f"tproxy ip to {self.listen_host}:{self.tproxy_dns_port} meta mark set {mark} accept"
        tcp = f"tproxy ip to {self.listen_host}:{self.tproxy_tcp_port} meta mark set {mark} accept"
        sources = [f"iifname {tun}"]
        if self.decap_mark is not None:
            sources.append(f"meta mark 0x{self.decap_mark:x}")
        prerouting = [
            rule
            for source in sources
            for rule in (
                f"    {source} ip daddr {self.resolver} udp dport 53 {dns}",
                f"    {source} ip daddr {self.resolver} tcp dport 53 {dns}",
                f"    {source} meta nfproto ipv4 meta l4proto tcp {tcp}",
            )
        ]
        backstop = [f"    iifname {tun} meta mark != {mark} counter drop"]
        if self.decap_mark is not None:
            backstop.append(f"    meta mark 0x{self.decap_mark:x} counter drop")
        return "\n".join(
            [
                f"table {TABLE_FAMILY} {TABLE_NAME} {{}}",
                f"delete table {TABLE_FAMILY} {TABLE_NAME}",
                f"table {TABLE_FAMILY} {TABLE_NAME} {{",
                "  chain prerouting {",
                "    type filter hook prerouting priority mangle; policy accept;",
                *prerouting,
                "  }",
                "  chain input {",
                "    type filter hook input priority filter; policy accept;",
                *backstop,
                "  }",
                "}",
                "",
            ]
        )


def _run_nft(args: list[str], *, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [NFT, *args],
            input=stdin,
            capture_output=True,
            text=True,
            check=False,
            timeout=COMMAND_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NftError("nft_failed", f"nft {' '.join(args)}: {exc}") from exc


def list_table() -> dict[str, Any] | None:
    """`nft -j list table inet egressd` decoded, or None when the table does not exist."""
    result = _run_nft(["-j", "list", "table", TABLE_FAMILY, TABLE_NAME])
    if result.returncode != 0:
        if "No such file" in result.stderr:
            return None
        raise NftError("nft_failed", f"list table: {' '.join(result.stderr.split())}")
    try:
        doc = json.loads(result.stdout)
    except ValueError as exc:
        raise NftError("nft_failed", f"list table: not JSON: {exc}") from exc
    return doc if isinstance(doc, dict) else None


def table_summary(doc: dict[str, Any]) -> dict[str, list[list[str]]]:
    """Chain name -> each rule's statement kinds, e.g. ["match", "match", "tproxy", "mangle", "accept"]."""
    out: dict[str, list[list[str]]] = {}
    for item in doc.get("nftables", []):
        if "chain" in item:
            out.setdefault(item["chain"]["name"], [])
        elif "rule" in item:
            rule = item["rule"]
            out.setdefault(rule["chain"], []).append([next(iter(e)) for e in rule["expr"]])
    return out


@contextlib.contextmanager
def _ipr() -> Iterator[IPRoute]:
    try:
        ipr = IPRoute()
    except OSError as exc:
        raise NftError("route_failed", f"netlink: {exc}") from exc
    try:
        yield ipr
    finally:
        ipr.close()


def _read_sysctl(key: str) -> str | None:
    path = PROC_SYS / key.replace(".", "/")
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise NftError("sysctl_failed", f"read {key}: {exc.strerror or exc}") from exc


def _write_sysctl(key: str, value: str) -> None:
    path = PROC_SYS / key.replace(".", "/")
    try:
        path.write_text(value)
    except OSError as exc:
        raise NftError("sysctl_failed", f"{key}={value}: {exc.strerror or exc}") from exc


@dataclass
class ProxyNetfilter:
    """Install and remove the proxy's nftables table, policy routing and sysctls."""

    spec: NftSpec
    _saved: dict[str, str] = field(default_factory=dict)
    # ensure/remove/problems may run in worker threads (asyncio.to_thread); one
    # at a time, and once removed, a late ensure() installs nothing.
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _removed: bool = False

    # --- ensure --------------------------------------------------------------------

    def ensure(self) -> None:
        """Install everything (the TUN must exist for the supernet route). Idempotent.

        After `remove()` this does nothing: the owner is shutting down.
        """
        with self._lock:
            if self._removed:
                return
            self._ensure()

    def _ensure(self) -> None:
        self._ensure_sysctls()
        self._ensure_table()
        with _ipr() as ipr:
            self._ensure_rule(ipr)
            self._ensure_local_route(ipr)
            self._ensure_supernet_route(ipr)
        problems = self._problems()
        if problems:
            raise NftError("not_applied", "; ".join(problems))

    def _ensure_sysctls(self) -> None:
        tun = self.spec.tun
        wanted = [
            ("net.ipv4.ip_forward", "0", True),
            ("net.ipv4.conf.all.rp_filter", "0", True),
            (f"net.ipv4.conf.{tun}.rp_filter", "0", False),
            (f"net.ipv6.conf.{tun}.disable_ipv6", "1", False),
        ]
        if self.spec.underlay is not None:
            # Decapsulated sandbox packets arrive on the underlay, while the route
            # back to their source is the TUN: strict reverse-path filtering would
            # drop them (the effective value is the larger of `all` and the device's).
            wanted.append((f"net.ipv4.conf.{self.spec.underlay}.rp_filter", "0", True))
        for key, value, restore in wanted:
            current = _read_sysctl(key)
            if current is None:  # no IPv6 in this kernel, or no such device yet
                continue
            if restore and key not in self._saved:
                self._saved[key] = current
            if current != value:
                _write_sysctl(key, value)

    def _ensure_table(self) -> None:
        result = _run_nft(["-f", "-"], stdin=self.spec.ruleset())
        if result.returncode != 0:
            raise NftError("nft_failed", f"nft -f: {' '.join(result.stderr.split())}")

    def _rules(self, ipr: IPRoute) -> list[Any]:
        spec = self.spec
        try:
            return [
                r
                for r in ipr.get_rules(family=socket.AF_INET)
                if r.get_attr("FRA_FWMARK") == spec.fwmark
                and (r.get_attr("FRA_TABLE") or r["table"]) == spec.route_table
            ]
        except NetlinkError as exc:
            raise NftError("rule_failed", f"dump rules: {exc}") from exc

    def _ensure_rule(self, ipr: IPRoute) -> None:
        if self._rules(ipr):
            return
        spec = self.spec
        try:
            ipr.rule(
                "add",
                family=socket.AF_INET,
                fwmark=spec.fwmark,
                table=spec.route_table,
                priority=spec.rule_priority,
            )
        except NetlinkError as exc:
            if exc.code not in _EXISTS:
                raise NftError(
                    "rule_failed", f"fwmark {spec.fwmark} lookup {spec.route_table}: {exc}"
                ) from exc

    def _local_routes(self, ipr: IPRoute) -> list[Any]:
        try:
            return [
                r
                for r in ipr.route("dump", family=socket.AF_INET, table=self.spec.route_table)
                if (r.get_attr("RTA_TABLE") or r["table"]) == self.spec.route_table
                and r["dst_len"] == 0
                and r["type"] == RTN_LOCAL
            ]
        except NetlinkError as exc:
            raise NftError("route_failed", f"dump table {self.spec.route_table}: {exc}") from exc

    def _ensure_local_route(self, ipr: IPRoute) -> None:
        if self._local_routes(ipr):
            return
        lo = _ifindex(ipr, "lo")
        if lo is None:
            raise NftError("route_failed", "no loopback interface")
        try:
            ipr.route(
                "replace",
                dst="0.0.0.0/0",
                type="local",
                scope="host",
                oif=lo,
                table=self.spec.route_table,
            )
        except NetlinkError as exc:
            raise NftError(
                "route_failed", f"local 0.0.0.0/0 table {self.spec.route_table}: {exc}"
            ) from exc

    def _supernet_routes(self, ipr: IPRoute, index: int | None = None) -> list[Any]:
        net = self.spec.sandbox_supernet
        try:
            return [
                r
                for r in ipr.route("dump", family=socket.AF_INET, table=254)
                if r.get_attr("RTA_DST") == str(net.network_address)
                and r["dst_len"] == net.prefixlen
                and (index is None or r.get_attr("RTA_OIF") == index)
            ]
        except NetlinkError as exc:
            raise NftError("route_failed", f"dump main table: {exc}") from exc

    def _ensure_supernet_route(self, ipr: IPRoute) -> None:
        index = _ifindex(ipr, self.spec.tun)
        if index is None:
            raise NftError("route_failed", f"no interface {self.spec.tun!r} for the return route")
        if self._supernet_routes(ipr, index):
            return
        try:
            ipr.route("replace", dst=str(self.spec.sandbox_supernet), oif=index)
        except NetlinkError as exc:
            raise NftError(
                "route_failed", f"{self.spec.sandbox_supernet} dev {self.spec.tun}: {exc}"
            ) from exc

    # --- check ---------------------------------------------------------------------

    def problems(self) -> list[str]:
        """What differs from the wanted state (empty: all installed)."""
        with self._lock:
            return self._problems()

    def _problems(self) -> list[str]:
        out: list[str] = []
        doc = list_table()
        if doc is None:
            out.append(f"nft table {TABLE_FAMILY} {TABLE_NAME} missing")
        else:
            summary = table_summary(doc)
            prerouting = summary.get("prerouting", [])
            sources = 1 if self.spec.decap_mark is None else 2
            if len(prerouting) != 3 * sources or any("tproxy" not in rule for rule in prerouting):
                out.append(f"prerouting chain is {prerouting}")
            backstop = [["match", "match", "counter", "drop"]]
            if self.spec.decap_mark is not None:
                backstop.append(["match", "counter", "drop"])
            if summary.get("input") != backstop:
                out.append(f"input chain is {summary.get('input')}")
        with _ipr() as ipr:
            if not self._rules(ipr):
                out.append(f"no ip rule fwmark {self.spec.fwmark} lookup {self.spec.route_table}")
            if not self._local_routes(ipr):
                out.append(f"no local default route in table {self.spec.route_table}")
            index = _ifindex(ipr, self.spec.tun)
            if index is None or not self._supernet_routes(ipr, index):
                out.append(f"no route {self.spec.sandbox_supernet} dev {self.spec.tun}")
        if _read_sysctl("net.ipv4.ip_forward") != "0":
            out.append("net.ipv4.ip_forward is not 0")
        return out

    # --- remove --------------------------------------------------------------------

    def remove(self) -> list[str]:
        """Remove the table, rule and routes; restore saved sysctls. Idempotent.

        Carries on past a failing step and returns what could not be removed.
        """
        with self._lock:
            self._removed = True
            return self._remove()

    def _remove(self) -> list[str]:
        failures: list[str] = []
        result = _run_nft(
            ["-f", "-"],
            stdin=f"table {TABLE_FAMILY} {TABLE_NAME} {{}}\ndelete table {TABLE_FAMILY} {TABLE_NAME}\n",
        )
        if result.returncode != 0:
            failures.append(f"nft delete table: {' '.join(result.stderr.split())}")
        try:
            with _ipr() as ipr:
                failures += self._remove_routing(ipr)
        except NftError as exc:
            failures.append(exc.detail)
        for key, value in list(self._saved.items()):
            try:
                if _read_sysctl(key) not in (None, value):
                    _write_sysctl(key, value)
                del self._saved[key]
            except NftError as exc:
                failures.append(exc.detail)
        return failures

    def _remove_routing(self, ipr: IPRoute) -> list[str]:
        failures: list[str] = []
        spec = self.spec
        for rule in self._rules(ipr):  # every duplicate, if someone added more than one
            try:
                # The kernel matches a deletion on every given attribute; the
                # priority must be the rule's own.
                ipr.rule(
                    "del",
                    family=socket.AF_INET,
                    fwmark=spec.fwmark,
                    table=spec.route_table,
                    priority=rule.get_attr("FRA_PRIORITY"),
                )
            except NetlinkError as exc:
                if exc.code not in _GONE:
                    failures.append(f"ip rule del: {exc}")
        if self._rules(ipr):
            failures.append(f"ip rule fwmark {spec.fwmark} lookup {spec.route_table} still there")
        for route in self._local_routes(ipr):
            try:
                # Deletion matches on scope too: the same attributes as the add.
                ipr.route(
                    "del",
                    dst="0.0.0.0/0",
                    type="local",
                    scope="host",
                    table=spec.route_table,
                    oif=route.get_attr("RTA_OIF"),
                )
            except NetlinkError as exc:
                if exc.code not in _GONE:
                    failures.append(f"local route del: {exc}")
        if self._local_routes(ipr):
            failures.append(f"local default route in table {spec.route_table} still there")
        index = _ifindex(ipr, spec.tun)
        # Only the route through our TUN: it goes with the device anyway, and a
        # route to the supernet through anything else is not ours to delete.
        for route in self._supernet_routes(ipr, index) if index is not None else []:
            try:
                ipr.route("del", dst=str(spec.sandbox_supernet), oif=route.get_attr("RTA_OIF"))
            except NetlinkError as exc:
                if exc.code not in _GONE:
                    failures.append(f"supernet route del: {exc}")
        return failures


def _ifindex(ipr: IPRoute, name: str) -> int | None:
    try:
        found = ipr.link_lookup(ifname=name)
    except NetlinkError:
        return None
    return int(found[0]) if found else None
