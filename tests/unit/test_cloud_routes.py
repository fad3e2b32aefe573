"""The route agent's plan (``fabmesh.cloudagent.plan``) and the operator's ``routes.yaml`` for it, table-driven."""

from __future__ import annotations

from typing import Any

import pytest

from fabmesh.cloudagent.plan import EDGE_SET, NAT_CHAIN, cloud_state
from fabmesh.mesh.cloud import ActiveConnector, CloudRoutes, parse_cloud_routes
from fabmesh.mesh.dataplane import Route
from fabmesh.mesh.model import MeshConfigError
from fabmesh.operator.inventory import NodeInfo, read_node
from fabmesh.operator.plan import plan
from fabmesh.operator.settings import OperatorSettings
from tests.unit.test_plan import CLOUD, CONNECTOR, CONNECTOR_LABEL, FLANNEL, edge, raw

pytestmark = pytest.mark.unit

ROUTES = CloudRoutes(connector=ActiveConnector(name="conn", address="198.51.100.1"),
                     subnets=("10.233.0.0/16", "172.16.1.2/32"), no_snat=("10.233.0.0/16",),
                     source_cidrs=("10.244.0.0/16",))
CLOUD_2 = frozenset({"127.0.0.1", "198.51.100.2", "10.244.1.0"})  # lo, the uplink, flannel.1


def state(config: CloudRoutes = ROUTES, node: str | None = "cloud-2", addresses: frozenset[str] = CLOUD_2,
          device: str | None = "eth0"):  # type: ignore[no-untyped-def]
    return cloud_state(config, node_name=node, local_addresses=addresses, device=device)


def test_edge_subnets_go_via_the_connector_from_the_nodes_flannel_address_without_snat() -> None:
    planned = state()
    assert planned.routes == (
        Route(dst="10.233.0.0/16", dev="eth0", table=2621, gateway="198.51.100.1", src="10.244.1.0"),
        Route(dst="172.16.1.2/32", dev="eth0", table=2621, gateway="198.51.100.1", src="10.244.1.0"))
    assert [s.members for s in planned.ipsets] == [frozenset({"10.233.0.0/16", "172.16.1.2/32"})]
    assert [s.name for s in planned.ipsets] == [EDGE_SET]
    (chain,) = planned.chains
    assert (chain.table, chain.name) == ("nat", NAT_CHAIN)
    # kube-proxy's masquerade mark first (hairpin, external clients), then: no SNAT towards the edges.
    assert chain.rules == ("-m mark --mark 0x4000/0x4000 -j RETURN", f"-m set --match-set {EDGE_SET} dst -j ACCEPT")
    assert [(j.table, j.from_chain, j.to_chain, j.position) for j in planned.jumps] == [
        ("nat", "POSTROUTING", NAT_CHAIN, 1)]
    assert planned.gateway == "198.51.100.1" and not planned.idle


IDLE = {
    "no-connector": (dict(config=ROUTES.model_copy(update={"connector": None})), "no active connector"),
    "on-the-connector-by-name": (dict(node="conn"), "is the active connector conn"),
    "on-the-connector-by-address": (dict(node=None, addresses=frozenset({"198.51.100.1"})),
                                    "is the active connector conn"),
    "connector-unreachable": (dict(device=None), "no route to the connector"),
    "nothing-to-route": (dict(config=ROUTES.model_copy(update={"subnets": (), "no_snat": ()})),
                         "no subnet to route"),
}


@pytest.mark.parametrize("change,note", IDLE.values(), ids=IDLE.keys())
def test_the_agent_holds_nothing_where_it_must_not_route(change: dict[str, Any], note: str) -> None:
    planned = state(**change)
    assert (planned.routes, planned.ipsets, planned.chains, planned.jumps) == ((), (), (), ())
    assert planned.idle and planned.gateway is None
    assert any(note in n for n in planned.notes), planned.notes


def test_the_edge_pod_pool_flannel_routes_is_kept_from_snat_without_a_route_of_ours() -> None:
    config = ROUTES.model_copy(update={"subnets": ("172.16.1.2/32",)})
    planned = state(config=config)
    assert [r.dst for r in planned.routes] == ["172.16.1.2/32"]
    assert [s.members for s in planned.ipsets] == [frozenset({"10.233.0.0/16", "172.16.1.2/32"})]
    only_pool = state(config=ROUTES.model_copy(update={"subnets": (), "no_snat": ("10.233.0.0/16",)}))
    assert only_pool.routes == () and not only_pool.idle and [c.name for c in only_pool.chains] == [NAT_CHAIN]


