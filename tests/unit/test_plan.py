"""plan(): from Nodes and settings to every node's mesh, table-driven."""

from __future__ import annotations

from typing import Any

import pytest

from fabmesh.mesh.model import Role
from fabmesh.operator.inventory import InvalidNode, NodeInfo, read_node
from fabmesh.operator.plan import MeshPlan, plan, shard_of
from fabmesh.operator.settings import OperatorSettings

pytestmark = pytest.mark.unit

SETTINGS = OperatorSettings()
FLANNEL = {"flannel.alpha.coreos.com/backend-type": "vxlan",
           "flannel.alpha.coreos.com/backend-data": '{"VNI":1,"VtepMAC":"0a:58:0a:f4:00:01"}',
           "flannel.alpha.coreos.com/public-ip": "198.51.100.1",
           "flannel.alpha.coreos.com/kube-subnet-manager": "true"}  # flanneld writes all four on its Node


def raw(name: str, ip: str | None, labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None,
        pod_cidr: str | None = None, external: str | None = None, created: str = "") -> dict[str, Any]:
    addresses = ([{"type": "InternalIP", "address": ip}] if ip else []) + \
        ([{"type": "ExternalIP", "address": external}] if external else [])
    return {"metadata": {"name": name, "labels": labels or {}, "annotations": annotations or {},
                         "creationTimestamp": created},
            "spec": {"podCIDR": pod_cidr} if pod_cidr else {}, "status": {"addresses": addresses}}


def edge(name: str, ip: str, *communities: str, **kw: Any) -> dict[str, Any]:
    labels = {"node-role.kubernetes.io/edge": "", **{f"community.fabmesh.io/{c}": "" for c in communities}}
    return raw(name, ip, labels, **kw)


CONNECTOR_LABEL = "node-restriction.kubernetes.io/fabmesh-connector"
CONNECTOR = raw("conn", "198.51.100.1", {CONNECTOR_LABEL: ""}, FLANNEL)
CLOUD = raw("cloud", "198.51.100.2")


def run(*objs: dict[str, Any], recorded: dict[str, str] | None = None) -> tuple[MeshPlan, list[InvalidNode]]:
    infos: list[NodeInfo] = []
    invalid: list[InvalidNode] = []
    for obj in objs:
        info = read_node(obj, SETTINGS)
        (invalid if isinstance(info, InvalidNode) else infos).append(info)  # type: ignore[arg-type]
    return plan(infos, SETTINGS, "CA", recorded), invalid


def peers(result: MeshPlan, node: str) -> dict[str, bool]:
    return {p.name: p.initiate for p in result.edges[node].peers}


CASES = {
    "edge-peers-with-connector-and-community": (
        [CONNECTOR, CLOUD, edge("e1", "192.0.2.1", "a"), edge("e2", "192.0.2.2", "a"), edge("e3", "192.0.2.3")],
        {"e1": {"conn": True, "e2": True}, "e2": {"conn": True, "e1": False}, "e3": {"conn": True}},
    ),
    "several-communities-union-without-duplicates": (
        [CONNECTOR, edge("e1", "192.0.2.1", "a", "b"), edge("e2", "192.0.2.2", "a", "b"), edge("e3", "192.0.2.3", "b")],
        {"e1": {"conn": True, "e2": True, "e3": True}, "e2": {"conn": True, "e1": False, "e3": True},
         "e3": {"conn": True, "e1": False, "e2": False}},
    ),
    "no-connector-only-community-peers": (
        [edge("e1", "192.0.2.1", "a"), edge("e2", "192.0.2.2", "a")],
        {"e1": {"e2": True}, "e2": {"e1": False}},
    ),
}


@pytest.mark.parametrize("nodes,expected", CASES.values(), ids=CASES.keys())
def test_peers_follow_connector_and_shared_communities(nodes: list[dict[str, Any]],
                                                       expected: dict[str, dict[str, bool]]) -> None:
    result, _ = run(*nodes)
    assert {n: peers(result, n) for n in result.edges} == expected


