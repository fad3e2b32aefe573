"""Pod CIDR allocation for edge nodes: which CIDR each edge node keeps, which it is given, and why not.

Edge nodes are not served by kube-controller-manager's node IPAM (their pod CIDRs come
from fabmesh's own pool), yet a node may already carry one: in ``spec.podCIDR``
(set at registration and immutable once set, so a hand-made or cloud-made value there
can only be corrected by re-creating the Node) or in the ``fabmesh.io/pod-cidr``
annotation the operator writes, and in the operator's own record (ConfigMap
``fabmesh-ipam``). The record is authoritative: a node listed there keeps that CIDR
whatever its annotation says (a kubelet may rewrite its Node's annotations; it cannot
write the record). This module decides, as plain data, which recorded CIDRs are kept,
which nodes get a new one, and which nodes get an error instead. It never overwrites a
user's value: a node whose record is bad gets an error and nothing else. A CIDR held by
a valid claim, by a node fabmesh does not manage, or by the operator's record is never
handed out again, so no two nodes are ever told to use the same addresses; an invalid
claim (malformed, outside the pool, the wrong size, contradicting itself) holds
nothing, so one bad node cannot block others (``10.233.0.0/16`` on one edge would
otherwise block the whole pool).

Overlaps are settled by age, ``(creationTimestamp, name)``: among edge nodes the
earliest keeps the range. A CIDR recorded on a node fabmesh does not manage (a cloud
node whose CNI already uses it) or listed as reserved always wins, because fabmesh
cannot move it. Timestamps are compared as strings, which orders the API server's
RFC3339 UTC timestamps (``2024-05-01T10:00:00Z``) correctly.

Everything here is integer interval arithmetic on the :mod:`ipaddress` values, so an
IPv6 pool works like an IPv4 one, and planning is ``O(n log n)`` in the number of claims.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from fabmesh.mesh.names import POD_CIDR_ANNOTATION as ANNOTATION

SPEC_FIELD = "spec.podCIDR"
ANNOTATION_FIELD = f"metadata.annotations[{ANNOTATION}]"
RECORD_FIELD = "configmap[fabmesh-ipam]"
POOL_FIELD = "pool"


@dataclass(frozen=True)
class Claim:
    """What one Node records about its pod CIDR, as raw strings from the API."""

    node: str
    spec_pod_cidr: str | None
    """``Node.spec.podCIDR``; ``""`` or ``None`` means unset."""
    annotation: str | None
    """The ``fabmesh.io/pod-cidr`` annotation; ``""`` or ``None`` means unset."""
    created: str
    """``metadata.creationTimestamp`` (RFC3339); orders claims, ``""`` sorts first."""
    recorded: str | None = None
    """The operator's record for this node; when set, the annotation is not read at all."""


class IpamErrorKind(StrEnum):
    MALFORMED = "Malformed"
    OUTSIDE_POOL = "OutsidePool"
    WRONG_PREFIX = "WrongPrefix"
    OVERLAP = "Overlap"
    MISMATCH = "Mismatch"
    EXHAUSTED = "Exhausted"


@dataclass(frozen=True)
class IpamError:
    """Why one edge node gets no CIDR; the node keeps whatever it records, untouched."""

    node: str
    field: str
    """``spec.podCIDR``, ``metadata.annotations[fabmesh.io/pod-cidr]``, the record or ``pool``."""
    kind: IpamErrorKind
    reason: str


@dataclass(frozen=True)
class IpamResult:
    """The plan. CIDRs are in canonical form (``str`` of the :mod:`ipaddress` network)."""

    assigned: dict[str, str]
    """Node -> CIDR it already records and keeps."""
    allocated: dict[str, str]
    """Node -> CIDR newly picked; the caller must persist it before anything uses it."""
    errors: tuple[IpamError, ...]
    """Sorted by node, then field."""


class _Holder(StrEnum):
    RESERVED = "reserved"
    UNMANAGED = "unmanaged"
    EDGE = "edge"


