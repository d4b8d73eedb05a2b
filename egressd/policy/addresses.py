"""Always-denied address ranges and a pure classifier that names the reason.

`classify_address` answers one question: may egressd connect to this address
at all, policy aside? It returns ``None`` for an address that is publicly
routable as far as egressd is concerned, else a reason token (``deny_private``,
``deny_link_local`` ...) that counters and audit lines use verbatim. It does no
I/O and never raises; an argument that is not an IP address yields
``"invalid_address"``.

The ranges are data (`ALWAYS_DENIED`), checked in order after the fleet's own
addresses and ranges. ``fleet_ranges`` may be a plain sequence of networks
(``deny_fleet_range``) or a `FleetAddresses`, which adds every fleet member's
exact addresses (``fleet_address``, checked before anything else; DESIGN.md:
"every address of every fleet member ... kept current from the control plane's
registry"). Those lie anywhere, also inside ranges that are not denied at all
(a proxy's egress address is in the test "internet" 203.0.113.0/24). Beyond the list in the design
(0/8, 10/8, 100.64/10, 127/8, 169.254/16, 172.16/12, 192.168/16, 198.18/15,
224/4, 240/4) the IPv6 side denies the unspecified and loopback addresses,
unique-local, link-local, site-local, multicast, discard-only, and every form
that embeds an IPv4 address: IPv4-mapped (``::ffff:0:0/96``),
IPv4-compatible (``::/96``), NAT64 (``64:ff9b::/96``, ``64:ff9b:1::/48``),
6to4 (``2002::/16``) and Teredo (``2001::/32``). For an embedding form the
embedded IPv4 address is classified first and its reason returned when it is
denied (``::ffff:127.0.0.1`` -> ``deny_loopback``), else the form's own reason
(``::ffff:8.8.8.8`` -> ``deny_ipv4_mapped``): egressd speaks IPv4 upstream, so
an IPv4 destination must be named as IPv4. The IPv4 documentation ranges
(192.0.2/24, 198.51.100/24, 203.0.113/24) are NOT denied: the local topology's
"internet" is 203.0.113.0/24.

The override rule (DESIGN.md: "always denied, whatever a policy says, unless it
names the exact CIDR"), implemented by `denied_unless_exact`:

* A denied address is allowed only by a ``cidr`` rule that contains the
  address and whose network lies entirely inside the always-denied range that
  matched: ``10.1.2.0/24`` (or ``10.0.0.0/8`` itself) may allow ``10.1.2.7``;
  ``0.0.0.0/0``, ``8.0.0.0/6`` or any host rule never does. A name that
  resolves into a denied range is therefore denied (DNS rebinding) unless a
  cidr rule names that range.
* Only the reasons in `OVERRIDABLE_REASONS` can be overridden: private,
  CGNAT, link-local (so a policy must name ``169.254.169.254/32`` or a
  subnet of 169.254/16 explicitly to reach a metadata service), benchmarking
  and unique-local. Never overridable: the fleet's own addresses and ranges; loopback,
  "this network" (0/8) and the unspecified address, because the proxy
  connects from its own host and those reach the proxy host itself;
  multicast and reserved/broadcast (no TCP peer can live there); and the
  IPv6 embedding forms (name the IPv4 address instead). This is stricter
  than the design's wording for 127/8 and 0/8 on purpose.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import overload

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DENY_FLEET_RANGE = "deny_fleet_range"
FLEET_ADDRESS = "fleet_address"
INVALID_ADDRESS = "invalid_address"


def _net(text: str) -> IPNetwork:
    return ipaddress.ip_network(text, strict=True)


# Order matters only where ranges nest (the IPv6 ::/128, ::1/128 and
# ::ffff:0:0/96 entries come before ::/96): the first match wins.
ALWAYS_DENIED: tuple[tuple[IPNetwork, str], ...] = (
    (_net("0.0.0.0/8"), "deny_this_network"),
    (_net("10.0.0.0/8"), "deny_private"),
    (_net("100.64.0.0/10"), "deny_cgnat"),
    (_net("127.0.0.0/8"), "deny_loopback"),
    (_net("169.254.0.0/16"), "deny_link_local"),
    (_net("172.16.0.0/12"), "deny_private"),
    (_net("192.168.0.0/16"), "deny_private"),
    (_net("198.18.0.0/15"), "deny_benchmark"),
    (_net("224.0.0.0/4"), "deny_multicast"),
    (_net("240.0.0.0/4"), "deny_reserved"),
    (_net("::/128"), "deny_unspecified"),
    (_net("::1/128"), "deny_loopback"),
    (_net("::ffff:0:0/96"), "deny_ipv4_mapped"),
    (_net("::/96"), "deny_ipv4_compatible"),
    (_net("64:ff9b::/96"), "deny_nat64"),
    (_net("64:ff9b:1::/48"), "deny_nat64"),
    (_net("100::/64"), "deny_discard"),
    (_net("2001::/32"), "deny_teredo"),
    (_net("2002::/16"), "deny_6to4"),
    (_net("fc00::/7"), "deny_unique_local"),
    (_net("fe80::/10"), "deny_link_local"),
    (_net("fec0::/10"), "deny_site_local"),
    (_net("ff00::/8"), "deny_multicast"),
)

OVERRIDABLE_REASONS: frozenset[str] = frozenset(
    {"deny_private", "deny_cgnat", "deny_link_local", "deny_benchmark", "deny_unique_local"}
)


def _low32(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    return ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)


def _sixtofour(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    return ip.sixtofour


def _teredo_client(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    pair = ip.teredo
    return pair[1] if pair is not None else None


# Embedding forms: how to find the IPv4 address inside. 64:ff9b:1::/48 has no
# fixed embedding position (RFC 8215), so it is denied as a whole.
_EMBEDDED_V4: dict[IPNetwork, Callable[[ipaddress.IPv6Address], ipaddress.IPv4Address | None]] = {
    _net("::ffff:0:0/96"): _low32,
    _net("::/96"): _low32,
    _net("64:ff9b::/96"): _low32,
    _net("2002::/16"): _sixtofour,
    _net("2001::/32"): _teredo_client,
}


@dataclass(frozen=True, slots=True, eq=False)
class FleetAddresses(Sequence[IPNetwork]):
    """The fleet's own ranges (configured) and its members' exact addresses (registry).

    As a sequence it is its `ranges`, so it goes wherever ``fleet_ranges`` is
    taken; `find_denied` also denies every address in `members` with
    ``fleet_address``. Immutable: a change is a new object (`with_members`)
    with a higher `version`, and equality is identity, so a cache that keeps
    the object it decided with (``is``) never serves a decision made before
    the change.
    """

    ranges: tuple[IPNetwork, ...] = ()
    members: frozenset[IPAddress] = frozenset()
    version: int = 0

    def __len__(self) -> int:
        return len(self.ranges)

    def __bool__(self) -> bool:
        # Not just "has ranges": a set of members alone still denies something.
        return bool(self.ranges or self.members)

    def __iter__(self) -> Iterator[IPNetwork]:
        return iter(self.ranges)

    @overload
    def __getitem__(self, index: int) -> IPNetwork: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[IPNetwork, ...]: ...

    def __getitem__(self, index: int | slice) -> IPNetwork | tuple[IPNetwork, ...]:
        return self.ranges[index]

    def is_member(self, ip: object) -> bool:
        addr = parse_address(ip)
        return addr is not None and addr in self.members

    def with_members(self, members: Iterable[IPAddress]) -> FleetAddresses:
        """This set with `members` instead; `self` when they are the same."""
        new = frozenset(members)
        if new == self.members:
            return self
        return FleetAddresses(self.ranges, new, self.version + 1)


@dataclass(frozen=True, slots=True)
class DeniedMatch:
    """Which always-denied range an address fell into, and why."""

    network: IPNetwork | None  # None for an unparseable address
    reason: str

    @property
    def overridable(self) -> bool:
        return self.reason in OVERRIDABLE_REASONS and self.network not in _EMBEDDED_V4


def parse_address(ip: object) -> IPAddress | None:
    """An IPv4/IPv6 address from an address object or string; None if it is neither.

    IPv6 zone ids are dropped (``fe80::1%eth0`` -> ``fe80::1``).
    """
    if isinstance(ip, str):
        try:
            addr: IPAddress = ipaddress.ip_address(ip)
        except ValueError:
            return None
    elif isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address):
        addr = ip
    else:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id is not None:
        addr = ipaddress.IPv6Address(addr.packed)
    return addr


def find_denied(ip: object, *, fleet_ranges: Sequence[IPNetwork] = ()) -> DeniedMatch | None:
    """The always-denied range that `ip` falls into, or None when it is routable."""
    addr = parse_address(ip)
    if addr is None:
        return DeniedMatch(None, INVALID_ADDRESS)
    if type(fleet_ranges) is FleetAddresses and addr in fleet_ranges.members:
        return DeniedMatch(ipaddress.ip_network(addr), FLEET_ADDRESS)
    for net in fleet_ranges:
        if addr.version == net.version and addr in net:
            return DeniedMatch(net, DENY_FLEET_RANGE)
    for net, reason in ALWAYS_DENIED:
        if addr.version != net.version or addr not in net:
            continue
        extract = _EMBEDDED_V4.get(net)
        if extract is not None and isinstance(addr, ipaddress.IPv6Address):
            inner = extract(addr)
            if inner is not None:
                inner_match = find_denied(inner, fleet_ranges=fleet_ranges)
                if inner_match is not None:
                    # Report the embedded reason, but keep the IPv6 range as
                    # the one that matched: embedding forms are not overridable.
                    return DeniedMatch(net, inner_match.reason)
        return DeniedMatch(net, reason)
    return None


def classify_address(ip: IPAddress | str, *, fleet_ranges: Sequence[IPNetwork] = ()) -> str | None:
    """None when `ip` is publicly routable for egressd, else the deny reason."""
    match = find_denied(ip, fleet_ranges=fleet_ranges)
    return None if match is None else match.reason


def denied_unless_exact(
    ip: IPAddress | str,
    rule_cidr: IPNetwork | None,
    *,
    fleet_ranges: Sequence[IPNetwork] = (),
) -> bool:
    """True when `ip` is always-denied and the cidr rule `rule_cidr` does not override that.

    False when `ip` is not denied at all, or when `rule_cidr` contains `ip` and
    lies entirely inside the overridable always-denied range that `ip` matched.
    A host rule (``rule_cidr=None``) never overrides. See the module docstring.
    """
    match = find_denied(ip, fleet_ranges=fleet_ranges)
    if match is None:
        return False
    return not overrides(match, ip, rule_cidr)


def subnet_of(inner: IPNetwork, outer: IPNetwork) -> bool:
    """`inner.subnet_of(outer)`; False across address families (where the stdlib raises)."""
    if isinstance(inner, ipaddress.IPv4Network) and isinstance(outer, ipaddress.IPv4Network):
        return inner.subnet_of(outer)
    if isinstance(inner, ipaddress.IPv6Network) and isinstance(outer, ipaddress.IPv6Network):
        return inner.subnet_of(outer)
    return False


def overrides(match: DeniedMatch, ip: object, rule_cidr: IPNetwork | None) -> bool:
    """Whether a cidr rule `rule_cidr` lifts the denial `match` (found for `ip`)."""
    if rule_cidr is None or match.network is None or not match.overridable:
        return False
    addr = parse_address(ip)
    if addr is None or addr.version != rule_cidr.version or addr not in rule_cidr:
        return False
    if rule_cidr.version != match.network.version:
        return False
    return subnet_of(rule_cidr, match.network)