def test_connector_tunnel_carries_cloud_pods_services_and_the_edge_pool_for_relay() -> None:
    result, _ = run(CONNECTOR, CLOUD, edge("e1", "192.0.2.1"), edge("e3", "192.0.2.3"))
    connector_peer = next(p for p in result.edges["e1"].peers if p.name == "conn")
    assert connector_peer.subnets == ("10.233.0.0/16", "10.244.0.0/16", "10.96.0.0/12")
    assert connector_peer.endpoint == "198.51.100.1" and connector_peer.role is Role.CONNECTOR
    assert result.edges["e1"].local_subnets == ("10.233.0.0/24", "192.0.2.1/32")
    # The connector offers the same subnets back, and lists every edge's own subnets.
    mesh = result.connector_mesh()
    assert mesh is not None and mesh.local_subnets == connector_peer.subnets
    assert {p.name: p.subnets for p in mesh.peers} == {"e1": ("10.233.0.0/24", "192.0.2.1/32"),
                                                      "e3": ("10.233.1.0/24", "192.0.2.3/32")}
    assert all(p.endpoint is None and not p.initiate for p in mesh.peers)


def test_configured_cloud_host_ranges_join_the_connector_tunnel() -> None:
    settings = SETTINGS.model_copy(update={"cloud_node_cidrs": ("172.20.0.0/16",)})
    infos = [read_node(n, settings) for n in (CONNECTOR, edge("e1", "192.0.2.1"))]
    result = plan(infos, settings, "CA")  # type: ignore[arg-type]
    assert "172.20.0.0/16" in next(p for p in result.edges["e1"].peers if p.name == "conn").subnets


def test_same_input_in_any_order_gives_identical_configs() -> None:
    nodes = [CONNECTOR, CLOUD, *(edge(f"e{i}", f"192.0.2.{i}", f"c{i % 3}") for i in range(1, 30))]
    forward, _ = run(*nodes)
    backward, _ = run(*reversed(nodes))
    assert {n: m.to_yaml() for n, m in forward.edges.items()} == {n: m.to_yaml() for n, m in backward.edges.items()}
    assert forward.connector_shards == backward.connector_shards


def test_recorded_allocation_is_kept_even_before_it_reaches_the_node() -> None:
    result, _ = run(CONNECTOR, edge("e1", "192.0.2.1"), recorded={"e1": "10.233.7.0/24"})
    assert result.cidrs == {"e1": "10.233.7.0/24"} and result.allocated == {}
    assert result.node_patches["e1"].spec_pod_cidr == "10.233.7.0/24"


def test_deleted_node_is_dropped_from_the_ipam_record() -> None:
    result, _ = run(CONNECTOR, edge("e1", "192.0.2.1"), recorded={"e1": "10.233.0.0/24", "gone": "10.233.9.0/24"})
    assert result.ipam_record == {"e1": "10.233.0.0/24"}


def test_edge_gets_the_connectors_flannel_annotations_and_only_changed_keys_are_patched() -> None:
    result, _ = run(CONNECTOR, edge("e1", "192.0.2.1", annotations={**FLANNEL}))
    patch = result.node_patches["e1"]
    # The copied keys are there already; only the record of the copy and the finalizer are new.
    assert set(patch.annotations) == {"fabmesh.io/pod-cidr", "fabmesh.io/flannel-copy"}
    assert patch.finalizers == ("fabmesh.io/flannel-release",)
    assert patch.spec_pod_cidr == "10.233.0.0/24"