@dataclass(frozen=True, slots=True)
class _Cidr:
    """A network as the closed integer interval ``[lo, hi]`` of its addresses."""

    version: int
    lo: int
    hi: int

    @property
    def prefix_len(self) -> int:
        return _bits(self.version) - (self.hi - self.lo).bit_length()

    def within(self, outer: _Cidr) -> bool:
        return self.version == outer.version and outer.lo <= self.lo and self.hi <= outer.hi

    def __str__(self) -> str:
        # Built from the class, not ip_address(int), which would call any small integer IPv4.
        address = ipaddress.IPv4Address(self.lo) if self.version == 4 else ipaddress.IPv6Address(self.lo)
        return f"{address}/{self.prefix_len}"


@dataclass(frozen=True, slots=True)
class _Field:
    """One set field of a claim, parsed once."""

    name: str
    text: str
    cidr: _Cidr | None
    """The network it names, host bits cleared; ``None`` if it names none."""
    host_bits: bool


def plan_cidrs(
    pool: str,
    prefix_len: int,
    claims: Sequence[Claim],
    want: Sequence[str],
    reserved: Sequence[str] = (),
) -> IpamResult:
    """Decide the pod CIDR of every node named in ``want`` (the edge nodes).

    ``claims`` describes every Node, edge or not, and must include each wanted node;
    the CIDRs recorded on other nodes are only obstacles (never errors, wherever they
    are). ``reserved`` ranges are never handed out and win any overlap.

    Raises ``ValueError`` for bad configuration (``pool``, ``prefix_len``, ``reserved``)
    or a caller bug (a node claimed twice, a wanted node without a claim); problems
    with a node's own data are returned as errors for that node only.
    """
    pool_cidr = _parse_config("pool", pool)
    _check_prefix_len(pool_cidr, prefix_len)
    by_name = _index_claims(claims)
    wanted = set(want)
    missing = sorted(wanted - by_name.keys())
    if missing:
        raise ValueError(f"wanted nodes have no claim: {', '.join(missing)}")

    # Rank decides overlaps, lowest wins: reserved ranges, then unmanaged nodes (fabmesh
    # cannot move their CIDRs), then edge nodes oldest first.
    ordered = sorted(by_name.values(), key=lambda c: (c.node in wanted, c.created, c.node))
    holders: list[tuple[_Holder, str]] = []
    spans: list[tuple[_Cidr, int]] = []
    for text in reserved:
        spans.append((_parse_config("reserved range", text), len(holders)))
        holders.append((_Holder.RESERVED, ""))
    fields: dict[str, list[_Field]] = {}
    rank_of: dict[str, int] = {}
    errors: list[IpamError] = []
    found: dict[str, tuple[str, _Cidr] | None] = {}
    for claim in ordered:
        rank_of[claim.node] = len(holders)
        holders.append((_Holder.EDGE if claim.node in wanted else _Holder.UNMANAGED, claim.node))
        fields[claim.node] = _read_fields(claim)
        if claim.node not in wanted:
            # fabmesh cannot move what another node uses: every network it names blocks.
            held = [f.cidr for f in fields[claim.node]]
        else:
            if fields[claim.node]:
                found[claim.node] = _check_recorded(claim.node, fields[claim.node], pool_cidr, prefix_len, errors)
            valid = found.get(claim.node)
            # A valid claim holds its CIDR; the operator's record holds even when the Node contradicts it
            # (peers may still route it there); anything else a wanted node writes holds nothing.
            held = [valid[1] if valid else None,
                    *(f.cidr for f in fields[claim.node] if f.name == RECORD_FIELD)]
        spans.extend((cidr, rank_of[claim.node]) for cidr in dict.fromkeys(held) if cidr is not None)

    first_holder = _lowest_overlapping(spans)
    assigned: dict[str, str] = {}
    to_allocate: list[str] = []
    for claim in ordered:
        if claim.node not in wanted:
            continue
        if not fields[claim.node]:
            to_allocate.append(claim.node)
            continue
        if found[claim.node] is None:
            continue
        field, kept = found[claim.node]  # type: ignore[misc]
        winner, winner_rank = first_holder[kept]
        if winner_rank < rank_of[claim.node]:
            reason = _overlap_reason(field, kept, winner, *holders[winner_rank])
            errors.append(IpamError(claim.node, field, IpamErrorKind.OVERLAP, reason))
            continue
        assigned[claim.node] = str(kept)

    allocated, exhausted = _allocate(pool_cidr, prefix_len, [c for c, _ in spans], to_allocate)
    errors.extend(
        IpamError(
            node=node,
            field=POOL_FIELD,
            kind=IpamErrorKind.EXHAUSTED,
            reason=f"pool {pool_cidr} has no free /{prefix_len} left for node {node}",
        )
        for node in exhausted
    )
    return IpamResult(
        assigned=dict(sorted(assigned.items())),
        allocated=dict(sorted(allocated.items())),
        errors=tuple(sorted(errors, key=lambda e: (e.node, e.field, e.kind))),
    )


