"""The values a node's dataplane is described in: routes, iptables chains and jumps, ipsets, xfrm policies.

They sit next to the model, not in the drivers, so that the planners (``fabmesh.node.desired``,
``fabmesh.firewall.rules``) can build a whole node without importing pyroute2 or any tool that
writes: the drivers take these values and make the kernel match them. Each value checks and
canonicalises itself on construction the way the kernel or the tool would store it (a route's
``dst`` as a network, an ipset member without host bits, a bypass selector as a CIDR), so two
values compare equal exactly when the kernel would hold the same thing. The kernel limits and
quirks behind each check are told in the driver that writes the value: ``fabmesh/netlink/driver.py``,
``fabmesh/firewall/iptables.py``, ``fabmesh/firewall/ipset.py``, ``fabmesh/xfrm/driver.py``.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

# -- routes (netlink) ---------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Route:
    """One unicast route through a device, optionally via a gateway, in one table.

    ``dst`` is normalised to a canonical CIDR (``10.1.0.7`` becomes
    ``10.1.0.7/32``, IPv6 is compressed and lower-case); host bits in ``dst``
    raise ``ValueError``, as the kernel would refuse them. Routes sort by ``key()``: comparing
    the fields one by one would fail on ``None`` against a gateway, source or MTU.
    """

    _order: str = field(init=False, repr=False)  # first, so that ordering compares it alone
    dst: str
    dev: str
    table: int
    gateway: str | None = None
    src: str | None = None
    mtu: int | None = None

    def __post_init__(self) -> None:
        network = ipaddress.ip_network(self.dst)
        object.__setattr__(self, "dst", str(network))
        for name in ("gateway", "src"):
            value = getattr(self, name)
            if value is None:
                continue
            address = ipaddress.ip_address(value)
            if address.version != network.version:
                raise ValueError(f"route to {self.dst}: {name} {value} is not IPv{network.version}")
            object.__setattr__(self, name, str(address))
        object.__setattr__(self, "_order", self.key())

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.dst else socket.AF_INET

    def key(self) -> str:
        """Canonical identity: two routes with the same key are the same kernel route."""
        mtu = "-" if self.mtu is None else str(self.mtu)
        return (
            f"table={self.table} dst={self.dst} dev={self.dev} via={self.gateway or '-'} "
            f"src={self.src or '-'} mtu={mtu}"
        )


# -- iptables chains and jumps -------------------------------------------------------------------

TABLES = frozenset({"filter", "nat", "mangle", "raw", "security"})
MAX_CHAIN_NAME = 28  # XT_EXTENSION_MAXNAMELEN is 29, including the NUL

# xtables_save_string() prints a value bare only when it is made of these; anything else is quoted.
_BARE_VALUE = re.compile(r"[A-Za-z0-9_-]+")
_COMMENT = re.compile(r"[A-Za-z0-9 _.,:/=+@-]{1,256}")


@dataclass(frozen=True)
class Chain:
    """One of our chains: ``rules`` are iptables-restore specs without the ``-A CHAIN`` prefix."""

    table: str
    name: str
    rules: tuple[str, ...]

    def __post_init__(self) -> None:
        where = f"chain {self.table}/{self.name}"
        if self.table not in TABLES:
            raise ValueError(f"{where}: table {self.table!r} is not one of {sorted(TABLES)}")
        if not 0 < len(self.name) <= MAX_CHAIN_NAME or any(c.isspace() for c in self.name):
            raise ValueError(f"{where}: name must be 1-{MAX_CHAIN_NAME} characters without whitespace")
        for i, rule in enumerate(self.rules):
            if not rule.strip() or "\n" in rule or "\r" in rule:
                raise ValueError(f"{where}: rules[{i}] must be one non-empty line, got {rule!r}")


@dataclass(frozen=True)
class Jump:
    """A rule in ``from_chain`` (usually built-in) that jumps to our ``to_chain``; one per pair."""

    table: str
    from_chain: str
    to_chain: str
    position: int = 1
    comment: str = "fabmesh"

    def __post_init__(self) -> None:
        where = f"jump {self.table}/{self.from_chain}->{self.to_chain}"
        if self.table not in TABLES:
            raise ValueError(f"{where}: table {self.table!r} is not one of {sorted(TABLES)}")
        if self.position < 1:
            raise ValueError(f"{where}: position must be >= 1, got {self.position}")
        if not _COMMENT.fullmatch(self.comment):
            raise ValueError(f"{where}: comment {self.comment!r} must match {_COMMENT.pattern}")

    @property
    def rule(self) -> str:
        """The rule spec, quoted the way iptables-save prints it."""
        comment = self.comment if _BARE_VALUE.fullmatch(self.comment) else f'"{self.comment}"'
        return f"-m comment --comment {comment} -j {self.to_chain}"


# -- ipsets ------------------------------------------------------------------------------------------

MAX_SET_NAME = 31  # IPSET_MAXNAMELEN is 32, including the NUL


class Family(StrEnum):
    INET = "inet"
    INET6 = "inet6"


def canonical_member(member: str, family: str) -> str:
    """``member`` as the kernel stores it in a hash:net set of ``family``, always with a prefix length."""
    net = ipaddress.ip_network(member.strip(), strict=False)
    if (net.version == 4) != (family == Family.INET):
        raise ValueError(f"{member!r} is not an address of family {family}")
    if net.prefixlen == 0:
        raise ValueError(f"{member!r}: hash:net cannot hold a /0; use two halves (/1) instead")
    return str(net)


@dataclass(frozen=True)
class IPSet:
    """A hash:net set; ``members`` are canonicalised to network CIDRs on construction."""

    name: str
    family: str
    members: frozenset[str]

    def __post_init__(self) -> None:
        if not 0 < len(self.name) <= MAX_SET_NAME or any(c.isspace() for c in self.name):
            raise ValueError(
                f"ipset {self.name!r}: name must be 1-{MAX_SET_NAME} characters without whitespace "
                f"(it has {len(self.name)})"
            )
        if self.family not in tuple(Family):
            raise ValueError(f"ipset {self.name}: family must be inet or inet6, got {self.family!r}")
        try:
            members = frozenset(canonical_member(m, self.family) for m in self.members)
        except ValueError as err:
            raise ValueError(f"ipset {self.name}: members: {err}") from err
        object.__setattr__(self, "members", members)


# -- xfrm policies: bypasses and blocks ---------------------------------------------------------------

DEFAULT_PRIORITY = 5
PRIORITY_BAND = range(1, 1000)
"""Priorities of fabmesh's bypass (``allow``) policies: better than any charon installs."""
BLOCK_PRIORITY = 1_000_000
BLOCK_PRIORITY_BAND = range(1_000_000, 1_001_000)
"""Priorities of fabmesh's ``block`` policies: worse than any charon installs (its fallback policies
sit near 600000), so a tunnel's own policies override them while its CHILD_SA is up."""


