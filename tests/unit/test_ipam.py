"""Unit tests for edge pod CIDR planning: who keeps a CIDR, who gets one, who gets an error.

The table pins each rule with a small readable case; the property tests check the
guarantees the operator relies on against random claims in a deliberately tiny pool
(so collisions are common): nothing overlaps, valid records are kept, the plan does not
depend on input order, and persisting the plan then re-planning changes nothing.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fabmesh.operator.ipam import (
    ANNOTATION_FIELD,
    POOL_FIELD,
    SPEC_FIELD,
    Claim,
    IpamErrorKind,
    IpamResult,
    plan_cidrs,
)

pytestmark = pytest.mark.unit

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
K = IpamErrorKind
SPEC, ANN = SPEC_FIELD, ANNOTATION_FIELD


def claim(node: str, spec: str | None = None, ann: str | None = None, created: str = "") -> Claim:
    return Claim(node=node, spec_pod_cidr=spec, annotation=ann, created=created)


def t(n: int) -> str:
    return f"2024-01-01T00:00:{n:02d}Z"


@dataclass(frozen=True)
class Case:
    claims: list[Claim]
    want: list[str]
    assigned: dict[str, str] = field(default_factory=dict)
    allocated: dict[str, str] = field(default_factory=dict)
    errors: set[tuple[str, str, IpamErrorKind]] = field(default_factory=set)
    reserved: list[str] = field(default_factory=list)
    pool: str = "10.0.0.0/16"
    prefix_len: int = 24


CASES = {
    "allocates-lowest-free-in-creation-order": Case(
        claims=[claim("b", created=t(2)), claim("a", created=t(3)), claim("c", created=t(1))],
        want=["a", "b", "c"],
        allocated={"c": "10.0.0.0/24", "b": "10.0.1.0/24", "a": "10.0.2.0/24"},
    ),
    "empty-strings-mean-unset": Case(
        claims=[claim("a", spec="", ann="")],
        want=["a"],
        allocated={"a": "10.0.0.0/24"},
    ),
    "keeps-spec-pod-cidr": Case(
        claims=[claim("a", spec="10.0.7.0/24"), claim("b", created=t(1))],
        want=["a", "b"],
        assigned={"a": "10.0.7.0/24"},
        allocated={"b": "10.0.0.0/24"},
    ),
    "keeps-annotation-and-skips-it-when-allocating": Case(
        claims=[claim("a", ann="10.0.0.0/24", created=t(9)), claim("b", created=t(1))],
        want=["a", "b"],
        assigned={"a": "10.0.0.0/24"},
        allocated={"b": "10.0.1.0/24"},
    ),
    "spec-equal-to-annotation-is-kept": Case(
        claims=[claim("a", spec="10.0.3.0/24", ann="10.0.3.0/24")],
        want=["a"],
        assigned={"a": "10.0.3.0/24"},
    ),
    "spec-and-annotation-differ-is-mismatch-and-blocks-nothing": Case(
        claims=[claim("a", spec="10.0.0.0/24", ann="10.0.1.0/24"), claim("b", created=t(1))],
        want=["a", "b"],
        allocated={"b": "10.0.0.0/24"},
        errors={("a", SPEC, K.MISMATCH)},
    ),
    "malformed-annotation-gets-error-not-a-new-cidr": Case(
        claims=[claim("a", ann="banana"), claim("b", created=t(1))],
        want=["a", "b"],
        allocated={"b": "10.0.0.0/24"},
        errors={("a", ANN, K.MALFORMED)},
    ),
    "malformed-host-bits-set-blocks-nothing": Case(
        claims=[claim("a", spec="10.0.0.5/24"), claim("b", created=t(1))],
        want=["a", "b"],
        allocated={"b": "10.0.0.0/24"},
        errors={("a", SPEC, K.MALFORMED)},
    ),
    "malformed-wrong-family": Case(
        claims=[claim("a", ann="fd00::/64")],
        want=["a"],
        errors={("a", ANN, K.MALFORMED)},
    ),
    "malformed-netmask-and-bare-address-forms": Case(
        claims=[claim("a", spec="10.0.0.0/255.255.255.0"), claim("b", ann="10.0.1.0")],
        want=["a", "b"],
        errors={("a", SPEC, K.MALFORMED), ("b", ANN, K.MALFORMED)},
    ),
    "malformed-both-fields-reports-both": Case(
        claims=[claim("a", spec="10.0.0.0/33", ann="10.0.0.256/24")],
        want=["a"],
        errors={("a", SPEC, K.MALFORMED), ("a", ANN, K.MALFORMED)},
    ),
    "outside-pool": Case(
        claims=[claim("a", ann="192.168.0.0/24")],
        want=["a"],
        errors={("a", ANN, K.OUTSIDE_POOL)},
    ),
    "supernet-of-pool-is-outside-pool": Case(
        claims=[claim("a", spec="10.0.0.0/8")],
        want=["a"],
        errors={("a", SPEC, K.OUTSIDE_POOL)},
    ),
    "wrong-prefix-is-an-error-and-blocks-nothing": Case(
        claims=[claim("a", ann="10.0.0.0/23"), claim("b", created=t(1))],
        want=["a", "b"],
        allocated={"b": "10.0.0.0/24"},
        errors={("a", ANN, K.WRONG_PREFIX)},
    ),
    "overlap-later-created-loses": Case(
        claims=[
            claim("old", ann="10.0.4.0/24", created=t(1)),
            claim("new", spec="10.0.4.0/24", created=t(2)),
        ],
        want=["new", "old"],
        assigned={"old": "10.0.4.0/24"},
        errors={("new", SPEC, K.OVERLAP)},
    ),
    "overlap-same-timestamp-broken-by-name": Case(
        claims=[claim("b", ann="10.0.4.0/24", created=t(1)), claim("a", ann="10.0.4.0/24", created=t(1))],
        want=["a", "b"],
        assigned={"a": "10.0.4.0/24"},
        errors={("b", ANN, K.OVERLAP)},
    ),
    "older-invalid-claim-never-blocks-a-valid-one": Case(
        claims=[claim("a", ann="10.0.4.0/23", created=t(1)), claim("b", ann="10.0.5.0/24", created=t(2))],
        want=["a", "b"],
        assigned={"b": "10.0.5.0/24"},
        errors={("a", ANN, K.WRONG_PREFIX)},
    ),
    "pool-wide-annotation-on-one-edge-blocks-nobody": Case(
        claims=[claim("bad", ann="10.0.0.0/16", created=t(1)), claim("b", ann="10.0.4.0/24", created=t(2)),
                claim("new", created=t(3))],
        want=["bad", "b", "new"],
        assigned={"b": "10.0.4.0/24"},
        allocated={"new": "10.0.0.0/24"},
        errors={("bad", ANN, K.WRONG_PREFIX)},
    ),
    "record-outranks-the-annotation": Case(
        claims=[Claim("a", None, "10.0.9.0/24", "", recorded="10.0.3.0/24"), claim("b", ann="10.0.9.0/24")],
        want=["a", "b"],
        assigned={"a": "10.0.3.0/24", "b": "10.0.9.0/24"},
    ),
    "record-holds-its-cidr-even-when-spec-contradicts-it": Case(
        claims=[Claim("a", "10.0.0.0/24", None, "", recorded="10.0.1.0/24"), claim("b", created=t(1))],
        want=["a", "b"],
        allocated={"b": "10.0.0.0/24"},
        errors={("a", SPEC, K.MISMATCH)},
    ),
    "unmanaged-node-wins-overlap-even-when-younger": Case(
        claims=[
            claim("edge", ann="10.0.4.0/24", created=t(1)),
            claim("cloud", spec="10.0.4.0/25", created=t(5)),
        ],
        want=["edge"],
        errors={("edge", ANN, K.OVERLAP)},
    ),
    "unmanaged-nodes-block-allocation-and-get-no-errors": Case(
        claims=[
            claim("cloud-1", spec="10.0.0.0/24"),
            claim("cloud-2", spec="192.168.0.0/24"),
            claim("cloud-3", spec="not a cidr"),
            claim("former-edge", ann="10.0.1.0/24"),
            claim("edge", created=t(1)),
        ],
        want=["edge"],
        allocated={"edge": "10.0.2.0/24"},
    ),
    "reserved-inside-pool-blocks-allocation": Case(
        claims=[claim("a")],
        want=["a"],
        reserved=["10.0.0.0/23", "10.0.2.128/25"],
        allocated={"a": "10.0.3.0/24"},
    ),
    "reserved-outside-pool-changes-nothing": Case(
        claims=[claim("a")],
        want=["a"],
        reserved=["10.244.0.0/16"],
        allocated={"a": "10.0.0.0/24"},
    ),
    "recorded-cidr-inside-reserved-is-overlap": Case(
        claims=[claim("a", ann="10.0.0.0/24")],
        want=["a"],
        reserved=["10.0.0.0/23"],
        errors={("a", ANN, K.OVERLAP)},
    ),
    "exhausted-pool-errors-the-youngest": Case(
        claims=[claim("a", created=t(1)), claim("b", created=t(3)), claim("c", created=t(2))],
        want=["a", "b", "c"],
        pool="10.0.0.0/23",
        allocated={"a": "10.0.0.0/24", "c": "10.0.1.0/24"},
        errors={("b", POOL_FIELD, K.EXHAUSTED)},
    ),
    "exhausted-by-records-and-reserved": Case(
        claims=[claim("cloud", spec="10.0.0.0/24"), claim("a")],
        want=["a"],
        pool="10.0.0.0/23",
        reserved=["10.0.1.0/24"],
        errors={("a", POOL_FIELD, K.EXHAUSTED)},
    ),
    "ipv6-pool": Case(
        claims=[claim("a", ann="fd00:0:0:1::/64"), claim("b", created=t(1)), claim("c", spec="10.0.0.0/24")],
        want=["a", "b", "c"],
        pool="fd00::/48",
        prefix_len=64,
        assigned={"a": "fd00:0:0:1::/64"},
        allocated={"b": "fd00::/64"},
        errors={("c", SPEC, K.MALFORMED)},
    ),
    "ipv6-pool-at-address-zero": Case(
        claims=[claim("a")],
        want=["a"],
        pool="::/120",
        prefix_len=124,
        allocated={"a": "::/124"},
    ),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_plan_table(case: Case) -> None:
    result = plan_cidrs(case.pool, case.prefix_len, case.claims, case.want, case.reserved)
    assert result.assigned == case.assigned
    assert result.allocated == case.allocated
    assert {(e.node, e.field, e.kind) for e in result.errors} == case.errors
    assert all(e.reason for e in result.errors)


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_plan_does_not_depend_on_input_order(case: Case) -> None:
    forward = plan_cidrs(case.pool, case.prefix_len, case.claims, case.want, case.reserved)
    backward = plan_cidrs(case.pool, case.prefix_len, case.claims[::-1], case.want[::-1], case.reserved[::-1])
    assert backward == forward
    assert list(backward.assigned.items()) == list(forward.assigned.items())
    assert list(backward.allocated.items()) == list(forward.allocated.items())


def test_overlap_reason_names_the_value_and_the_winner() -> None:
    result = plan_cidrs(
        "10.0.0.0/16",
        24,
        [claim("old", ann="10.0.4.0/24", created=t(1)), claim("new", ann="10.0.4.0/24", created=t(2))],
        ["old", "new"],
    )
    (error,) = result.errors
    assert "10.0.4.0/24" in error.reason
    assert "old" in error.reason


@pytest.mark.parametrize(
    ("pool", "prefix_len", "reserved", "message"),
    [
        ("10.0.0.0/33", 24, [], "pool"),
        ("10.0.0.1/16", 24, [], "pool"),
        ("banana", 24, [], "pool"),
        ("10.0.0.0/16", 8, [], "prefix_len"),
        ("10.0.0.0/16", 33, [], "prefix_len"),
        ("fd00::/48", 129, [], "prefix_len"),
        ("10.0.0.0/16", 24, ["10.1.2.3/16"], "reserved"),
    ],
    ids=[
        "pool-bad-length",
        "pool-host-bits",
        "pool-garbage",
        "prefix-shorter-than-pool",
        "prefix-longer-than-ipv4",
        "prefix-longer-than-ipv6",
        "reserved-host-bits",
    ],
)
def test_bad_configuration_raises(pool: str, prefix_len: int, reserved: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan_cidrs(pool, prefix_len, [claim("a")], ["a"], reserved)


@pytest.mark.parametrize(
    ("claims", "want"),
    [([claim("a"), claim("a", ann="10.0.0.0/24")], ["a"]), ([claim("a")], ["a", "ghost"])],
    ids=["node-claimed-twice", "wanted-node-without-claim"],
)
def test_caller_bugs_raise(claims: list[Claim], want: list[str]) -> None:
    with pytest.raises(ValueError):
        plan_cidrs("10.0.0.0/16", 24, claims, want)


# Property tests. The pool is 10.0.0.0/25 in /28s (8 blocks); records are drawn from
# 10.0.0.0/24 in mixed sizes, so they collide, nest, fall outside and exhaust the pool.
POOL, PREFIX = "10.0.0.0/25", 28
POOL_NET = ipaddress.ip_network(POOL)
BASE = int(POOL_NET.network_address)
JUNK = ["banana", "10.0.0.0", "10.0.0.0/255.255.255.240", "10.0.0.5/28", "10.0.0.16/27", "fd00::/64", ""]


def blocks(prefix: int) -> list[str]:
    """Every /prefix in 10.0.0.0/24: half inside the pool, half outside."""
    return [
        str(ipaddress.IPv4Network((BASE + i * (1 << (32 - prefix)), prefix)))
        for i in range(1 << (prefix - 24))
    ]


RIGHT_SIZE, OTHER_SIZES = blocks(PREFIX), blocks(26) + blocks(27) + blocks(29)
recorded = st.one_of(
    st.none(), st.sampled_from(RIGHT_SIZE), st.sampled_from(OTHER_SIZES), st.sampled_from(JUNK)
)
# Per node: spec.podCIDR, how the annotation relates to it (0 unset, 1 same, else drawn), created, wanted.
rows = st.tuples(recorded, st.integers(0, 3), st.sampled_from(["", t(1), t(2), t(3)]), st.booleans())


@st.composite
def inputs(draw: st.DrawFn) -> tuple[list[Claim], list[str], list[str]]:
    claims, want = [], []
    for i, (spec, annotation_is, created, wanted) in enumerate(draw(st.lists(rows, max_size=24))):
        ann = None if annotation_is == 0 else spec if annotation_is == 1 else draw(recorded)
        claims.append(claim(f"n{i}", spec, ann, created))
        if wanted:
            want.append(f"n{i}")
    reserved = draw(st.lists(st.sampled_from(RIGHT_SIZE + OTHER_SIZES), max_size=2, unique=True))
    return claims, want, reserved


def lenient(text: str | None) -> Network | None:
    if not text or "/" not in text or not text.partition("/")[2].isdigit():
        return None
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None


def strict(text: str) -> Network | None:
    net = lenient(text)
    return net if net is not None and str(net.network_address) == text.partition("/")[0] else None


def recorded_nets(c: Claim) -> set[Network]:
    return {n for n in (lenient(c.spec_pod_cidr), lenient(c.annotation)) if n is not None}


def valid_net(c: Claim) -> Network | None:
    """The CIDR a wanted node's claim names, if well-formed, consistent and fit for the pool."""
    texts = [x for x in (c.spec_pod_cidr, c.annotation) if x]
    nets = [strict(x) for x in texts]
    if not nets or any(n is None or n.version != 4 for n in nets) or len(set(nets)) != 1:
        return None
    net = nets[0]
    assert net is not None
    return net if net.subnet_of(POOL_NET) and net.prefixlen == PREFIX else None


