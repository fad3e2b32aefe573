"""The topology rules, once, as tables: roles and communities from labels, tunnels, and each pair's path."""

from __future__ import annotations

import pytest

from fabmesh.mesh.model import Role
from fabmesh.mesh.topology import (
    LabelError,
    LabelKeys,
    NodeLabels,
    Path,
    active_connector,
    community_peers,
    expected_tunnels,
    initiates,
    intended_path,
    read_labels,
)

pytestmark = pytest.mark.unit

KEYS = LabelKeys()
EDGE, CONN, COMM = KEYS.edge, KEYS.connector, KEYS.community_prefix

LABEL_CASES = {
    "no-labels-is-cloud": ({}, NodeLabels(Role.CLOUD)),
    "edge": ({EDGE: ""}, NodeLabels(Role.EDGE)),
    "connector": ({CONN: ""}, NodeLabels(Role.CONNECTOR)),
    "edge-communities-sorted": ({EDGE: "", COMM + "b": "", COMM + "a": ""}, NodeLabels(Role.EDGE, ("a", "b"))),
    "community-label-value-ignored": ({EDGE: "", COMM + "a": "yes"}, NodeLabels(Role.EDGE, ("a",))),
    "communities-on-cloud-have-no-effect": ({COMM + "a": ""}, NodeLabels(Role.CLOUD)),
    "communities-on-connector-have-no-effect": ({CONN: "", COMM + "Bad_Name": ""}, NodeLabels(Role.CONNECTOR)),
    "both-roles-is-an-error-on-the-connector-label": (
        {EDGE: "", CONN: ""}, LabelError(f"metadata.labels[{CONN}]",
                                         f"a node cannot be both edge ({EDGE}) and connector")),
    "uppercase-community-is-an-error-naming-the-label": (
        {EDGE: "", COMM + "Team": ""}, LabelError(f"metadata.labels[{COMM}Team]",
                                                  "community name 'Team' must be a lowercase DNS label")),
    "empty-community-name-is-an-error": (
        {EDGE: "", COMM: ""},
        LabelError(f"metadata.labels[{COMM}]", "community name '' must be a lowercase DNS label")),
}


@pytest.mark.parametrize(("labels", "expected"), LABEL_CASES.values(), ids=LABEL_CASES.keys())
def test_read_labels(labels: dict[str, str], expected: NodeLabels | LabelError) -> None:
    assert read_labels(labels, KEYS) == expected


def test_renamed_label_keys_are_honoured() -> None:
    keys = LabelKeys(edge="example.com/edge", connector="example.com/gw", community_prefix="example.com/c-")
    assert read_labels({"example.com/edge": "", "example.com/c-x": "", EDGE: ""}, keys) == NodeLabels(Role.EDGE, ("x",))
    assert read_labels({"example.com/gw": ""}, keys) == NodeLabels(Role.CONNECTOR)


T1, T2 = "2026-01-01T00:00:00Z", "2026-06-01T00:00:00Z"


@pytest.mark.parametrize(("connectors", "active"), [
    ({}, None),
    ({"c1": T1}, "c1"),
    ({"conn-b": T1, "conn-a": T2}, "conn-b"),
    ({"aaa-newcomer": T2, "zzz-first": T1}, "zzz-first"),
    ({"conn-b": T1, "conn-a": T1}, "conn-a"),
], ids=["none", "one", "oldest-wins", "a-name-that-sorts-first-gains-nothing", "same-second-ties-go-by-name"])
def test_active_connector(connectors: dict[str, str], active: str | None) -> None:
    assert active_connector(connectors) == active


COMMUNITIES = {"e1": ("a",), "e2": ("a", "b"), "e3": (), "e4": ("b",), "e5": ("c",)}


def test_community_peers_share_at_least_one_community() -> None:
    assert community_peers(COMMUNITIES) == {
        "e1": ("e2",), "e2": ("e1", "e4"), "e3": (), "e4": ("e2",), "e5": (),
    }


def test_exactly_one_side_of_each_pair_initiates() -> None:
    peers = community_peers(COMMUNITIES)
    for node, others in peers.items():
        for other in others:
            assert initiates(node, other) != initiates(other, node)


def test_expected_tunnels_connector_to_every_edge_and_community_pairs() -> None:
    roles = {"conn": Role.CONNECTOR, "cloud": Role.CLOUD, **{e: Role.EDGE for e in COMMUNITIES}}
    assert expected_tunnels(roles, COMMUNITIES, "conn") == {
        "conn": {"e1", "e2", "e3", "e4", "e5"},
        "e1": {"conn", "e2"}, "e2": {"conn", "e1", "e4"}, "e3": {"conn"}, "e4": {"conn", "e2"}, "e5": {"conn"},
    }


def test_expected_tunnels_without_a_connector_are_community_pairs_only() -> None:
    assert expected_tunnels({"e1": Role.EDGE, "e2": Role.EDGE}, {"e1": ("a",), "e2": ("a",)}, None) == {
        "e1": {"e2"}, "e2": {"e1"}}


ROLES = {"conn": Role.CONNECTOR, "cloud": Role.CLOUD, "bad": None, **{e: Role.EDGE for e in COMMUNITIES}}
PATH_CASES = {
    "edges-sharing-a-community-go-direct": ("e1", "e2", Path.DIRECT),
    "direct-is-symmetric": ("e2", "e1", Path.DIRECT),
    "edges-without-a-shared-community-are-relayed": ("e1", "e4", Path.RELAYED),
    "edge-without-communities-is-relayed": ("e3", "e1", Path.RELAYED),
    "edge-to-cloud-goes-via-the-connector": ("e1", "cloud", Path.CLOUD),
    "cloud-to-edge": ("cloud", "e5", Path.CLOUD),
    "connector-to-edge": ("conn", "e1", Path.CLOUD),
    "same-node-is-local": ("e1", "e1", Path.LOCAL),
    "unknown-or-invalid-node-is-cloud-side": ("bad", "e1", Path.CLOUD),
}


@pytest.mark.parametrize(("src", "dst", "path"), PATH_CASES.values(), ids=PATH_CASES.keys())
def test_intended_path(src: str, dst: str, path: Path) -> None:
    assert intended_path(src, dst, ROLES, COMMUNITIES) is path
