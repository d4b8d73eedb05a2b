"""Network namespaces and the links, addresses and routes inside them.

Every change here is idempotent in the manner of pyroute2's `ensure()`: look at
the kernel's state, change only what differs, treat the errnos that mean
"already so" as success, then poll until the kernel shows the wanted state.
Calling any `ensure_*` twice gives the same state and no error.

How the kernel is reached:

- links, addresses and routes: pyroute2 (`IPRoute(netns=NAME, flags=0)`),
  one netlink socket opened inside the namespace per call. `flags=0` matters:
  pyroute2's default (`O_CREAT`) would silently create a missing namespace.
- namespaces: `pyroute2.netns`, which does what `ip netns add/del` do (a bind
  mount of the namespace on `/run/netns/NAME`, `/run/netns` a shared mount).
- sysctls and commands: a child process under
  `nsenter --net=/run/netns/NAME`. Not `ip netns exec`: that remounts `/sys`
  and hides bpffs and the cgroup tree (see DESIGN.md, "gVisor on this kernel").

Nothing here ever acts on the caller's own (root) namespace: every function
takes a namespace name. The functions block (pyroute2's synchronous API runs
its own event loop); from asyncio code, call them through `asyncio.to_thread`.

Every failure is a `NetError` with a `reason` token, raised `from` the
`OSError`, `NetlinkError` or `CalledProcessError` underneath.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns
from pyroute2.netlink.exceptions import NetlinkError

from egressd.errors import EgressdError

NETNS_DIR = Path("/run/netns")
IFNAMSIZ = 15  # usable bytes of IFNAMSIZ (16, NUL included)
MAIN_TABLE = 254
ANY_IPV4 = str(ipaddress.IPv4Address(0))
POLL_TIMEOUT_S = 5.0
POLL_INTERVAL_S = 0.02
COMMAND_TIMEOUT_S = 30.0

_NETNS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_IFNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")
_SYSCTL_KEY = re.compile(r"^[a-z0-9_]+(\.[A-Za-z0-9_-]+)+$")
# errnos that mean "the object is already gone" when deleting.
_GONE = frozenset({errno.ENODEV, errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL})


class NetError(EgressdError):
    """A kernel network change or query that failed.

    `reason` is a token such as `netns_missing`, `link_failed`,
    `addr_failed`, `route_failed`, `sysctl_failed`, `command_failed`,
    `not_applied`, `invalid_name`; `errno` is the underlying errno when
    there is one.
    """

    def __init__(self, reason: str, detail: str = "", *, errno_: int | None = None) -> None:
        super().__init__(reason, detail)
        self.errno = errno_


# --- names -------------------------------------------------------------------


def check_netns_name(name: str) -> str:
    if not _NETNS_NAME.fullmatch(name):
        raise NetError("invalid_name", f"bad network namespace name {name!r}")
    return name


def check_ifname(name: str) -> str:
    if not _IFNAME.fullmatch(name) or len(name.encode()) > IFNAMSIZ:
        raise NetError("invalid_name", f"bad interface name {name!r} (at most {IFNAMSIZ} chars)")
    return name


def netns_path(name: str) -> Path:
    return NETNS_DIR / check_netns_name(name)


# --- namespaces --------------------------------------------------------------


def list_netns(prefix: str = "") -> tuple[str, ...]:
    """Names of the namespaces under /run/netns that start with `prefix`, sorted."""
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return ()
    except OSError as exc:
        raise NetError("netns_list_failed", str(exc), errno_=exc.errno) from exc
    return tuple(sorted(n for n in names if n.startswith(prefix)))


def netns_exists(name: str) -> bool:
    """True when /run/netns/NAME is a mounted namespace (not a stale file)."""
    path = netns_path(name)
    return path.exists() and os.path.ismount(path)


def ensure_netns(name: str) -> None:
    """Create the namespace unless it exists; a stale, unmounted file is replaced."""
    path = netns_path(name)
    if netns_exists(name):
        return
    try:
        if path.exists():  # left behind by a crash: a file that is not a mount
            path.unlink()
        pyroute2_netns.create(name)
    except OSError as exc:
        raise NetError("netns_create_failed", f"{name}: {exc}", errno_=exc.errno) from exc
    _poll(lambda: netns_exists(name), f"netns {name} to exist")


def delete_netns(name: str) -> bool:
    """Remove the namespace's mount and file; True if there was one to remove.

    Kills nothing: a process still inside keeps the namespace (and its links)
    alive, unnamed, until it exits. Deleting a namespace deletes the veths in
    it, and with them their peers in other namespaces.
    """
    path = netns_path(name)
    if not path.exists():
        return False
    try:
        pyroute2_netns.remove(name)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise NetError("netns_delete_failed", f"{name}: {exc}", errno_=exc.errno) from exc
    _poll(lambda: not path.exists(), f"netns {name} to be gone")
    return True


# --- netlink plumbing --------------------------------------------------------


@contextlib.contextmanager
def _errors(reason: str, what: str) -> Iterator[None]:
    """Translate the I/O edge's errors into NetError(reason)."""
    try:
        yield
    except NetlinkError as exc:
        raise NetError(reason, f"{what}: {exc}", errno_=exc.code) from exc
    except OSError as exc:
        raise NetError(reason, f"{what}: {exc}", errno_=exc.errno) from exc