def test_without_an_address_in_the_cloud_pod_cidrs_the_kernel_picks_the_source() -> None:
    planned = state(addresses=frozenset({"198.51.100.2"}))
    assert {r.src for r in planned.routes} == {None}


def test_a_subnet_holding_the_connector_or_a_local_address_is_never_routed() -> None:
    config = ROUTES.model_copy(update={"subnets": ("198.51.100.0/24", "10.244.1.0/24", "172.16.1.2/32"),
                                       "no_snat": ()})
    planned = state(config=config)
    assert [r.dst for r in planned.routes] == ["172.16.1.2/32"]
    assert sorted(planned.notes) == ["10.244.1.0/24 holds an address of this node: not routed",
                                     "198.51.100.0/24 holds the connector address 198.51.100.1: not routed"]


def test_re_pointing_changes_every_routes_gateway_and_nothing_else() -> None:
    moved = ROUTES.model_copy(update={"connector": ActiveConnector(name="conn-2", address="198.51.100.3")})
    before, after = state(), state(config=moved)
    assert {r.gateway for r in after.routes} == {"198.51.100.3"}
    assert [(r.dst, r.src) for r in after.routes] == [(r.dst, r.src) for r in before.routes]
    assert (after.ipsets, after.chains, after.jumps) == (before.ipsets, before.chains, before.jumps)


def test_routes_yaml_round_trips_and_a_typo_names_the_field() -> None:
    assert parse_cloud_routes(ROUTES.to_yaml()) == ROUTES
    with pytest.raises(MeshConfigError) as err:
        parse_cloud_routes(ROUTES.to_yaml().replace("subnets:", "subnet:"))
    assert err.value.field == "subnet"


# -- the operator's side: routes.yaml from the Nodes --------------------------------------------------

DEFAULTS = OperatorSettings()


def run(*objs: dict[str, Any], settings: OperatorSettings = DEFAULTS) -> CloudRoutes:
    infos = [i for i in (read_node(o, settings) for o in objs) if isinstance(i, NodeInfo)]
    result = plan(infos, settings, "CA")
    assert result.cloud is not None
    return result.cloud


def test_routes_yaml_lists_each_announced_edge_address_via_the_active_connector() -> None:
    cloud = run(CONNECTOR, CLOUD, edge("e1", "192.0.2.1"), edge("e2", "172.16.1.2"))
    assert cloud.connector == ActiveConnector(name="conn", address="198.51.100.1")
    assert cloud.subnets == ("172.16.1.2/32", "192.0.2.1/32")
    assert cloud.no_snat == ("10.233.0.0/16",)  # the pool, routed by flannel; the subnets are never SNATed either
    assert cloud.source_cidrs == ("10.244.0.0/16",)
    assert cloud.settings.route_table == 2621


def test_an_address_that_is_not_announced_is_not_routed_from_the_cloud() -> None:
    # e2 claims the cloud node's address: it is announced nowhere, so no cloud node may route it to the connector.
    cloud = run(CONNECTOR, CLOUD, edge("e1", "192.0.2.1"), edge("e2", "198.51.100.2"))
    assert cloud.subnets == ("192.0.2.1/32",)


def test_the_edge_pod_pool_is_routed_only_when_the_cloud_cni_is_not_flannel() -> None:
    flannel = run(CONNECTOR, edge("e1", "192.0.2.1"))
    other = run(CONNECTOR, edge("e1", "192.0.2.1"),
                settings=OperatorSettings(cloud_agent={"route_edge_pod_cidrs": True}))  # type: ignore[arg-type]
    assert flannel.subnets == ("192.0.2.1/32",)
    assert other.subnets == ("10.233.0.0/16", "192.0.2.1/32")


def test_without_a_connector_routes_yaml_says_so_and_with_two_the_oldest_is_named() -> None:
    assert run(CLOUD, edge("e1", "192.0.2.1")).connector is None
    younger = raw("conn-b", "198.51.100.5", {CONNECTOR_LABEL: ""}, FLANNEL, created="2026-01-02T00:00:00Z")
    older = raw("conn-c", "198.51.100.6", {CONNECTOR_LABEL: ""}, FLANNEL, created="2026-01-01T00:00:00Z")
    assert run(younger, older, edge("e1", "192.0.2.1")).connector == ActiveConnector(name="conn-c",
                                                                                       address="198.51.100.6")


def test_the_route_agent_and_the_node_agents_never_share_a_table() -> None:
    with pytest.raises(ValueError, match=r"cloud_agent\.route_table 2620 is node\.route_table"):
        OperatorSettings(cloud_agent={"route_table": 2620})  # type: ignore[arg-type]
