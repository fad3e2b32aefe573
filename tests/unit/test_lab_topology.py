"""The lab topology file: defaults, the example, and errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from fabmesh.lab.topology import DEFAULT, LabRole, NatType, TopologyError, load_topology

pytestmark = pytest.mark.unit
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lab-topology.yaml"


def test_default_topology_has_two_cloud_nodes_three_edges_and_one_edge_in_no_community() -> None:
    roles = [n.role for n in DEFAULT.nodes]
    assert roles.count(LabRole.CONNECTOR) == 1 and roles.count(LabRole.CLOUD) == 1 and roles.count(LabRole.EDGE) == 3
    assert sum(1 for n in DEFAULT.nodes if n.role is LabRole.EDGE and not n.communities) == 1
    assert {c for n in DEFAULT.nodes for c in n.communities} == {"a", "b"}


def test_default_topology_puts_every_edge_behind_a_nat_two_of_them_on_one_site() -> None:
    edges = [n for n in DEFAULT.nodes if n.role is LabRole.EDGE]
    assert all(n.nat for n in edges)
    types = {nat.name: nat.type for nat in DEFAULT.nats}
    assert sorted(types.values()) == [NatType.MASQUERADE, NatType.SYMMETRIC]
    sites = [n.nat for n in edges]
    assert any(sites.count(s) == 2 for s in sites)


def test_the_example_in_examples_loads() -> None:
    topology = load_topology(EXAMPLE)
    assert [n.name for n in topology.nodes][:2] == ["connector-1", "cloud-2"]
    assert topology.lan_cidr(1) == "172.16.9.0/24" and topology.lan_cidr(0) == "172.16.1.0/24"
    assert [n.nat for n in topology.nodes][2:] == ["site-1", "site-1", "site-2", None]
    assert topology.nat_wan_ip(0) == "198.51.100.7"


BAD = {
    "community-on-cloud": ("nodes:\n- {name: c, role: connector}\n- {name: x, role: cloud, communities: [a]}\n",
                          "nodes[1]"),
    "uppercase-community": ("nodes:\n- {name: c, role: connector}\n- {name: e, role: edge, communities: [A]}\n",
                            "nodes[1]"),
    "unknown-role": ("nodes:\n- {name: c, role: connector}\n- {name: e, role: gateway}\n", "nodes[1].role"),
    "two-connectors": ("nodes:\n- {name: c, role: connector}\n- {name: d, role: connector}\n", "<document>"),
    "typo-in-key": ("nodes:\n- {name: c, role: connector, comunities: []}\n", "nodes[0].comunities"),
    "bad-cidr": ("wan_cidr: 198.51.100.1/24\nnodes:\n- {name: c, role: connector}\n", "wan_cidr"),
    "unknown-nat": ("nats: [{name: s1}]\nnodes:\n- {name: c, role: connector}\n- {name: e, role: edge, nat: s2}\n",
                    "nodes[1].nat"),
    "nat-on-cloud": ("nats: [{name: s1}]\nnodes:\n- {name: c, role: connector, nat: s1}\n", "nodes[0]"),
    "bad-nat-type": ("nats: [{name: s1, type: cone}]\nnodes:\n- {name: c, role: connector}\n", "nats[0].type"),
    "nat-twice": ("nats: [{name: s1}, {name: s1}]\nnodes:\n- {name: c, role: connector}\n", "nats[1].name"),
    "nat-named-like-node": ("nats: [{name: c}]\nnodes:\n- {name: c, role: connector}\n", "nats[0].name"),
    "lan-overlaps-pool": ("nats: [{name: s1, lan_cidr: 10.233.7.0/24}]\nnodes:\n- {name: c, role: connector}\n",
                          "nats[0].lan_cidr"),
}


@pytest.mark.parametrize("text,field", BAD.values(), ids=BAD.keys())
def test_bad_topology_is_rejected_naming_the_field(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "topology.yaml"
    path.write_text(text)
    with pytest.raises(TopologyError) as exc:
        load_topology(path)
    assert f": {field}:" in str(exc.value)