@contextlib.contextmanager
def _ipr(ns: str) -> Iterator[IPRoute]:
    """A netlink socket inside `ns`; never creates the namespace."""
    if not netns_exists(ns):
        raise NetError("netns_missing", f"no network namespace {ns!r}")
    with _errors("netns_open_failed", ns):
        ipr = IPRoute(netns=ns, flags=0)
    try:
        yield ipr
    finally:
        ipr.close()


def _poll(check: Callable[[], bool], what: str, timeout: float = POLL_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise NetError("not_applied", f"timed out waiting for {what}")
        time.sleep(POLL_INTERVAL_S)


def _find_link(ipr: IPRoute, ifname: str) -> Any | None:
    with _errors("link_failed", f"lookup {ifname}"):
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            return None
        links = ipr.get_links(found[0])
    return links[0] if links else None


def _require_link(ipr: IPRoute, ns: str, ifname: str) -> Any:
    link = _find_link(ipr, ifname)
    if link is None:
        raise NetError("link_missing", f"no interface {ifname!r} in {ns}")
    return link


def _kind(link: Any) -> str | None:
    info = link.get("linkinfo")
    return info.get("kind") if info is not None else None


# --- links -------------------------------------------------------------------


def _veth_paired(link_a: Any | None, link_b: Any | None) -> bool:
    return (
        link_a is not None
        and link_b is not None
        and _kind(link_a) == "veth"
        and _kind(link_b) == "veth"
        and link_a.get("link") == link_b["index"]
        and link_b.get("link") == link_a["index"]
    )


def ensure_veth(ns_a: str, name_a: str, ns_b: str, name_b: str) -> None:
    """A veth pair with `name_a` in `ns_a` and `name_b` in `ns_b`.

    The pair is created inside `ns_a` with its peer placed straight into
    `ns_b`, so it never appears in the caller's namespace. An interface of
    either name that is not this pair is deleted and the pair remade.
    """
    check_ifname(name_a)
    check_ifname(name_b)
    with contextlib.ExitStack() as stack:
        ipr_a = stack.enter_context(_ipr(ns_a))
        ipr_b = ipr_a if ns_b == ns_a else stack.enter_context(_ipr(ns_b))

        def paired() -> bool:
            return _veth_paired(_find_link(ipr_a, name_a), _find_link(ipr_b, name_b))

        if paired():
            return
        for ipr, name in ((ipr_a, name_a), (ipr_b, name_b)):
            link = _find_link(ipr, name)
            if link is not None:
                _delete_link(ipr, link["index"], name)
        peer: dict[str, Any] = {"ifname": name_b}
        if ns_b != ns_a:
            peer["net_ns_fd"] = ns_b
        with _errors("link_failed", f"add veth {ns_a}/{name_a} <-> {ns_b}/{name_b}"):
            ipr_a.link("add", ifname=name_a, kind="veth", peer=peer)
        _poll(paired, f"veth {ns_a}/{name_a} <-> {ns_b}/{name_b}")


def _delete_link(ipr: IPRoute, index: int, name: str) -> None:
    try:
        ipr.link("del", index=index)
    except NetlinkError as exc:
        if exc.code not in _GONE:
            raise NetError("link_failed", f"delete {name}: {exc}", errno_=exc.code) from exc


def _ensure_simple_link(ns: str, name: str, kind: str) -> None:
    check_ifname(name)
    with _ipr(ns) as ipr:
        link = _find_link(ipr, name)
        if link is not None and _kind(link) == kind:
            return
        if link is not None:
            _delete_link(ipr, link["index"], name)
        try:
            ipr.link("add", ifname=name, kind=kind)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise NetError(
                    "link_failed", f"add {kind} {ns}/{name}: {exc}", errno_=exc.code
                ) from exc
        _poll(lambda: _kind(_find_link(ipr, name) or {}) == kind, f"{kind} {ns}/{name}")


def ensure_bridge(ns: str, name: str) -> None:
    """A Linux bridge (no STP: ports forward as soon as they are up)."""
    _ensure_simple_link(ns, name, "bridge")


def enslave(ns: str, ifname: str, bridge: str) -> None:
    """Make `ifname` a port of `bridge` (both in `ns`)."""
    with _ipr(ns) as ipr:
        master = _require_link(ipr, ns, bridge)["index"]
        link = _require_link(ipr, ns, ifname)
        if link.get("master") == master:
            return
        with _errors("link_failed", f"enslave {ns}/{ifname} to {bridge}"):
            ipr.link("set", index=link["index"], master=master)
        _poll(
            lambda: _require_link(ipr, ns, ifname).get("master") == master, f"{ifname} in {bridge}"
        )


def set_link_up(ns: str, ifname: str) -> None:
    with _ipr(ns) as ipr:
        link = _require_link(ipr, ns, ifname)
        if link["flags"] & 1:  # IFF_UP
            return
        with _errors("link_failed", f"set {ns}/{ifname} up"):
            ipr.link("set", index=link["index"], state="up")
        _poll(lambda: bool(_require_link(ipr, ns, ifname)["flags"] & 1), f"{ifname} up")


def set_mtu(ns: str, ifname: str, mtu: int) -> None:
    if not 68 <= mtu <= 65535:
        raise NetError("invalid_mtu", f"{mtu}")
    with _ipr(ns) as ipr:
        link = _require_link(ipr, ns, ifname)
        if link.get("mtu") == mtu:
            return
        with _errors("link_failed", f"set {ns}/{ifname} mtu {mtu}"):
            ipr.link("set", index=link["index"], mtu=mtu)
        _poll(lambda: _require_link(ipr, ns, ifname).get("mtu") == mtu, f"{ifname} mtu {mtu}")


def set_gso_max_size(ns: str, ifname: str, size: int) -> None:
    """The largest GSO packet the stack hands `ifname` (``ip link set gso_max_size``)."""
    if not 1 <= size <= 65536:
        raise NetError("invalid_gso_max_size", f"{size}")
    with _ipr(ns) as ipr:
        link = _require_link(ipr, ns, ifname)
        with _errors("link_failed", f"set {ns}/{ifname} gso_max_size {size}"):
            ipr.link("set", index=link["index"], gso_max_size=size)


# --- addresses and routes ----------------------------------------------------


def _addrs(ipr: IPRoute, index: int) -> set[ipaddress.IPv4Interface]:
    with _errors("addr_failed", f"dump addresses of #{index}"):
        msgs = ipr.addr("dump", index=index, family=socket.AF_INET)
        return {
            ipaddress.IPv4Interface(f"{m.get('address')}/{m['prefixlen']}")
            for m in msgs
            if m.get("index", index) == index and m.get("address")
        }


def ensure_addr(ns: str, ifname: str, cidr: str | ipaddress.IPv4Interface) -> None:
    """The IPv4 address `cidr` (e.g. "198.18.0.11/24") on `ifname`.

    The same address with another prefix length is replaced.
    """
    want = ipaddress.IPv4Interface(cidr)
    with _ipr(ns) as ipr:
        index = _require_link(ipr, ns, ifname)["index"]
        have = _addrs(ipr, index)
        if want in have:
            return
        for other in have:
            if other.ip == want.ip:
                with _errors("addr_failed", f"del {other} from {ns}/{ifname}"):
                    ipr.addr(
                        "del", index=index, address=str(other.ip), prefixlen=other.network.prefixlen
                    )
        try:
            ipr.addr("add", index=index, address=str(want.ip), prefixlen=want.network.prefixlen)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise NetError(
                    "addr_failed", f"add {want} to {ns}/{ifname}: {exc}", errno_=exc.code
                ) from exc
        _poll(lambda: want in _addrs(ipr, index), f"{want} on {ns}/{ifname}")


@dataclass(frozen=True, slots=True)
class RouteInfo:
    dst: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address | None
    dev: str | None


def _routes(ipr: IPRoute) -> tuple[RouteInfo, ...]:
    with _errors("route_failed", "dump routes"):
        names = {link["index"]: link.get("ifname") for link in ipr.link("dump")}
        out = []
        for msg in ipr.route("dump", family=socket.AF_INET, table=MAIN_TABLE):
            if msg.get("table", MAIN_TABLE) != MAIN_TABLE:
                continue
            dst = msg.get("dst") or ANY_IPV4
            gateway = msg.get("gateway")
            out.append(
                RouteInfo(
                    dst=ipaddress.IPv4Network(f"{dst}/{msg['dst_len']}"),
                    gateway=ipaddress.IPv4Address(gateway) if gateway else None,
                    dev=names.get(msg.get("oif")),
                )
            )
        return tuple(out)


def ensure_route(
    ns: str,
    dst: str | ipaddress.IPv4Network,
    *,
    via: str | ipaddress.IPv4Address | None = None,
    dev: str | None = None,
) -> None:
    """A main-table route to `dst` ("default" or a CIDR) via a gateway and/or a device.

    `ip route replace` semantics: any other route to the same destination is
    replaced by this one.
    """
    if via is None and dev is None:
        raise NetError("route_failed", "a route needs a gateway or a device")
    net = ipaddress.IPv4Network("0.0.0.0/0" if dst == "default" else dst)
    gateway = ipaddress.IPv4Address(via) if via is not None else None
    with _ipr(ns) as ipr:
        spec: dict[str, Any] = {"dst": str(net), "table": MAIN_TABLE}
        if gateway is not None:
            spec["gateway"] = str(gateway)
        if dev is not None:
            spec["oif"] = _require_link(ipr, ns, dev)["index"]

        def present() -> bool:
            return any(
                r.dst == net
                and (gateway is None or r.gateway == gateway)
                and (dev is None or r.dev == dev)
                for r in _routes(ipr)
            )

        if present():
            return
        with _errors("route_failed", f"replace {net} in {ns}"):
            ipr.route("replace", **spec)
        _poll(present, f"route {net} in {ns}")


# --- state snapshot (for describe/status) ------------------------------------


@dataclass(frozen=True, slots=True)
class LinkInfo:
    name: str
    kind: str | None
    up: bool
    mtu: int
    master: str | None
    addresses: tuple[ipaddress.IPv4Interface, ...]


@dataclass(frozen=True, slots=True)
class NetnsState:
    name: str
    links: tuple[LinkInfo, ...]
    routes: tuple[RouteInfo, ...]

    def link(self, name: str) -> LinkInfo | None:
        return next((link for link in self.links if link.name == name), None)


def netns_state(ns: str) -> NetnsState:
    """Links (with IPv4 addresses) and main-table IPv4 routes of `ns`."""
    with _ipr(ns) as ipr, _errors("link_failed", f"dump links of {ns}"):
        raw = list(ipr.link("dump"))
        names = {link["index"]: link.get("ifname") for link in raw}
        links = tuple(
            LinkInfo(
                name=link.get("ifname"),
                kind=_kind(link),
                up=bool(link["flags"] & 1),
                mtu=link.get("mtu"),
                master=names.get(link.get("master")) if link.get("master") else None,
                addresses=tuple(sorted(_addrs(ipr, link["index"]))),
            )
            for link in raw
        )
        return NetnsState(name=ns, links=links, routes=_routes(ipr))


# --- processes and sysctls inside a namespace --------------------------------


def netns_argv(ns: str, argv: Sequence[str]) -> list[str]:
    """`argv` prefixed to run inside `ns` (network namespace only, same mounts)."""
    return ["nsenter", f"--net={netns_path(ns)}", "--", *argv]


def run_in_netns(
    ns: str,
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = COMMAND_TIMEOUT_S,
    stdin_text: str | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command inside `ns`, capturing text output.

    A non-zero exit raises `NetError("command_failed")` when `check` is true.
    """
    if not netns_exists(ns):
        raise NetError("netns_missing", f"no network namespace {ns!r}")
    cmd = netns_argv(ns, argv)
    try:
        return subprocess.run(
            cmd,
            check=check,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=stdin_text,
            env=dict(env) if env is not None else None,
        )
    except subprocess.CalledProcessError as exc:
        detail = f"{' '.join(argv)} in {ns}: exit {exc.returncode}: {(exc.stderr or '').strip()}"
        raise NetError("command_failed", detail) from exc
    except subprocess.TimeoutExpired as exc:
        raise NetError("command_timeout", f"{' '.join(argv)} in {ns}: after {timeout}s") from exc
    except OSError as exc:
        raise NetError(
            "command_failed", f"{' '.join(argv)} in {ns}: {exc}", errno_=exc.errno
        ) from exc


def popen_in_netns(ns: str, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
    """Start a long-running command inside `ns` (a daemon); the caller owns it."""
    if not netns_exists(ns):
        raise NetError("netns_missing", f"no network namespace {ns!r}")
    try:
        return subprocess.Popen(netns_argv(ns, argv), **popen_kwargs)
    except OSError as exc:
        raise NetError(
            "command_failed", f"{' '.join(argv)} in {ns}: {exc}", errno_=exc.errno
        ) from exc


def _check_sysctl_key(key: str) -> str:
    if not _SYSCTL_KEY.fullmatch(key):
        raise NetError("invalid_name", f"bad sysctl key {key!r}")
    return key


def get_sysctl(ns: str, key: str) -> str:
    result = run_in_netns(ns, ["sysctl", "-n", _check_sysctl_key(key)])
    return result.stdout.strip()


def set_sysctl(ns: str, key: str, value: str | int) -> None:
    """Write a (network) sysctl such as `net.ipv4.ip_forward` inside `ns`, then read it back."""
    want = str(value)
    _check_sysctl_key(key)
    if get_sysctl(ns, key) == want:
        return
    try:
        run_in_netns(ns, ["sysctl", "-q", "-w", f"{key}={want}"])
    except NetError as exc:
        raise NetError("sysctl_failed", f"{key}={want} in {ns}: {exc.detail}") from exc
    if (have := get_sysctl(ns, key)) != want:
        raise NetError("not_applied", f"{key} in {ns} is {have!r}, wanted {want!r}")


def netns_socket(
    ns: str, family: int = socket.AF_INET, sock_type: int = socket.SOCK_STREAM
) -> socket.socket:
    """A socket created inside `ns`, usable from this process (connect/bind/sendto).

    Lets a test or tool talk from a namespace without a child process.
    """
    if not netns_exists(ns):
        raise NetError("netns_missing", f"no network namespace {ns!r}")
    with _errors("socket_failed", f"socket in {ns}"):
        sock: socket.socket = pyroute2_netns.create_socket(
            ns, family=family, socket_type=sock_type, flags=0
        )
    return sock