def test_edge_gets_what_real_flanneld_needs_for_a_lease_pointing_at_the_connector() -> None:
    # flanneld's kube subnet manager makes a lease only from a Node with the kube-subnet-manager marker
    # and a spec.podCIDR; the vxlan backend then routes that CIDR to the VtepMAC and public-ip given.
    connector = raw("conn", "198.51.100.1", {CONNECTOR_LABEL: ""},
                    {k: v for k, v in FLANNEL.items() if not k.endswith("kube-subnet-manager")})
    result, _ = run(connector, edge("e1", "192.0.2.1"))
    patch = result.node_patches["e1"]
    assert patch.annotations == {
        "fabmesh.io/pod-cidr": "10.233.0.0/24",
        "flannel.alpha.coreos.com/backend-type": "vxlan",
        "flannel.alpha.coreos.com/backend-data": '{"VNI":1,"VtepMAC":"0a:58:0a:f4:00:01"}',
        "flannel.alpha.coreos.com/public-ip": "198.51.100.1",
        "flannel.alpha.coreos.com/kube-subnet-manager": "true",  # written, not copied: the connector lacks it
        "fabmesh.io/flannel-copy": '{"backend-data":"{\\"VNI\\":1,\\"VtepMAC\\":\\"0a:58:0a:f4:00:01\\"}",'
                                   '"backend-type":"vxlan","public-ip":"198.51.100.1"}',
    }
    # ...and, in the same write, the finalizer that lets the operator take them back before the Node goes.
    assert patch.finalizers == ("fabmesh.io/flannel-release",)
    assert patch.spec_pod_cidr == "10.233.0.0/24"


def test_connector_without_flannel_annotations_is_an_error_on_the_connector() -> None:
    result, _ = run(raw("conn", "198.51.100.1", {CONNECTOR_LABEL: ""}), edge("e1", "192.0.2.1"))
    assert [(e.node, e.field.split("[")[0]) for e in result.errors] == [("conn", "metadata.annotations")]
    assert "e1" in result.edges and "fabmesh.io/pod-cidr" in result.node_patches["e1"].annotations


def test_external_ip_is_the_tunnel_endpoint_and_is_in_the_certificate() -> None:
    result, _ = run(CONNECTOR, edge("e1", "192.168.1.10", "a", external="203.0.113.10"),
                    edge("e2", "192.0.2.2", "a"))
    e1_seen_from_e2 = next(p for p in result.edges["e2"].peers if p.name == "e1")
    assert e1_seen_from_e2.endpoint == "203.0.113.10"
    assert result.cert_addresses["e1"] == ("192.168.1.10", "203.0.113.10")


BAD = {
    "uppercase-community": (edge("x", "192.0.2.9", "Bad"), "metadata.labels[community.fabmesh.io/Bad]"),
    "edge-and-connector": (raw("x", "192.0.2.9", {"node-role.kubernetes.io/edge": "", CONNECTOR_LABEL: ""}),
                           f"metadata.labels[{CONNECTOR_LABEL}]"),
    "no-internal-ip": (edge("x", None), "status.addresses"),  # type: ignore[arg-type]
    "malformed-ip": (edge("x", "999.1.1.1"), "status.addresses[0]"),
}


@pytest.mark.parametrize("bad,field", BAD.values(), ids=BAD.keys())
def test_bad_node_is_reported_with_its_field_and_the_others_are_planned(bad: dict[str, Any], field: str) -> None:
    result, invalid = run(CONNECTOR, edge("good", "192.0.2.1"), bad)
    assert [(e.node, e.field) for e in invalid] == [("x", field)]
    assert set(result.edges) == {"good"}


def test_connector_shards_are_stable_and_one_new_edge_touches_one_shard() -> None:
    nodes = [CONNECTOR, *(edge(f"e{i}", f"192.0.2.{i}") for i in range(1, 60))]
    before, _ = run(*nodes)
    after, _ = run(*nodes, edge("new", "192.0.2.200"), recorded=before.ipam_record)
    changed = {i for i in after.connector_shards if after.connector_shards[i] != before.connector_shards[i]}
    assert changed == {shard_of("new", SETTINGS.connector_shards)}
    assert {n for n in before.edges if before.edges[n] != after.edges[n]} == set()


