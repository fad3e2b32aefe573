"""A typed, idempotent netlink driver: bridges, routes in one table, and ``ip rule`` entries.

It exists so that nothing else in fabmesh speaks pyroute2: callers pass plain
``Route`` values (``fabmesh/mesh/dataplane.py``) and get back what was changed; pyroute2's string verbs
(``ipr.route("add", ...)``) stay in here. It knows netlink, not fabmesh, and
works in the namespace it is given (``None`` for the current one).

Routes are reconciled the Kilo way (``pkg/route/route.go``, ``Table.Set``):
every ``set_routes`` reads the table again, deletes what is stale, adds what is
missing, and so re-adds routes the kernel dropped when a device went away and
came back. A resync with nothing to change sends no write at all (``writes``
counts them).

We own only routes tagged with ``RTPROT_FABMESH`` (250). The kernel stores the
protocol number but never interprets it; iproute2's ``rt_protos`` names values
up to 192 (kernel, boot, static, zebra, bird, bgp, ...) and leaves 250 free.
Tagging lets us share a table with routes that an operator or another daemon
put there, list and delete only ours, and lets a person run
``ip route show table all proto 250`` to see what fabmesh wrote.

Kernel quirks handled here: IPv6 routes come back with metric 1024 and must be
deleted with it; an IPv4 route without a gateway gets scope link, as
``ip route`` does; ``ip rule del`` matches every selector it is not given as a
wildcard (it would remove ``from 10.0.0.0/8 lookup T`` when asked for
``from all lookup T``) but does compare a non-zero protocol, so rules are
written with ours and only ours are removed.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pyroute2 import IPRoute, NetNS
from pyroute2.netlink.exceptions import NetlinkError as _KernelError

from fabmesh.mesh.dataplane import Route

log = logging.getLogger(__name__)

RTPROT_FABMESH = 250
"""Protocol number on every route and rule fabmesh writes (see the module docstring)."""

_IFF_UP = 0x1
_RT_SCOPE_UNIVERSE = 0
_RT_SCOPE_LINK = 253
_FR_ACT_TO_TBL = 1
_FIB_RULE_INVERT = 0x2
_NO_SUPPRESS = 0xFFFFFFFF
# Rule attributes that narrow "from all" or change what a lookup does.
_RULE_SELECTORS = (
    "FRA_SRC",
    "FRA_DST",
    "FRA_IIFNAME",
    "FRA_OIFNAME",
    "FRA_FWMARK",
    "FRA_UID_RANGE",
    "FRA_IP_PROTO",
    "FRA_SPORT_RANGE",
    "FRA_DPORT_RANGE",
    "FRA_L3MDEV",
    "FRA_TUN_ID",
)


class _Verb(StrEnum):
    ADD = "add"
    DEL = "del"
    REPLACE = "replace"
    SET = "set"
    DUMP = "dump"


class _Object(StrEnum):
    LINK = "link"
    ADDR = "addr"
    ROUTE = "route"
    RULE = "rule"


class NetlinkError(RuntimeError):
    """A netlink request could not be carried out; the message names the object and the reason."""


@dataclass(frozen=True)
class RouteChanges:
    """What one ``set_routes`` call changed; a replaced route appears in both."""

    added: tuple[Route, ...] = ()
    removed: tuple[Route, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)


@dataclass(frozen=True)
class RouteFailure:
    route: Route
    reason: str

    def __str__(self) -> str:
        return f"{self.route.key()}: {self.reason}"


class RoutesNotApplied(NetlinkError):
    """Some routes could not be written; every other route was applied (see ``changes``)."""

    def __init__(self, table: int, failures: Iterable[RouteFailure], changes: RouteChanges) -> None:
        self.table = table
        self.failures = tuple(failures)
        self.changes = changes
        listed = "; ".join(str(f) for f in self.failures)
        super().__init__(f"{len(self.failures)} route(s) not applied in table {table}: {listed}")


@dataclass(frozen=True)
class _Installed:
    """A route of ours as the kernel reports it, with what it takes to delete exactly that one."""

    route: Route
    selector: dict[str, Any] = field(compare=False)


class Netlink:
    """One rtnetlink socket in ``netns`` (``None``: the current namespace). Use as a context manager."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self.writes = 0
        """Number of add/del/replace/set requests sent, failed ones included."""
        # flags=0: never create the namespace as a side effect (pyroute2's default is O_CREAT);
        # groups=0: a request socket, not subscribed to events it would have to drain.
        try:
            self._ipr: Any = NetNS(netns, flags=0, groups=0) if netns else IPRoute(groups=0)
        except OSError as exc:
            raise NetlinkError(f"cannot open netlink in netns {netns}: {exc}") from exc

    def close(self) -> None:
        self._ipr.close()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- links ---------------------------------------------------------------------------------

    def link_index(self, name: str) -> int | None:
        link = self._link(name)
        return None if link is None else int(link["index"])

    def ensure_bridge(self, name: str, address_cidr: str, mtu: int | None = None) -> list[str]:
        """Make ``name`` a bridge that is up, carries ``address_cidr`` and, if given, has ``mtu``.

        Other addresses on the bridge are left alone. Returns one line per change; empty when
        the bridge was already as asked.
        """
        interface = ipaddress.ip_interface(address_cidr)
        changes: list[str] = []
        link = self._link(name)
        if link is None:
            if self._write_tolerating(
                f"bridge {name}: create", {errno.EEXIST}, _Object.LINK, _Verb.ADD, ifname=name, kind="bridge"
            ):
                changes.append(self._changed(f"action=create-bridge dev={name}"))
            link = self._link(name)
            if link is None:
                raise NetlinkError(f"bridge {name}: created but the kernel does not list it")
        kind = link.get(("linkinfo", "kind"))
        if kind != "bridge":
            raise NetlinkError(f"bridge {name}: a {kind or 'plain'} link of that name exists, not a bridge")
        index = int(link["index"])
        if not self._has_address(index, interface) and self._write_tolerating(
            f"bridge {name}: add address {interface}",
            {errno.EEXIST},
            _Object.ADDR,
            _Verb.ADD,
            index=index,
            address=str(interface.ip),
            prefixlen=interface.network.prefixlen,
        ):
            changes.append(self._changed(f"action=add-address dev={name} address={interface}"))
        current_mtu = link.get("mtu")
        if mtu is not None and current_mtu != mtu:
            self._write_tolerating(
                f"bridge {name}: set mtu {mtu}", set(), _Object.LINK, _Verb.SET, index=index, mtu=mtu
            )
            changes.append(self._changed(f"action=set-mtu dev={name} mtu={mtu} was={current_mtu}"))
        if not link["flags"] & _IFF_UP:
            self._write_tolerating(
                f"bridge {name}: set up", set(), _Object.LINK, _Verb.SET, index=index, state="up"
            )
            changes.append(self._changed(f"action=set-up dev={name}"))
        return changes

    def delete_link(self, name: str) -> list[str]:
        """Delete the link ``name`` (our bridge, on uninstall); nothing when it is gone already."""
        index = self.link_index(name)
        if index is None:
            return []
        if not self._write_tolerating(f"link {name}: delete", {errno.ENODEV}, _Object.LINK, _Verb.DEL, index=index):
            return []
        return [self._changed(f"action=delete-link dev={name}")]

    def addresses(self) -> list[str]:
        """Every address configured in the namespace (IPv4 and IPv6), as plain strings."""
        found = []
        for family in (socket.AF_INET, socket.AF_INET6):
            for m in self._dump(_Object.ADDR, family=family):
                address = m.get("local") or m.get("address")
                if address:
                    found.append(str(ipaddress.ip_address(address)))
        return sorted(found)

    def ensure_host_address(self, device: str, address: str) -> list[str]:
        """Put ``address`` (as a host /32 or /128) on ``device`` unless it is there already."""
        index = self.link_index(device)
        if index is None:
            raise NetlinkError(f"address {address}: device {device} does not exist")
        interface = ipaddress.ip_interface(address)
        host = ipaddress.ip_interface(f"{interface.ip}/{interface.max_prefixlen}")
        if self._has_address(index, host):
            return []
        # An IPv4 address carries a label: ours says so, and an uninstall removes only what carries it.
        label = {"label": _anchor_label(device)} if host.version == 4 else {}
        self._write_tolerating(f"{device}: add address {host}", {errno.EEXIST}, _Object.ADDR, _Verb.ADD,
                               index=index, address=str(host.ip), prefixlen=host.network.prefixlen, **label)
        return [self._changed(f"action=add-address dev={device} address={host}")]

    def remove_host_address(self, device: str, address: str) -> list[str]:
        """Take the host address (/32 or /128) ``address`` that :meth:`ensure_host_address` added off ``device``.

        Nothing when it is not there; an IPv4 address without our label is someone else's (a node that
        holds its own address on ``lo``) and stays. IPv6 has no labels: a /128 there is taken as ours.
        """
        index = self.link_index(device)
        interface = ipaddress.ip_interface(address)
        host = ipaddress.ip_interface(f"{interface.ip}/{interface.max_prefixlen}")
        if index is None or not self._has_address(index, host):
            return []
        if host.version == 4 and not any(
                m["index"] == index and m.get("local") == str(host.ip) and m.get("label") == _anchor_label(device)
                for m in self._dump(_Object.ADDR, family=socket.AF_INET)):
            return []
        if not self._write_tolerating(f"{device}: delete address {host}", {errno.EADDRNOTAVAIL}, _Object.ADDR,
                                      _Verb.DEL, index=index, address=str(host.ip), prefixlen=host.network.prefixlen):
            return []
        return [self._changed(f"action=delete-address dev={device} address={host}")]

    def device_towards(self, destination: str) -> str | None:
        """The device the kernel would send a packet to ``destination`` out of (``ip route get``)."""
        try:
            answer = self._ipr.route("get", dst=destination)
        except Exception:  # pyroute2 raises NetlinkError (ENETUNREACH) when there is no route
            return None
        index = answer[0].get("RTA_OIF") if answer else None
        return self._link_names().get(index) if index else None

    # -- routes --------------------------------------------------------------------------------

    def routes(self, table: int) -> list[Route]:
        """Our routes (protocol ``RTPROT_FABMESH``, IPv4 and IPv6) in ``table``, sorted."""
        installed, duplicates = self._installed(table, self._link_names())
        return sorted([i.route for i in installed.values()] + [d.route for d in duplicates])

    def set_routes(self, table: int, desired: Iterable[Route]) -> RouteChanges:
        """Make our routes in ``table`` exactly ``desired``; routes of other protocols are not touched.

        A route whose destination is already ours but whose device, gateway, source or MTU
        differs is replaced in one request (no window without a route). A route that cannot
        be written (missing device, a foreign route already holding that destination, the
        kernel refusing it) does not stop the others: all the rest are applied, then
        ``RoutesNotApplied`` lists every failure. When a replacement fails the old route stays.
        """
        failures: list[RouteFailure] = []
        by_dst: dict[str, Route] = {}
        for route in sorted(set(desired)):
            if route.table != table:
                failures.append(RouteFailure(route, f"belongs to table {route.table}, not {table}"))
            elif route.dst in by_dst:
                reason = f"destination already asked for by {by_dst[route.dst].key()}"
                failures.append(RouteFailure(route, reason))
            else:
                by_dst[route.dst] = route
        wanted = {route.key(): route for route in by_dst.values()}

        names = self._link_names()
        indexes = {name: index for index, name in names.items()}
        installed, duplicates = self._installed(table, names)
        stale = [i for key, i in installed.items() if key not in wanted] + duplicates
        missing = [r for key, r in wanted.items() if key not in installed]

        to_replace: list[tuple[_Installed, Route]] = []
        to_add: list[Route] = []
        not_deleted: set[int] = set()  # ids of stale routes to be replaced, or left for a failed one
        for route in missing:
            old = next((s for s in stale if s.route.dst == route.dst and id(s) not in not_deleted), None)
            if old is not None:
                not_deleted.add(id(old))
            if route.dev not in indexes:
                failures.append(RouteFailure(route, f"device {route.dev!r} does not exist"))
            elif old is not None:
                to_replace.append((old, route))
            else:
                to_add.append(route)

        added: list[Route] = []
        removed: list[Route] = []
        for old in stale:
            if id(old) not in not_deleted and self._delete_route(old, failures):
                removed.append(old.route)
        for old, route in to_replace:
            if self._write_route(_Verb.REPLACE, route, indexes[route.dev], failures):
                removed.append(old.route)
                added.append(route)
        for route in to_add:
            if self._write_route(_Verb.ADD, route, indexes[route.dev], failures):
                added.append(route)

        changes = RouteChanges(added=tuple(sorted(added)), removed=tuple(sorted(removed)))
        if failures:
            raise RoutesNotApplied(table, failures, changes)
        return changes

    # -- rules ---------------------------------------------------------------------------------

    def ensure_rule(self, table: int, priority: int) -> bool:
        """Ensure an IPv4 ``from all lookup <table>`` rule at ``priority``; True when one was added.

        A matching rule written by someone else counts as present: the kernel would happily
        hold a duplicate that differs only in protocol.
        """
        if self._plain_rules(table, priority):
            return False
        added = self._write_rule(_Verb.ADD, table, priority, {errno.EEXIST})
        if added:
            self._changed(f"action=add-rule table={table} priority={priority}")
        return added

    def remove_rule(self, table: int, priority: int) -> bool:
        """Remove our ``from all lookup <table>`` rule at ``priority``; True when one was removed."""
        removed = False
        for _ in (r for r in self._plain_rules(table, priority) if r.get("protocol") == RTPROT_FABMESH):
            # The protocol is what makes the kernel pick this rule and not one with a selector.
            if self._write_rule(_Verb.DEL, table, priority, {errno.ENOENT, errno.ESRCH}):
                removed = True
                self._changed(f"action=remove-rule table={table} priority={priority}")
        return removed

    def _write_rule(self, verb: _Verb, table: int, priority: int, tolerated: set[int]) -> bool:
        # The protocol marks the rule as ours; the kernel matches it on delete too.
        return self._write_tolerating(f"rule from all lookup {table} pref {priority}", tolerated, _Object.RULE, verb,
                                      family=socket.AF_INET, table=table, priority=priority, action="to_tbl",
                                      protocol=RTPROT_FABMESH)

    # -- observing -----------------------------------------------------------------------------

    def _dump(self, obj: _Object, /, **spec: Any) -> list[Any]:
        return list(getattr(self._ipr, obj)(_Verb.DUMP, **spec))

    def _link(self, name: str) -> Any | None:
        return next((m for m in self._dump(_Object.LINK) if m.get("ifname") == name), None)

    def _link_names(self) -> dict[int, str]:
        return {int(m["index"]): str(m.get("ifname")) for m in self._dump(_Object.LINK)}

    def _has_address(self, index: int, interface: ipaddress.IPv4Interface | ipaddress.IPv6Interface) -> bool:
        for m in self._dump(_Object.ADDR, family=_family(interface.version)):
            address = m.get("local") or m.get("address")
            if (
                m["index"] == index
                and address
                and m["prefixlen"] == interface.network.prefixlen
                and ipaddress.ip_address(address) == interface.ip
            ):
                return True
        return False

    def _installed(self, table: int, names: dict[int, str]) -> tuple[dict[str, _Installed], list[_Installed]]:
        """Our routes in ``table`` by key, and any second copy of a key (always stale)."""
        installed: dict[str, _Installed] = {}
        duplicates: list[_Installed] = []
        for m in self._dump(_Object.ROUTE, table=table):
            if m.get("table") != table or m["proto"] != RTPROT_FABMESH:
                continue
            entry = _parse_route(m, names)
            if entry.route.key() in installed:
                duplicates.append(entry)
            else:
                installed[entry.route.key()] = entry
        return installed, duplicates

    def _plain_rules(self, table: int, priority: int) -> list[Any]:
        """IPv4 rules at ``priority`` that send every packet to ``table`` (no selector, no modifier)."""
        found = []
        for m in self._dump(_Object.RULE, family=socket.AF_INET):
            if (
                m.get("table") == table
                and (m.get("priority") or 0) == priority
                and m["action"] == _FR_ACT_TO_TBL
                and m["src_len"] == 0
                and m["dst_len"] == 0
                and m["tos"] == 0
                and not m["flags"] & _FIB_RULE_INVERT
                and m.get("suppress_prefixlen") in (None, _NO_SUPPRESS)
                and not any(m.get_attr(nla) is not None for nla in _RULE_SELECTORS)
            ):
                found.append(m)
        return found

    # -- writing -------------------------------------------------------------------------------

    def _send(self, obj: _Object, verb: _Verb, /, **spec: Any) -> None:
        self.writes += 1
        getattr(self._ipr, obj)(verb, **spec)

    def _write_tolerating(
        self, what: str, tolerated: set[int], obj: _Object, verb: _Verb, /, **spec: Any
    ) -> bool:
        """Send one write; False when the kernel answered with a tolerated errno (already so)."""
        try:
            self._send(obj, verb, **spec)
        except _KernelError as exc:
            if exc.code in tolerated:
                return False
            raise NetlinkError(f"{what}: {_reason(exc)}") from exc
        return True

    def _delete_route(self, old: _Installed, failures: list[RouteFailure]) -> bool:
        try:
            self._send(_Object.ROUTE, _Verb.DEL, **old.selector)
        except _KernelError as exc:
            if exc.code in (errno.ESRCH, errno.ENOENT, errno.ENODEV):
                return False  # already gone: the kernel drops routes with their device
            failures.append(RouteFailure(old.route, f"cannot delete: {_reason(exc)}"))
            return False
        self._changed(f"action=del-route {old.route.key()}")
        return True

    def _write_route(self, verb: _Verb, route: Route, index: int, failures: list[RouteFailure]) -> bool:
        spec: dict[str, Any] = {
            "family": route.family,
            "dst": route.dst,
            "table": route.table,
            "proto": RTPROT_FABMESH,
            "oif": index,
            "type": "unicast",
        }
        if route.family == socket.AF_INET:
            # What `ip route` does: a route straight onto a link is scope link.
            spec["scope"] = _RT_SCOPE_UNIVERSE if route.gateway else _RT_SCOPE_LINK
        if route.gateway:
            spec["gateway"] = route.gateway
        if route.src:
            spec["prefsrc"] = route.src
        if route.mtu is not None:
            spec["metrics"] = {"mtu": route.mtu}
        try:
            self._send(_Object.ROUTE, verb, **spec)
        except _KernelError as exc:
            failures.append(RouteFailure(route, self._write_failure(route, exc)))
            return False
        self._changed(f"action={verb}-route {route.key()}")
        return True

    def _write_failure(self, route: Route, exc: _KernelError) -> str:
        if exc.code == errno.ENODEV:
            return f"device {route.dev!r} does not exist"
        if exc.code == errno.EEXIST:
            holder = next(
                (
                    m
                    for m in self._dump(_Object.ROUTE, table=route.table)
                    if m.get("table") == route.table and _dst(m) == route.dst
                ),
                None,
            )
            if holder is not None and holder["proto"] != RTPROT_FABMESH:
                return (
                    f"destination held by a route with protocol {holder['proto']}, "
                    "which fabmesh does not own and will not replace"
                )
        return _reason(exc)

    def _changed(self, what: str) -> str:
        log.debug("netns=%s %s", self.netns or "-", what)
        return what