def blocking_nets(c: Claim, wanted: set[str]) -> set[Network]:
    """What a claim holds: all an unmanaged node names; a wanted node only its valid CIDR."""
    if c.node not in wanted:
        return recorded_nets(c)
    net = valid_net(c)
    return {net} if net is not None else set()


def expected_kept(claims: list[Claim], want: list[str], reserved: list[str]) -> dict[str, str]:
    """A naive statement of the keep rule, pairwise, to check the planner against."""
    wanted = set(want)
    kept = {}
    for c in claims:
        if c.node not in wanted:
            continue
        net = valid_net(c)
        if net is None:
            continue
        blockers = [ipaddress.ip_network(r) for r in reserved]
        for other in claims:
            older = other.node not in wanted or (other.created, other.node) < (c.created, c.node)
            if other.node != c.node and older:
                blockers.extend(blocking_nets(other, wanted))
        if not any(net.overlaps(b) for b in blockers if b.version == 4):
            kept[c.node] = str(net)
    return kept


def plan(claims: list[Claim], want: list[str], reserved: list[str]) -> IpamResult:
    return plan_cidrs(POOL, PREFIX, claims, want, reserved)


@settings(max_examples=200, deadline=None)
@given(inputs())
def test_no_two_final_cidrs_overlap(data: tuple[list[Claim], list[str], list[str]]) -> None:
    claims, want, reserved = data
    result = plan(claims, want, reserved)
    final = [(n, ipaddress.ip_network(c)) for n, c in {**result.assigned, **result.allocated}.items()]
    unmanaged = [(c.node, n) for c in claims if c.node not in set(want) for n in recorded_nets(c)]
    for i, (node, net) in enumerate(final):
        for other, other_net in final[i + 1 :] + unmanaged:
            assert node == other or not net.overlaps(other_net), (node, net, other, other_net)
    # Every wanted node gets exactly one outcome.
    errored = {e.node for e in result.errors}
    assert result.assigned.keys() & result.allocated.keys() == set()
    assert errored & (result.assigned.keys() | result.allocated.keys()) == set()
    assert result.assigned.keys() | result.allocated.keys() | errored == set(want)