def _naive_peers(objs: list[dict[str, Any]], name: str) -> list[tuple[str, bool]]:
    """The peer list by definition: every community mate, plus the connector, in name order."""
    labels = {o["metadata"]["name"]: o["metadata"]["labels"] for o in objs}
    mine = {k for k in labels[name] if k.startswith("community.fabmesh.io/")}
    mates = {n for n, lab in labels.items() if n != name and "node-role.kubernetes.io/edge" in lab and mine & set(lab)}
    connectors = sorted(n for n, lab in labels.items() if CONNECTOR_LABEL in lab)[:1]  # equal creation times: by name
    return sorted([(m, name < m) for m in mates] + [(c, True) for c in connectors])


@pytest.mark.parametrize("seed", range(40), ids=lambda s: f"seed-{s}")
def test_peer_lists_match_the_definition_whatever_the_names_and_memberships(seed: int) -> None:
    import random

    rng = random.Random(seed)
    objs: list[dict[str, Any]] = []
    for i, name in enumerate(sorted({"".join(rng.choice("abcm") for _ in range(rng.randint(1, 3)))
                                     for _ in range(rng.randint(1, 20))})):
        if rng.random() < 0.15:
            objs.append(raw(name, f"198.51.100.{i + 1}", {CONNECTOR_LABEL: ""}, FLANNEL))
        else:
            objs.append(edge(name, f"192.0.2.{i + 1}", *rng.sample("xyz", rng.randint(0, 3))))
    result, _ = run(*objs)
    for name, mesh in result.edges.items():
        assert [(p.name, p.initiate) for p in mesh.peers] == _naive_peers(objs, name), name


def test_plan_leaves_the_garbage_collector_running() -> None:
    """plan() runs beside watch threads: switching the process-wide collector off is not its call."""
    import gc

    infos = [read_node(obj, SETTINGS) for obj in
             (CONNECTOR, *(edge(f"e{i}", f"192.0.{2 + i // 250}.{1 + i % 250}", "a") for i in range(300)))]
    collections: list[int] = []
    gc.callbacks.append(lambda phase, info: collections.append(info["generation"]) if phase == "stop" else None)
    try:
        plan(infos, SETTINGS, "CA")  # type: ignore[arg-type]
    finally:
        gc.callbacks.pop()
    assert gc.isenabled() and collections, "the cyclic collector never ran during a 300-edge plan"


# -- issue 10: a hostile node or a bad label harms at most that node ---------------------------------

def subnets_seen_by_others(result: MeshPlan, node: str) -> set[str]:
    """Every subnet any other node routes into a tunnel towards ``node``."""
    seen = {s for name, mesh in result.edges.items() if name != node
            for p in mesh.peers if p.name == node for s in p.subnets}
    mesh = result.connector_mesh()
    return seen | {s for p in (mesh.peers if mesh else ()) if p.name == node for s in p.subnets}


HIJACKS = {
    "cloud-pod-ip": "10.244.1.5",
    "inside-another-edges-pod-cidr": "10.233.0.7",
    "service-ip": "10.96.0.1",
    "api-server-on-a-cloud-node": "198.51.100.2",
    "connector-address": "198.51.100.1",
    "another-edges-address": "192.0.2.1",
    "public-address-with-edge-node-cidrs-empty": "8.8.8.8",
    "loopback": "127.0.0.1",
}


@pytest.mark.parametrize("address", HIJACKS.values(), ids=HIJACKS.keys())
def test_an_edge_internal_ip_that_is_not_its_own_is_never_announced_and_the_edge_stays(address: str) -> None:
    result, _ = run(CONNECTOR, CLOUD, edge("good", "192.0.2.1", "a", created="1"),
                    edge("x", address, "a", created="2"))
    assert f"{address}/32" not in subnets_seen_by_others(result, "x")
    assert subnets_seen_by_others(result, "x") == {result.cidrs["x"]}  # its pod CIDR still reachable
    assert f"{address}/32" not in result.edges["x"].local_subnets
    assert ("x", "status.addresses[0]") in [(e.node, e.field) for e in result.errors]
    if address != "192.0.2.1":  # the good edge keeps its own address, unless x copied it
        assert "192.0.2.1/32" in subnets_seen_by_others(result, "good")