def _bits(version: int) -> int:
    return 32 if version == 4 else 128


def _parse_config(what: str, text: str) -> _Cidr:
    try:
        net = ipaddress.ip_network(text, strict=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} {text!r} is not a network in CIDR notation: {exc}") from exc
    return _Cidr(net.version, int(net.network_address), int(net.broadcast_address))


def _check_prefix_len(pool: _Cidr, prefix_len: int) -> None:
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, int):
        raise ValueError(f"prefix_len must be an integer, not {prefix_len!r}")
    if not pool.prefix_len <= prefix_len <= _bits(pool.version):
        raise ValueError(
            f"prefix_len {prefix_len} does not fit pool {pool}: "
            f"it must be between {pool.prefix_len} and {_bits(pool.version)}"
        )


def _index_claims(claims: Iterable[Claim]) -> dict[str, Claim]:
    by_name: dict[str, Claim] = {}
    for claim in claims:
        if claim.node in by_name:
            raise ValueError(f"node {claim.node} is claimed twice")
        by_name[claim.node] = claim
    return by_name


def _read_fields(claim: Claim) -> list[_Field]:
    found = []
    second = (RECORD_FIELD, claim.recorded) if claim.recorded else (ANNOTATION_FIELD, claim.annotation)
    for name, text in ((SPEC_FIELD, claim.spec_pod_cidr), second):
        if text:
            cidr, host_bits = _parse_cidr(text)
            found.append(_Field(name, text, cidr, host_bits))
    return found


def _parse_cidr(text: str) -> tuple[_Cidr | None, bool]:
    """Parse ``address/length`` as Kubernetes writes it: a decimal length, no netmask, no zone.

    Returns the network with host bits cleared, and whether any were set.
    """
    address, slash, length = text.partition("/")
    if not slash or not (length.isascii() and length.isdigit()) or "%" in address:
        return None, False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None, False
    bits, prefix = ip.max_prefixlen, int(length)
    if prefix > bits:
        return None, False
    host_mask = (1 << (bits - prefix)) - 1
    value = int(ip)
    lo = value & ~host_mask
    return _Cidr(ip.version, lo, lo | host_mask), value != lo


def _lowest_overlapping(spans: list[tuple[_Cidr, int]]) -> dict[_Cidr, tuple[_Cidr, int]]:
    """For each distinct network, the lowest-ranked network overlapping it (itself included).

    Two CIDRs overlap only if one contains the other, so sorted by (start, -end) the
    networks form a forest: a network overlaps exactly its ancestors and descendants.
    One pass down takes the minimum along each path, one pass up the minimum over each
    subtree; no pairwise comparison.
    """
    best: dict[_Cidr, int] = {}
    for cidr, rank in spans:
        if rank < best.get(cidr, rank + 1):
            best[cidr] = rank
    nodes = sorted(best, key=lambda c: (c.version, c.lo, -c.hi))
    parent: list[int] = []
    down: list[tuple[int, int]] = []  # (rank, index of the network holding it)
    stack: list[int] = []
    for i, cidr in enumerate(nodes):
        while stack and not cidr.within(nodes[stack[-1]]):
            stack.pop()
        parent.append(stack[-1] if stack else -1)
        own = (best[cidr], i)
        down.append(min(down[stack[-1]], own) if stack else own)
        stack.append(i)
    up = [(best[cidr], i) for i, cidr in enumerate(nodes)]
    for i in range(len(nodes) - 1, 0, -1):
        if parent[i] >= 0:
            up[parent[i]] = min(up[parent[i]], up[i])
    result = {}
    for i, cidr in enumerate(nodes):
        rank, holder = min(down[i], up[i])
        result[cidr] = (nodes[holder], rank)
    return result