@settings(max_examples=200, deadline=None)
@given(inputs())
def test_allocations_fit_the_pool_and_avoid_every_valid_record(
    data: tuple[list[Claim], list[str], list[str]],
) -> None:
    claims, want, reserved = data
    result = plan(claims, want, reserved)
    blockers = [ipaddress.ip_network(r) for r in reserved] + [n for c in claims for n in blocking_nets(c, set(want))]
    for cidr in result.allocated.values():
        net = ipaddress.ip_network(cidr)
        assert net.subnet_of(POOL_NET) and net.prefixlen == PREFIX
        assert not any(net.overlaps(b) for b in blockers if b.version == 4), cidr


@settings(max_examples=200, deadline=None)
@given(inputs())
def test_valid_records_are_kept_exactly(data: tuple[list[Claim], list[str], list[str]]) -> None:
    claims, want, reserved = data
    assert plan(claims, want, reserved).assigned == expected_kept(claims, want, reserved)


@settings(max_examples=200, deadline=None)
@given(inputs(), st.randoms(use_true_random=False))
def test_shuffled_input_gives_the_same_plan(
    data: tuple[list[Claim], list[str], list[str]], rng: random.Random
) -> None:
    claims, want, reserved = data
    shuffled = [claims[:], want[:], reserved[:]]
    for items in shuffled:
        rng.shuffle(items)
    assert plan(*shuffled) == plan(claims, want, reserved)