def test_edge_node_cidrs_limits_which_internal_ips_are_announced() -> None:
    settings = SETTINGS.model_copy(update={"edge_node_cidrs": ("192.168.0.0/16",)})
    infos = [read_node(n, settings) for n in (CONNECTOR, edge("in", "192.168.7.1"), edge("out", "192.0.2.2"))]
    result = plan(infos, settings, "CA")  # type: ignore[arg-type]
    assert result.edges["in"].local_subnets == (result.cidrs["in"], "192.168.7.1/32")
    assert result.edges["out"].local_subnets == (result.cidrs["out"],)
    assert [(e.node, e.field) for e in result.errors] == [("out", "status.addresses[0]")]
    assert "edge_node_cidrs" in result.errors[0].reason


def test_an_external_ip_inside_the_cloud_range_never_makes_peers_drop_the_cloud_route() -> None:
    from fabmesh.node.desired import desired_state

    result, _ = run(CONNECTOR, edge("good", "192.0.2.1", "a"), edge("x", "192.0.2.9", "a", external="10.244.0.9"))
    x_seen_from_good = next(p for p in result.edges["good"].peers if p.name == "x")
    assert x_seen_from_good.endpoint == "192.0.2.9"  # its InternalIP, not the cloud address
    assert ("x", "status.addresses[1]") in [(e.node, e.field) for e in result.errors]
    state = desired_state(result.edges["good"], "CERT", uplink="wan0")
    assert "10.244.0.0/16" in {r.dst for r in state.routes}


def test_two_nated_edges_with_the_same_private_address_keep_their_tunnels_and_neither_announces_it() -> None:
    result, _ = run(CONNECTOR, edge("home-a", "192.168.1.10", "a", external="203.0.113.1"),
                    edge("home-b", "192.168.1.10", "a", external="203.0.113.2"))
    for name, other in (("home-a", "home-b"), ("home-b", "home-a")):
        assert subnets_seen_by_others(result, name) == {result.cidrs[name]}
        assert other in peers(result, name) and "conn" in peers(result, name)
    assert sorted((e.node, e.field) for e in result.errors) == [("home-a", "status.addresses[0]"),
                                                                ("home-b", "status.addresses[0]")]


def test_a_pod_cidr_annotation_on_a_cloud_node_is_ignored() -> None:
    cloud = raw("cloud", "198.51.100.2", annotations={"fabmesh.io/pod-cidr": "10.233.0.0/16"})
    result, _ = run(CONNECTOR, cloud, edge("e1", "192.0.2.1"), edge("e2", "192.0.2.2"))
    assert set(result.cidrs) == {"e1", "e2"} and result.errors == []
    assert {p.name for p in result.connector_mesh().peers} == {"e1", "e2"}  # type: ignore[union-attr]


def test_the_ipam_record_outranks_an_edges_rewritten_annotation() -> None:
    recorded = {"e1": "10.233.0.0/24", "e2": "10.233.1.0/24"}
    result, _ = run(CONNECTOR, edge("e1", "192.0.2.1", annotations={"fabmesh.io/pod-cidr": "10.233.0.0/24"}),
                    edge("e2", "192.0.2.2", annotations={"fabmesh.io/pod-cidr": "10.233.0.0/24"}),
                    recorded=recorded)
    assert result.cidrs == recorded
    assert [(e.node, e.field) for e in result.errors] == [("e2", "metadata.annotations[fabmesh.io/pod-cidr]")]
    assert result.node_patches["e2"].annotations["fabmesh.io/pod-cidr"] == "10.233.1.0/24"