class Direction(StrEnum):
    OUT = "out"
    IN = "in"
    FWD = "fwd"


class XfrmAction(StrEnum):
    ALLOW = "allow"  # no template: "send as is", a bypass
    BLOCK = "block"  # drop: what is left when a tunnel's policies are gone


_BANDS = {XfrmAction.ALLOW: PRIORITY_BAND, XfrmAction.BLOCK: BLOCK_PRIORITY_BAND}


@dataclass(frozen=True, order=True)
class XfrmPolicy:
    """Treat packets from ``src`` to ``dst`` in ``direction`` with ``action`` (no template), at ``priority``.

    ``src`` and ``dst`` are canonicalised (``10.1.0.7`` becomes ``10.1.0.7/32``, IPv6 compressed);
    host bits raise ``ValueError``, as do mixed families and a priority outside the action's band
    (``PRIORITY_BAND`` for ``allow``, ``BLOCK_PRIORITY_BAND`` for ``block``): the band is how the
    driver recognises its own policies.
    """

    src: str
    dst: str
    direction: Direction
    priority: int = DEFAULT_PRIORITY
    action: XfrmAction = XfrmAction.ALLOW
    dev: str = ""  # selector's device ("" = any); see block_policies for why blocks name the uplink

    def __post_init__(self) -> None:
        src, dst = ipaddress.ip_network(self.src), ipaddress.ip_network(self.dst)
        where = f"xfrm policy {self.src} -> {self.dst}"
        if src.version != dst.version:
            raise ValueError(f"{where}: source and destination are of different families")
        action = XfrmAction(self.action)
        band = _BANDS[action]
        if any(c.isspace() for c in self.dev):
            raise ValueError(f"{where}: dev {self.dev!r} is not a device name")
        if self.priority not in band:
            raise ValueError(
                f"{where}: priority {self.priority} is outside {band.start}-{band.stop - 1}, "
                f"where fabmesh recognises its own {action} policies"
            )
        object.__setattr__(self, "src", str(src))
        object.__setattr__(self, "dst", str(dst))
        object.__setattr__(self, "direction", Direction(self.direction))
        object.__setattr__(self, "action", action)

    def key(self) -> str:
        """The kernel's identity of the policy: two policies with the same key cannot coexist."""
        dev = f" dev={self.dev}" if self.dev else ""
        return f"dir={self.direction} src={self.src} dst={self.dst}{dev}"

    @property
    def kind(self) -> str:
        """``bypass`` or ``block``: what the policy is for, as logs name it."""
        return "bypass" if self.action is XfrmAction.ALLOW else "block"

    def __str__(self) -> str:
        return f"{self.key()} priority={self.priority}"