@settings(max_examples=200, deadline=None)
@given(inputs())
def test_replanning_after_persisting_allocations_changes_nothing(
    data: tuple[list[Claim], list[str], list[str]],
) -> None:
    claims, want, reserved = data
    first = plan(claims, want, reserved)
    persisted = [
        claim(c.node, c.spec_pod_cidr, first.allocated[c.node], c.created) if c.node in first.allocated else c
        for c in claims
    ]
    second = plan(persisted, want, reserved)
    assert second.assigned == {**first.assigned, **first.allocated}
    assert second.allocated == {}
    assert second.errors == first.errors


def test_plans_five_thousand_edges_among_ten_thousand_nodes() -> None:
    cloud = [claim(f"cloud-{i}", spec=f"100.{64 + i // 256}.{i % 256}.0/24") for i in range(5000)]
    # Half the edges already carry every other /24 of the pool; the other half fill the gaps.
    recorded_edges = [
        claim(f"edge-{i}", ann=f"10.{2 * i // 256}.{2 * i % 256}.0/24", created=t(i % 60))
        for i in range(2500)
    ]
    new_edges = [claim(f"new-{i}", created=t(i % 60)) for i in range(2500)]
    claims = cloud + recorded_edges + new_edges
    want = [c.node for c in recorded_edges + new_edges]

    result = plan_cidrs("10.0.0.0/8", 24, claims, want, reserved=["10.255.0.0/16", "100.64.0.0/10"])

    assert result.errors == ()
    assert len(result.assigned) == 2500
    assert len(result.allocated) == 2500
    assert len(set(result.assigned.values()) | set(result.allocated.values())) == 5000