def test_an_invalid_claim_never_blocks_valid_ones() -> None:
    result, _ = run(CONNECTOR, edge("bad", "192.0.2.9", annotations={"fabmesh.io/pod-cidr": "10.233.0.0/16"},
                                    created="1"),
                    edge("e1", "192.0.2.1", created="2"), edge("e2", "192.0.2.2", created="3"))
    assert result.cidrs == {"e1": "10.233.0.0/24", "e2": "10.233.1.0/24"}
    assert [(e.node, e.field) for e in result.errors] == [("bad", "metadata.annotations[fabmesh.io/pod-cidr]")]


def test_an_edge_that_turns_invalid_stays_in_its_peers_configs_with_its_last_good_values_until_deleted() -> None:
    nodes = [CONNECTOR, edge("e1", "192.0.2.1", "a"), edge("e2", "192.0.2.2", "a", external="203.0.113.2")]
    before, _ = run(*nodes)
    last_good = {n: m.to_yaml() for n, m in before.edges.items()}
    broken = edge("e2", "192.0.2.2", "a", "Bad", external="203.0.113.2")
    infos = [i for i in (read_node(n, SETTINGS) for n in (*nodes[:2], broken)) if isinstance(i, NodeInfo)]
    after = plan(infos, SETTINGS, "CA", before.ipam_record, last_good)
    assert "e2" not in after.edges and after.held == ("e2",)
    assert after.edges["e1"].peers == before.edges["e1"].peers
    assert after.connector_shards == before.connector_shards
    assert after.ipam_record == before.ipam_record
    # Its CIDR stays taken: a newcomer gets another one.
    newcomer = read_node(edge("e3", "192.0.2.3"), SETTINGS)
    assert plan([*infos, newcomer], SETTINGS, "CA", before.ipam_record,  # type: ignore[list-item]
                last_good).cidrs["e3"] not in before.ipam_record.values()
    gone = plan(infos[:2], SETTINGS, "CA", after.ipam_record, {"e1": last_good["e1"]})
    assert {p.name for p in gone.edges["e1"].peers} == {"conn"} and "e2" not in gone.ipam_record


def test_dual_stack_edges_announce_their_address_of_the_mesh_family_and_ipv6_only_is_an_error() -> None:
    dual = edge("dual", "2001:db8::5", "a")
    dual["status"]["addresses"].append({"type": "InternalIP", "address": "192.0.2.5"})
    result, invalid = run(CONNECTOR, edge("e1", "192.0.2.1", "a"), dual, edge("v6", "2001:db8::6", "a"))
    assert result.edges["dual"].local_subnets == (result.cidrs["dual"], "192.0.2.5/32")
    assert next(p for p in result.edges["e1"].peers if p.name == "dual").endpoint == "192.0.2.5"
    assert [(e.node, e.field) for e in invalid] == [("v6", "status.addresses")]
    every = {s for m in result.edges.values() for p in m.peers for s in p.subnets}
    every |= {s for p in result.connector_mesh().peers for s in p.subnets}  # type: ignore[union-attr]
    assert not any(":" in s for s in every)


def test_settings_refuse_ranges_of_another_family_than_the_pool() -> None:
    with pytest.raises(ValueError, match="cloud_pod_cidrs fd00::/48 is not IPv4"):
        OperatorSettings(cloud_pod_cidrs=("10.244.0.0/16", "fd00::/48"))


def test_every_connector_active_or_standby_gets_a_certificate_only_the_active_one_a_mesh() -> None:
    standby = raw("conn-0", "198.51.100.2", {CONNECTOR_LABEL: ""}, FLANNEL, created="2024-06-01T00:00:00Z")
    active = raw("conn-9", "198.51.100.9", {CONNECTOR_LABEL: ""}, FLANNEL, created="2024-01-01T00:00:00Z")
    result, _ = run(standby, active, edge("e1", "192.0.2.1"))
    assert result.connectors == ("conn-0", "conn-9")
    assert result.cert_addresses["conn-0"] == ("198.51.100.2",)
    assert result.cert_addresses["conn-9"] == ("198.51.100.9",)
    assert result.connector is not None and result.connector.node.name == "conn-9"  # the oldest, not by name