def _check_recorded(
    node: str, fields: list[_Field], pool: _Cidr, prefix_len: int, errors: list[IpamError]
) -> tuple[str, _Cidr] | None:
    """The field and CIDR a wanted node records, if well-formed, consistent and fit for the pool.

    Otherwise ``None``, after appending why to ``errors``. Overlaps are the caller's to check.
    """
    bad = False
    for f in fields:
        problem = _malformed_reason(f, pool)
        if problem is not None:
            errors.append(IpamError(node, f.name, IpamErrorKind.MALFORMED, problem))
            bad = True
    if bad:
        return None
    if len(fields) == 2 and fields[0].cidr != fields[1].cidr:
        if fields[1].name == ANNOTATION_FIELD:
            other, fix = f"annotation {ANNOTATION}", "fix or remove the annotation"
        else:
            other, fix = "the operator's record", "re-create the Node"
        reason = (f"{SPEC_FIELD} {fields[0].text} and {other} {fields[1].text} disagree; "
                  f"spec.podCIDR cannot change, so {fix}")
        errors.append(IpamError(node, SPEC_FIELD, IpamErrorKind.MISMATCH, reason))
        return None
    field, cidr = fields[0].name, fields[0].cidr
    assert cidr is not None  # _malformed_reason said so
    if not cidr.within(pool):
        reason = f"{field} {cidr} is not inside pool {pool}"
        errors.append(IpamError(node, field, IpamErrorKind.OUTSIDE_POOL, reason))
        return None
    if cidr.prefix_len != prefix_len:
        reason = f"{field} {cidr} is a /{cidr.prefix_len} but pool {pool} hands out /{prefix_len}"
        errors.append(IpamError(node, field, IpamErrorKind.WRONG_PREFIX, reason))
        return None
    return field, cidr


def _malformed_reason(f: _Field, pool: _Cidr) -> str | None:
    if f.cidr is None:
        return f"{f.name} {f.text!r} is not a CIDR (address/prefix-length)"
    if f.host_bits:
        return f"{f.name} {f.text!r} has host bits set (its network is {f.cidr})"
    if f.cidr.version != pool.version:
        return f"{f.name} {f.text!r} is IPv{f.cidr.version} but pool {pool} is IPv{pool.version}"
    return None


def _overlap_reason(field: str, cidr: _Cidr, other: _Cidr, holder: _Holder, name: str) -> str:
    if holder is _Holder.RESERVED:
        return f"{field} {cidr} overlaps reserved range {other}"
    if holder is _Holder.UNMANAGED:
        return f"{field} {cidr} overlaps {other} recorded on node {name}, which fabmesh does not manage"
    return f"{field} {cidr} overlaps {other} recorded on node {name}, which claimed it first"


def _allocate(
    pool: _Cidr, prefix_len: int, blocked: list[_Cidr], nodes: list[str]
) -> tuple[dict[str, str], list[str]]:
    """Give each node, in order, the lowest free block of the pool; return those left over.

    Blocks come out in increasing order, so the walk never looks back and earlier
    allocations need no bookkeeping beyond the cursor.
    """
    size = 1 << (_bits(pool.version) - prefix_len)
    walls = sorted(
        (c.lo, c.hi) for c in blocked if c.version == pool.version and c.hi >= pool.lo and c.lo <= pool.hi
    )
    allocated: dict[str, str] = {}
    cursor, i = pool.lo, 0
    for n, node in enumerate(nodes):
        while cursor + size - 1 <= pool.hi:
            while i < len(walls) and walls[i][1] < cursor:
                i += 1
            if i < len(walls) and walls[i][0] <= cursor + size - 1:
                cursor = -(-(walls[i][1] + 1) // size) * size  # next block boundary past the wall
                continue
            break
        if cursor + size - 1 > pool.hi:
            return allocated, nodes[n:]
        allocated[node] = str(_Cidr(pool.version, cursor, cursor + size - 1))
        cursor += size
    return allocated, []