def bypass_policies(local_subnets: Iterable[str], priority: int = DEFAULT_PRIORITY) -> set[XfrmPolicy]:
    """Bypass policies that keep traffic among ``local_subnets`` out of every tunnel (pure).

    Pass the node's pod CIDR and the node's own addresses (a bare address means /32 or /128), not
    the whole uplink subnet: a bypass covers every address of both subnets, other hosts' included.

    One policy per ordered pair (a, b) of subnets of the same family, a == b included, in each of
    the three directions the kernel checks:

    * ``out``: packets the host sends (gateway or node IP to a local pod) are looked up in the out
      policies on output; so are forwarded packets (``__xfrm_route_forward`` uses ``out``).
    * ``in``: packets delivered to the host (a pod's reply to the gateway or to the node IP) are
      checked against in policies; a tunnel's in policy covering them drops them for not having
      come through its SA.
    * ``fwd``: packets routed through the host between local subnets (pod to pod when the CNI
      routes per pod instead of bridging, pod to the node IP on another device) are checked
      against fwd policies in ``ip_forward``, then looked up in ``out``.

    a == b is needed because the gateway and the pods share the pod CIDR. Overlapping or adjacent
    subnets are merged first (``10.233.1.0/24`` and ``10.233.1.1`` give one subnet), so ``n``
    disjoint subnets give ``3 n**2`` policies. Traffic to any other address (a remote pod) still
    meets the tunnel's policies. In and fwd bypasses match on addresses only: a plaintext packet
    arriving on the uplink with a forged local source passes them, exactly as it would without any
    tunnel; strict reverse-path filtering or the firewall is what drops it.
    """
    by_version: dict[int, list[ipaddress.IPv4Network | ipaddress.IPv6Network]] = {4: [], 6: []}
    for subnet in local_subnets:
        network = ipaddress.ip_network(subnet)
        by_version[network.version].append(network)
    policies: set[XfrmPolicy] = set()
    for networks in by_version.values():
        merged = [str(n) for n in ipaddress.collapse_addresses(networks)]
        policies |= {
            XfrmPolicy(src=a, dst=b, direction=d, priority=priority)
            for a in merged
            for b in merged
            for d in Direction
        }
    return policies


def block_policies(tunnels: Iterable[tuple[Iterable[str], Iterable[str]]], dev: str,
                   priority: int = BLOCK_PRIORITY) -> set[XfrmPolicy]:
    """``block`` policies under every tunnel's outbound selectors, so that no gap lets them out in clear (pure).

    ``tunnels`` gives, per tunnel, its local selectors and the remote subnets routed into it. With
    the kernel backend charon installs a tunnel's xfrm policies only while its CHILD_SA is up
    (``start_action = none``, no trap); in between, the route still sends the packet out of the
    uplink and, with no policy, the kernel sends it as is: in clear. A block policy with the same
    selector (for every local, remote pair) and a worse priority is overridden by charon's while the
    SA is up and drops the packet otherwise (``XfrmOutPolBlock``).

    "The same selector" cannot be literal: the kernel keys a policy by its selector, mark and
    if_id, not its priority, so charon's ``XFRM_MSG_UPDPOLICY`` would *replace* a block with the
    very same selector, and delete it with its own when the SA goes. Blocks therefore also name
    the device the tunnels' routes leave by (``dev``, the uplink): a different key, and no loss of
    coverage, since the kernel matches it against the output device of the routed packet (the
    flow's ``oif``, for out and for fwd alike).

    Two directions, as charon writes them for local -> remote: ``out`` for what the host sends and
    for forwarded packets' output lookup, ``fwd`` for packets forwarded from local pods (the kernel
    checks fwd policies in ``ip_forward``). A fwd block needs charon's outbound fwd policy to
    override it while the SA is up: the connection sets ``policies_fwd_out`` (strongSwan 5.5.1+,
    off by default) for the kernel backend. Inbound cleartext is dropped by the firewall
    (``fabmesh/firewall/rules.py``), not here. Pairs of different families are skipped.
    """
    policies: set[XfrmPolicy] = set()
    for local, remote in tunnels:
        remote = list(remote)
        for src in local:
            for dst in remote:
                if ipaddress.ip_network(src).version != ipaddress.ip_network(dst).version:
                    continue
                policies |= {XfrmPolicy(src=src, dst=dst, direction=d, priority=priority, action=XfrmAction.BLOCK,
                                        dev=dev) for d in (Direction.OUT, Direction.FWD)}
    return policies
