"""Hole punching: which community pairs the planner mediates, and what charon is given for them (tables)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from fabmesh.mesh.model import LocalNode, NodeMesh, Peer, Role
from fabmesh.node.tunnel_sync import MEDIATION_RESPONDER_S, MEDIATION_STUCK_S, Credentials, TunnelSync
from fabmesh.node.tunnels import desired_connections, initiated, mediation_name
from fabmesh.operator.inventory import NodeInfo, read_node
from fabmesh.operator.plan import MeshPlan, plan
from fabmesh.operator.settings import OperatorSettings
from tests.unit.test_plan import CONNECTOR, edge

pytestmark = pytest.mark.unit

NATTED = {"e1": edge("e1", "192.168.1.10", "a"), "e2": edge("e2", "192.168.2.10", "a")}
PUBLIC = {"p1": edge("p1", "10.0.0.1", "a", external="203.0.113.1"),
          "p2": edge("p2", "10.0.0.2", "a", external="203.0.113.2")}


def _plan(*objs: dict[str, Any], settings: OperatorSettings | None = None) -> MeshPlan:
    settings = settings or OperatorSettings()
    infos = [read_node(o, settings) for o in objs]
    assert all(isinstance(i, NodeInfo) for i in infos)
    return plan(infos, settings, "CA")  # type: ignore[arg-type]


def _mediated(result: MeshPlan) -> dict[str, dict[str, str | None]]:
    """Per edge, its edge peers and who mediates each (None: dialled directly)."""
    return {n: {p.name: p.mediated_by for p in m.peers if p.role is Role.EDGE} for n, m in result.edges.items()}


def _clients(result: MeshPlan) -> set[str]:
    mesh = result.connector_mesh()
    assert mesh is not None
    return {p.name for p in mesh.peers if p.mediation_client}


CASES = {
    "two-natted-edges-are-mediated": (
        [CONNECTOR, NATTED["e1"], NATTED["e2"]], None,
        {"e1": {"e2": "conn"}, "e2": {"e1": "conn"}}, {"e1", "e2"}),
    "a-public-and-a-natted-edge-are-mediated": (
        [CONNECTOR, PUBLIC["p1"], NATTED["e1"]], None,
        {"e1": {"p1": "conn"}, "p1": {"e1": "conn"}}, {"e1", "p1"}),
    "two-public-edges-dial-directly": (
        [CONNECTOR, PUBLIC["p1"], PUBLIC["p2"]], None,
        {"p1": {"p2": None}, "p2": {"p1": None}}, set()),
    "mixed-community-mediates-only-pairs-with-a-natted-edge": (
        [CONNECTOR, PUBLIC["p1"], PUBLIC["p2"], NATTED["e1"]], None,
        {"e1": {"p1": "conn", "p2": "conn"}, "p1": {"e1": "conn", "p2": None}, "p2": {"e1": "conn", "p1": None}},
        {"e1", "p1", "p2"}),
    "a-natted-edge-without-community-peers-is-no-client": (
        [CONNECTOR, edge("e1", "192.168.1.10"), NATTED["e2"]], None, {"e1": {}, "e2": {}}, set()),
    "hole-punching-off-dials-endpoints": (
        [CONNECTOR, NATTED["e1"], NATTED["e2"]], OperatorSettings(hole_punching=False),
        {"e1": {"e2": None}, "e2": {"e1": None}}, set()),
}


@pytest.mark.parametrize("nodes,settings,expected,clients", CASES.values(), ids=CASES.keys())
def test_planner_mediates_pairs_with_an_edge_behind_nat(nodes: list[dict[str, Any]],
                                                        settings: OperatorSettings | None,
                                                        expected: dict[str, dict[str, str | None]],
                                                        clients: set[str]) -> None:
    result = _plan(*nodes, settings=settings)
    assert _mediated(result) == expected
    assert _clients(result) == clients


def test_without_a_connector_nothing_is_mediated() -> None:
    result = _plan(NATTED["e1"], NATTED["e2"])
    assert _mediated(result) == {"e1": {"e2": None}, "e2": {"e1": None}}
    assert result.connector_mesh() is None


def test_mediation_keeps_the_one_initiator_rule_and_the_same_plan_twice() -> None:
    first, second = _plan(CONNECTOR, NATTED["e1"], NATTED["e2"]), _plan(CONNECTOR, NATTED["e2"], NATTED["e1"])
    assert {n: {p.name: p.initiate for p in m.peers} for n, m in first.edges.items()} == {
        "e1": {"conn": True, "e2": True}, "e2": {"conn": True, "e1": False}}
    assert first.edges == second.edges and first.connector_mesh() == second.connector_mesh()


# -- rendering -------------------------------------------------------------------------------------

def _edge_mesh(*peers: Peer) -> NodeMesh:
    return NodeMesh(node=LocalNode(name="e1", role=Role.EDGE, address="192.168.1.10", endpoint="192.168.1.10"),
                    local_subnets=("10.233.1.0/24",), mesh_cidrs=("10.233.0.0/16",), peers=peers, caCert="CA")


TO_CONNECTOR = Peer(name="conn", role=Role.CONNECTOR, endpoint="198.51.100.1", subnets=("10.244.0.0/16",),
                    initiate=True, pubkey="AAAA")
TO_E2 = Peer(name="e2", role=Role.EDGE, endpoint="192.168.2.10", subnets=("10.233.2.0/24",), initiate=True,
             pubkey="BBBB", mediated_by="conn")

RENDER = {
    # (peers, connection, keys expected in it)
    "mediated-peer-dials-nobody-and-names-its-mediation": (
        (TO_CONNECTOR, TO_E2), "e2",
        {"remote_addrs": ["%any"], "mediated_by": "mediation@conn", "mediation_peer": "e2", "unique": "replace"}),
    "mediation-connection-to-the-connector": (
        (TO_CONNECTOR, TO_E2), "mediation@conn",
        {"remote_addrs": ["198.51.100.1"], "mediation": "yes", "unique": "replace", "children": None}),
    "data-connection-to-the-connector-is-unchanged": (
        (TO_CONNECTOR, TO_E2), "conn", {"remote_addrs": ["198.51.100.1"], "unique": "replace"}),
    "direct-peer-dials-its-endpoint": (
        (TO_CONNECTOR, TO_E2.model_copy(update={"mediated_by": None})), "e2",
        {"remote_addrs": ["192.168.2.10"], "unique": "replace"}),
}


@pytest.mark.parametrize("peers,name,expected", RENDER.values(), ids=RENDER.keys())
def test_rendering(peers: tuple[Peer, ...], name: str, expected: dict[str, Any]) -> None:
    conn = desired_connections(_edge_mesh(*peers), "CERT")[name]
    assert {k: conn.get(k) for k in expected} == expected


def test_mediation_connection_has_no_child_and_the_same_pin_as_the_data_connection() -> None:
    conns = desired_connections(_edge_mesh(TO_CONNECTOR, TO_E2), "CERT")
    assert sorted(conns) == ["conn", "e2", "mediation@conn"]
    assert "children" not in conns["mediation@conn"] and "mediated_by" not in conns["conn"]
    assert conns["mediation@conn"]["remote"] == conns["conn"]["remote"]
    assert conns["e2"]["children"]["e2"]["remote_ts"] == ["10.233.2.0/24"]


def test_an_edge_without_mediated_peers_has_no_mediation_connection() -> None:
    mesh = _edge_mesh(TO_CONNECTOR, TO_E2.model_copy(update={"mediated_by": None}))
    assert mediation_name("conn") not in desired_connections(mesh, "CERT")
    assert initiated(mesh) == {"conn", "e2"}


def test_a_mediating_edge_initiates_its_mediation_connection_even_as_responder() -> None:
    mesh = _edge_mesh(TO_CONNECTOR, TO_E2.model_copy(update={"initiate": False}))
    assert initiated(mesh) == {"conn", "mediation@conn"}


@pytest.mark.parametrize("client,unique", [(True, "no"), (False, "replace")])
def test_connector_side_unique_policy(client: bool, unique: str) -> None:
    mesh = NodeMesh(node=LocalNode(name="conn", role=Role.CONNECTOR, address="198.51.100.1", endpoint="198.51.100.1"),
                    local_subnets=("10.244.0.0/16",), mesh_cidrs=("10.233.0.0/16",), caCert="CA",
                    peers=(Peer(name="e1", role=Role.EDGE, subnets=("10.233.1.0/24",), mediation_client=client),))
    conns = desired_connections(mesh, "CERT")
    assert list(conns) == ["e1"] and conns["e1"]["unique"] == unique


@pytest.mark.parametrize("mediated_by", ["nobody", "e3"])
def test_a_mediator_must_be_a_peer_with_an_endpoint_named_in_the_error(mediated_by: str) -> None:
    e3 = Peer(name="e3", role=Role.EDGE, subnets=("10.233.3.0/24",))  # no endpoint: cannot be dialled
    with pytest.raises(ValidationError, match=r"peers\[1\]\.mediated_by"):
        _edge_mesh(TO_CONNECTOR, TO_E2.model_copy(update={"mediated_by": mediated_by}), e3)


# -- the agent's retry of a stuck attempt ----------------------------------------------------------

class FakeCharon:
    """Just enough of the VICI driver for TunnelSync: loaded conns, SAs, and what was called."""

    def __init__(self, sas: dict[str, dict[str, Any]], socket_path: Any) -> None:
        self.loaded: dict[str, Any] = {}
        self._sas = sas
        self.calls: list[str] = []
        self.socket_path = socket_path
        self.establish_mediation = False  # initiate_ike returns with the IKE_SA up (charon waited)

    def __enter__(self) -> FakeCharon:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def load_key(self, key: str) -> None: ...
    def load_cert(self, cert: str, ca: bool = False) -> None: ...

    def conns(self) -> dict[str, Any]:
        return dict(self.loaded)

    def load_conn(self, name: str, conn: Any) -> None:
        self.loaded[name] = conn

    def sas(self) -> dict[str, dict[str, Any]]:
        return self._sas

    def initiate(self, child: str, ike: str | None = None) -> None:
        self.calls.append(f"initiate {child}")

    def initiate_ike(self, ike: str, timeout_ms: int = -1) -> None:
        self.calls.append(f"initiate-ike {ike}")
        if self.establish_mediation:
            self._sas[ike] = {"state": "ESTABLISHED", "uniqueid": "2"}

    def terminate_ike(self, ike: str) -> None:
        self.calls.append(f"terminate {ike}")


def test_a_mediated_attempt_that_hangs_is_ended_and_started_again(tmp_path: Any) -> None:
    socket = tmp_path / "charon.vici"
    socket.write_text("")
    sas: dict[str, dict[str, Any]] = {}
    charon = FakeCharon(sas, socket)
    now = [0.0]
    sync = TunnelSync(lambda: charon, tmp_path / "tunnels.json", clock=lambda: now[0])  # type: ignore[arg-type,return-value]
    mesh = _edge_mesh(TO_CONNECTOR, TO_E2)
    desired, creds = desired_connections(mesh, "CERT"), Credentials("KEY", "CA")

    sync.apply(desired, creds, initiated(mesh))
    # One at a time: the mediation connection waits for the data IKE_SA with the connector (charon
    # would send INITIAL_CONTACT on it and the connector would drop the data IKE_SA), the mediated
    # one for the mediation IKE_SA (charon would start that one itself).
    assert charon.calls == ["initiate conn"]
    sas["conn"] = {"state": "CONNECTING", "uniqueid": "1"}
    charon.calls.clear()
    sync.apply(desired, creds, initiated(mesh))
    assert charon.calls == []
    sas["conn"] = {"state": "ESTABLISHED", "child-sas": {"c": {}}, "uniqueid": "1"}
    sync.apply(desired, creds, initiated(mesh))
    assert charon.calls == ["initiate-ike mediation@conn"]  # it did not come up in time
    charon.establish_mediation = True
    charon.calls.clear()
    sync.apply(desired, creds, initiated(mesh))  # it did: the mediated connection follows in the same pass
    assert charon.calls == ["initiate-ike mediation@conn", "initiate e2"]

    sas["e2"] = {"state": "CREATED", "uniqueid": "3"}
    for at in (1.0, 1.0 + MEDIATION_STUCK_S - 0.5):  # in progress: left alone, the mediation SA too
        charon.calls.clear()
        now[0] = at
        sync.apply(desired, creds, initiated(mesh))
        assert charon.calls == [], at
    now[0] = 1.0 + MEDIATION_STUCK_S
    sync.apply(desired, creds, initiated(mesh))
    assert charon.calls == ["terminate e2", "initiate e2"]

    charon.calls.clear()
    sas["e2"] = {"state": "CONNECTING", "uniqueid": "4"}  # a new attempt gets its own time
    now[0] += MEDIATION_STUCK_S - 0.5
    sync.apply(desired, creds, initiated(mesh))
    assert charon.calls == []


def test_after_a_charon_restart_a_responder_reaches_its_mediated_peers_once(tmp_path: Any) -> None:
    """The peer still holds the old direct IKE_SA; only a new one, with INITIAL_CONTACT, ends it early."""
    socket = tmp_path / "charon.vici"
    socket.write_text("")
    sas: dict[str, dict[str, Any]] = {"conn": {"state": "ESTABLISHED", "child-sas": {"c": {}}, "uniqueid": "1"},
                                      "mediation@conn": {"state": "ESTABLISHED", "uniqueid": "2"}}
    charon = FakeCharon(sas, socket)
    sync = TunnelSync(lambda: charon, tmp_path / "tunnels.json")  # type: ignore[arg-type,return-value]
    mesh = _edge_mesh(TO_CONNECTOR, TO_E2.model_copy(update={"initiate": False}))  # e1 only responds to e2
    desired, creds = desired_connections(mesh, "CERT"), Credentials("KEY", "CA")
    sync.apply(desired, creds, initiated(mesh))
    assert "initiate e2" not in charon.calls

    socket.unlink()
    socket.write_text("")  # a new charon run: another socket
    for _ in range(2):
        charon.calls.clear()
        sync.apply(desired, creds, initiated(mesh))
        assert charon.calls.count("initiate e2") == (1 if _ == 0 else 0), charon.calls


def test_the_responder_of_a_mediated_pair_steps_in_when_the_pair_stays_without_an_ike_sa(tmp_path: Any) -> None:
    """charon can keep a lost attempt registered on the initiator's side and queue every later one."""
    socket = tmp_path / "charon.vici"
    socket.write_text("")
    sas: dict[str, dict[str, Any]] = {"conn": {"state": "ESTABLISHED", "child-sas": {"c": {}}, "uniqueid": "1"},
                                      "mediation@conn": {"state": "ESTABLISHED", "uniqueid": "2"}}
    charon = FakeCharon(sas, socket)
    now = [0.0]
    sync = TunnelSync(lambda: charon, tmp_path / "tunnels.json", clock=lambda: now[0])  # type: ignore[arg-type,return-value]
    mesh = _edge_mesh(TO_CONNECTOR, TO_E2.model_copy(update={"initiate": False}))
    desired, creds = desired_connections(mesh, "CERT"), Credentials("KEY", "CA")
    calls = []
    for at in (0.0, MEDIATION_RESPONDER_S - 1, MEDIATION_RESPONDER_S, MEDIATION_RESPONDER_S + 1):
        now[0] = at
        charon.calls.clear()
        sync.apply(desired, creds, initiated(mesh))
        calls.append(charon.calls.count("initiate e2"))
    assert calls == [0, 0, 1, 0]
    sas["e2"] = {"state": "ESTABLISHED", "child-sas": {"c": {}}, "uniqueid": "5"}  # made by either side
    now[0] += 3 * MEDIATION_RESPONDER_S
    charon.calls.clear()
    sync.apply(desired, creds, initiated(mesh))
    assert charon.calls == []