def _anchor_label(device: str) -> str:
    """``<device>:fm``, cut to the kernel's 15 characters (IFNAMSIZ)."""
    return f"{device}:fm"[:15]


def _family(version: int) -> int:
    return socket.AF_INET6 if version == 6 else socket.AF_INET


def _dst(m: Any) -> str:
    family = m["family"]
    address = m.get("dst") or ("::" if family == socket.AF_INET6 else "0.0.0.0")
    return str(ipaddress.ip_network(f"{address}/{m['dst_len']}"))


def _parse_route(m: Any, names: dict[int, str]) -> _Installed:
    oif = m.get("oif")
    route = Route(
        dst=_dst(m),
        # A multipath route has no single device; it shows as dev="" and, never desired, is stale.
        dev=names.get(oif, f"if{oif}") if oif else "",
        table=int(m.get("table")),
        gateway=m.get("gateway"),
        src=m.get("prefsrc"),
        mtu=m.get(("metrics", "mtu")),
    )
    selector: dict[str, Any] = {
        "family": m["family"],
        "dst": route.dst,
        "table": route.table,
        "proto": RTPROT_FABMESH,
        "tos": m["tos"],
        # Without the scope pyroute2 sends universe, and the kernel then finds no scope-link route.
        "scope": m["scope"],
        "type": m["type"],
    }
    for name in ("priority", "oif", "gateway"):
        if m.get(name) is not None:
            selector[name] = m.get(name)
    return _Installed(route=route, selector=selector)


def _reason(exc: _KernelError) -> str:
    return f"{os.strerror(exc.code)} (errno {exc.code})" if exc.code else str(exc)
