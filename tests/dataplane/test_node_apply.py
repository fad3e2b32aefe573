"""The node applier against a real namespace and a real charon: what one apply builds, and what a resync writes.

The code under test programs the namespace it runs in (routes, rules, iptables, ipsets, /proc/sys), so it
never runs in the test process: a small driver, started with ``ip netns exec`` inside the host's namespace,
holds one ``NodeApplier`` for its life (as the agent does), applies the mesh file it is handed on stdin and
answers with one JSON line (the report and the applier's cumulative write counters). A new driver process is
a restarted agent. Everything is then observed with the ordinary tools (``ip``, ``ipset``,
``iptables-save``) inside the namespace, and over VICI.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
import select
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fabmesh.mesh.model import Backend, LocalNode, NodeMesh, Peer, Role, TunnelSettings
from fabmesh.pki.authority import KeyPair, issue_leaf, new_ca
from fabmesh.strongswan.driver import Charon
from fabmesh.testenv.hosts import Host, Network, stop_pid

pytestmark = pytest.mark.dataplane

NOW = datetime.datetime.now(datetime.UTC)
REPO = Path(__file__).resolve().parents[2]
TABLE = "2620"
POD_CIDR = "10.233.1.0/24"
MESH_CIDRS = ("10.233.0.0/16", "10.244.0.0/16", "10.96.0.0/12")
EDGE2_SUBNETS = ("10.233.2.0/24", "192.0.2.2/32")
REPLY_TIMEOUT_S = 20.0
# Runs inside the host's namespace: one NodeApplier for the life of the process, one apply per stdin line.
DRIVER = """\
import json, logging, sys
from pathlib import Path

from fabmesh.mesh.model import parse_node_mesh
from fabmesh.node.apply import NodeApplier
from fabmesh.node.cni import render_conflist
from fabmesh.node.desired import desired_state
from fabmesh.node.teardown import plan_teardown
from fabmesh.node.tunnel_sync import Credentials

logging.basicConfig(stream=sys.stderr, level=logging.INFO)
config = json.loads(Path(sys.argv[1]).read_text())
creds = Credentials(key_pem=config["key_pem"], ca_pem=config["ca_pem"])
applier = NodeApplier(config["node"], Path(config["vici_socket"]), Path(config["state_dir"]),
                      Path(config["cni_conf_path"]))
state = None
for line in sys.stdin:
    if line.strip() == "teardown":  # an uninstall: remove what the last apply programmed
        plan = plan_teardown(mesh.settings, edge=True, cni_conf_dir=str(Path(config["cni_conf_path"]).parent),
                             anchor_subnets=state.anchors)
        report = applier.teardown(plan)
    else:
        mesh = parse_node_mesh(Path(line.strip()).read_text())
        state = desired_state(mesh, config["cert_pem"], conflist=render_conflist(mesh))
        report = applier.apply(state, creds)
    print(json.dumps({"changes": report.changes, "errors": report.errors, "writes": dict(applier.writes())}),
          flush=True)
"""


@dataclass
class Edge:
    """The edge node under test: its namespace, its charon, its credentials and where the agent keeps files."""

    host: Host
    ca: KeyPair
    leaf: KeyPair
    directory: Path

    @property
    def vici_socket(self) -> Path:
        assert self.host.charon
        return self.host.charon.vici_socket

    @property
    def state_file(self) -> Path:
        return self.directory / "state" / "tunnels.json"

    @property
    def conflist(self) -> Path:
        return self.directory / "cni" / "10-fabmesh.conflist"

    def mesh(self, *, with_edge2: bool = True) -> NodeMesh:
        peers = [Peer(name="connector-1", role=Role.CONNECTOR, endpoint="198.51.100.250", subnets=MESH_CIDRS,
                      initiate=True)]
        if with_edge2:
            peers.append(Peer(name="edge-2", role=Role.EDGE, endpoint="198.51.100.251", subnets=EDGE2_SUBNETS))
        node = LocalNode(name="edge-1", role=Role.EDGE, address="192.0.2.1", endpoint=self.host.wan_ip,
                         pod_cidr=POD_CIDR)
        return NodeMesh(node=node, local_subnets=(POD_CIDR, "192.0.2.1/32"), mesh_cidrs=MESH_CIDRS,
                        peers=tuple(peers), caCert=self.ca.cert_pem,
                        tunnel=TunnelSettings(backend=Backend.LIBIPSEC))

    def mesh_file(self, name: str, mesh: NodeMesh) -> Path:
        path = self.directory / f"{name}.yaml"
        path.write_text(mesh.to_yaml())
        return path

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.host.run(*args, check=check)


class Agent:
    """One driver process in the edge's namespace: a running agent, stopped by its PID."""

    def __init__(self, edge: Edge, name: str) -> None:
        config = self._config(edge, name)
        self.stderr_path = edge.directory / f"{name}.stderr"
        with open(self.stderr_path, "w") as stderr:
            self.process = subprocess.Popen(
                ["ip", "netns", "exec", edge.host.netns, sys.executable, str(edge.directory / "driver.py"),
                 str(config)],
                cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
                start_new_session=True)

    @staticmethod
    def _config(edge: Edge, name: str) -> Path:
        driver = edge.directory / "driver.py"
        driver.write_text(DRIVER)
        path = edge.directory / f"{name}.json"
        path.write_text(json.dumps({
            "node": "edge-1", "vici_socket": str(edge.vici_socket), "state_dir": str(edge.state_file.parent),
            "cni_conf_path": str(edge.conflist), "cert_pem": edge.leaf.cert_pem, "key_pem": edge.leaf.key_pem,
            "ca_pem": edge.ca.cert_pem}))
        return path

    def apply(self, mesh_file: Path | str) -> dict[str, Any]:
        """Apply ``mesh_file``; the string ``teardown`` removes what the last apply programmed."""
        assert self.process.stdin and self.process.stdout
        self.process.stdin.write(f"{mesh_file}\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], REPLY_TIMEOUT_S)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            raise AssertionError(f"the agent gave no reply; its stderr:\n{self.stderr_path.read_text()[-4000:]}")
        return json.loads(line)

    def stop(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            stop_pid(self.process.pid)
        if self.process.stdout:
            self.process.stdout.close()


@pytest.fixture
def edge(wan: Network, tmp_path: Path) -> Edge:
    host = wan.add_host("edge-1")
    host.start_charon()
    ca = new_ca(now=NOW)
    leaf = issue_leaf(ca, name="edge-1", addresses=[host.wan_ip], now=NOW)
    directory = tmp_path / "agent"
    directory.mkdir()
    return Edge(host=host, ca=ca, leaf=leaf, directory=directory)


@pytest.fixture
def agents(edge: Edge) -> Iterator[list[Agent]]:
    """The agents a test starts (with ``_start``); each is stopped afterwards, by its PID if it lingers."""
    started: list[Agent] = []
    yield started
    for agent in started:
        agent.stop()


def _start(agents: list[Agent], edge: Edge, name: str) -> Agent:
    agent = Agent(edge, name)
    agents.append(agent)
    return agent


def _applied(reply: dict[str, Any]) -> dict[str, Any]:
    assert reply["errors"] == [], reply
    return reply


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in (Counter(after) - Counter(before)).items() if v}


def _assert_wrote_only(edge: Edge, before_state: dict[str, Any], before: dict[str, int], reply: dict[str, Any],
                       expected: dict[str, int], what: str) -> None:
    """The apply's writes (delta of the cumulative counters) are exactly ``expected``."""
    delta = _delta(before, reply["writes"])
    detail = f"{what} wrote {delta} (expected {expected}): {reply['changes']}"
    assert delta == expected, detail


def _tunnel_state(edge: Edge) -> dict[str, Any]:
    return json.loads(edge.state_file.read_text())


# -- independent observation, inside the namespace --------------------------------------------------------------


def _json(edge: Edge, *args: str) -> Any:
    return json.loads(edge.run(*args).stdout or "[]")


def _table_routes(edge: Edge) -> dict[str, str]:
    """dst (canonical CIDR) -> device, for every route in our table."""
    routes = _json(edge, "ip", "-j", "route", "show", "table", TABLE)
    return {str(ipaddress.ip_network(r["dst"])): r["dev"] for r in routes}


def _set_members(edge: Edge, name: str) -> set[str]:
    text = edge.run("ipset", "list", name).stdout
    members = text.split("Members:", 1)[1].split()
    return {str(ipaddress.ip_network(m)) for m in members}


def _iptables(edge: Edge) -> dict[str, dict[str, list[str]]]:
    """table -> chain -> rule specs, as iptables-save prints them."""
    tables: dict[str, dict[str, list[str]]] = {}
    chains: dict[str, list[str]] = {}
    for line in edge.run("iptables-save").stdout.splitlines():
        if line.startswith("*"):
            chains = tables.setdefault(line[1:], {})
        elif line.startswith(":"):
            chains.setdefault(line[1:].split()[0], [])
        elif line.startswith("-A "):
            chain, _, spec = line[3:].partition(" ")
            chains.setdefault(chain, []).append(spec)
    return tables


def _jumps(rules: list[str], target: str) -> int:
    return sum(1 for r in rules if re.search(rf"-j {re.escape(target)}(\s|$)", r))


def _ip_forward(edge: Edge) -> str:
    return edge.run("cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip()


def _conns(edge: Edge) -> set[str]:
    with Charon(edge.vici_socket) as charon:
        return set(charon.conns())


def _ike_sa_id(edge: Edge, name: str) -> str | None:
    with Charon(edge.vici_socket) as charon:
        sa = charon.sas().get(name)
    return sa.get("uniqueid") if sa else None


# -- tests -------------------------------------------------------------------------------------------------------


def test_edge_applied_from_empty_gets_bridge_rule_routes_ipset_chains_tunnels_cni_and_forwarding(
        edge: Edge, agents: list[Agent]) -> None:
    edge.run("sysctl", "-qw", "net.ipv4.ip_forward=0")  # the host fixture turns it on; prove the agent does
    reply = _applied(_start(agents, edge, "agent").apply(edge.mesh_file("mesh", edge.mesh())))
    assert reply["writes"]["sysctl"] == 1, reply

    # (a) the pod bridge, with its gateway and the tunnel MTU
    link = _json(edge, "ip", "-j", "-d", "link", "show", "dev", "fabmesh0")[0]
    assert link["linkinfo"]["info_kind"] == "bridge"
    assert link["mtu"] == 1400
    assert "UP" in link["flags"]
    addresses = {(a["local"], a["prefixlen"]) for a in
                 _json(edge, "ip", "-j", "-4", "addr", "show", "dev", "fabmesh0")[0]["addr_info"]}
    assert ("10.233.1.1", 24) in addresses

    # (b) one rule into our table before main, and the routes in it
    rules = [r for r in _json(edge, "ip", "-j", "-4", "rule", "show") if r.get("table") == TABLE]
    assert [r["priority"] for r in rules] == [100], rules
    assert _table_routes(edge) == {
        **dict.fromkeys((*MESH_CIDRS, *EDGE2_SUBNETS), "ipsec0"),
        POD_CIDR: "fabmesh0",
    }

    # (c) the mesh set: every mesh CIDR and every peer subnet (and the node's own local subnets)
    assert _set_members(edge, "FABMESH-MESH") >= {*MESH_CIDRS, *EDGE2_SUBNETS}

    # (d) our chains, each jumped to exactly once, mesh-to-mesh exempted from NAT before the MASQUERADE
    tables = _iptables(edge)
    forward = tables["filter"]["FABMESH-FORWARD"]
    assert [r.split()[-1] for r in forward] == ["ACCEPT", "DROP", "ACCEPT", "DROP"], forward
    assert all("ipsec0" in r for r in forward), forward  # every rule is about the tunnel, nothing else
    postrouting = tables["nat"]["FABMESH-POSTROUTING"]
    accept = next(i for i, r in enumerate(postrouting)
                  if "--match-set FABMESH-MESH src" in r and "--match-set FABMESH-MESH dst" in r and "-j ACCEPT" in r)
    masquerade = next(i for i, r in enumerate(postrouting)
                      if f"-s {POD_CIDR}" in r and "! --match-set FABMESH-MESH dst" in r and "-j MASQUERADE" in r)
    assert accept < masquerade, postrouting
    assert any("-j TCPMSS --set-mss 1360" in r for r in tables["mangle"]["FABMESH-MSS"]), tables["mangle"]
    assert _jumps(tables["filter"]["FORWARD"], "FABMESH-FORWARD") == 1
    assert _jumps(tables["filter"]["OUTPUT"], "FABMESH-OUTPUT") == 1
    assert _jumps(tables["nat"]["POSTROUTING"], "FABMESH-POSTROUTING") == 1
    assert _jumps(tables["mangle"]["FORWARD"], "FABMESH-MSS") == 1
    assert _jumps(tables["mangle"]["OUTPUT"], "FABMESH-MSS") == 1

    # (e) one charon connection per peer
    assert _conns(edge) == {"connector-1", "edge-2"}

    # (f) the CNI config for the pods, on the same bridge
    conflist = json.loads(edge.conflist.read_text())
    assert conflist["plugins"][0]["type"] == "bridge" and conflist["plugins"][0]["bridge"] == "fabmesh0"

    # (g) forwarding on, in the namespace
    assert _ip_forward(edge) == "1"


def _fabmesh_left(edge: Edge) -> dict[str, Any]:
    """What of the agent's is in the namespace; every value empty when nothing is."""
    rules = [r for r in _json(edge, "ip", "-j", "-4", "rule", "show") if r.get("table") == TABLE]
    tables = _iptables(edge)
    return {
        "rules": rules, "routes": _table_routes(edge),
        "chains": {t: [c for c in chains if c.startswith("FABMESH-")] for t, chains in tables.items()
                   if any(c.startswith("FABMESH-") for c in chains)},
        "jumps": [r for chains in tables.values() for rules in chains.values() for r in rules if "FABMESH-" in r],
        "ipsets": [n for n in edge.run("ipset", "list", "-n").stdout.split() if n.startswith("FABMESH-")],
        "bridge": [link["ifname"] for link in _json(edge, "ip", "-j", "link", "show") if link["ifname"] == "fabmesh0"],
        "conflist": edge.conflist.exists(), "conns": _conns(edge), "sas": _sas(edge),
        "anchors": [a["local"] for a in _json(edge, "ip", "-j", "-4", "addr", "show", "dev", "lo")[0]["addr_info"]
                    if a.get("label") == "lo:fm"],
    }


def _sas(edge: Edge) -> set[str]:
    with Charon(edge.vici_socket) as charon:
        return set(charon.sas())


def test_teardown_removes_everything_the_agent_programmed_and_a_second_one_writes_nothing(
        edge: Edge, agents: list[Agent]) -> None:
    """The uninstall path (fabmesh/node/teardown.py); stopping without it leaves everything (the restart test)."""
    agent = _start(agents, edge, "agent")
    _applied(agent.apply(edge.mesh_file("mesh", edge.mesh())))
    before = _fabmesh_left(edge)
    assert all(before[k] for k in ("rules", "routes", "chains", "jumps", "ipsets", "bridge", "conflist", "conns",
                                    "anchors")), before
    _applied(agent.apply("teardown"))
    assert not _fabmesh_left(edge)["anchors"]
    # The same address on lo, put there by someone else (a node holding its own address there): never ours.
    _applied(agent.apply(edge.mesh_file("mesh", edge.mesh())))
    edge.run("ip", "addr", "del", "192.0.2.1/32", "dev", "lo")
    edge.run("ip", "addr", "add", "192.0.2.1/32", "dev", "lo")

    torn = _applied(agent.apply("teardown"))
    print(f"\n[observed] teardown changes: {torn['changes']}")
    left = _fabmesh_left(edge)
    assert not any(left.values()), left
    assert _ip_forward(edge) == "1"  # not ours to turn off
    assert "192.0.2.1/32" in edge.run("ip", "-4", "addr", "show", "dev", "lo").stdout
    again = _applied(agent.apply("teardown"))
    assert again["changes"] == [] and _delta(torn["writes"], again["writes"]) == {}, again

    _applied(agent.apply(edge.mesh_file("mesh", edge.mesh())))  # the annotation gone: the mesh comes back
    assert _fabmesh_left(edge)["routes"] == before["routes"]


def test_resync_and_restarted_agent_write_nothing_to_an_unchanged_node(edge: Edge, agents: list[Agent]) -> None:
    mesh = edge.mesh_file("mesh", edge.mesh())
    agent = _start(agents, edge, "agent")
    first = _applied(agent.apply(mesh))
    assert sum(first["writes"].values()) > 0
    state = _tunnel_state(edge)

    second = _applied(agent.apply(mesh))
    _assert_wrote_only(edge, state, first["writes"], second, {}, "a resync of an unchanged node")
    assert second["changes"] == []
    agent.stop()

    restarted = _applied(_start(agents, edge, "restarted").apply(mesh))
    _assert_wrote_only(edge, state, {}, restarted, {}, "a restarted agent, on an unchanged node,")
    assert restarted["changes"] == []
    assert _tunnel_state(edge) == state


def test_each_change_is_logged_once_at_info_and_a_resync_logs_nothing(edge: Edge, agents: list[Agent]) -> None:
    mesh = edge.mesh_file("mesh", edge.mesh())
    agent = _start(agents, edge, "agent")
    first = _applied(agent.apply(mesh))
    logged = [line for line in agent.stderr_path.read_text().splitlines() if line.startswith("INFO:")]
    assert {"ipset", "iptables", "vici"} <= {k for k, v in first["writes"].items() if v}, first
    assert len(logged) == len(first["changes"]), "\n".join(logged)
    for change in first["changes"]:
        assert sum(line.endswith(change) for line in logged) == 1, (change, logged)

    mark = len(agent.stderr_path.read_text())
    _applied(agent.apply(mesh))
    assert "INFO:" not in agent.stderr_path.read_text()[mark:]


def test_removed_peer_loses_its_connection_and_routes_and_the_other_tunnel_is_not_reloaded(
        edge: Edge, agents: list[Agent]) -> None:
    agent = _start(agents, edge, "agent")
    _applied(agent.apply(edge.mesh_file("mesh", edge.mesh())))
    state = _tunnel_state(edge)
    connector_sa = _ike_sa_id(edge, "connector-1")  # initiating towards nobody: stays CONNECTING meanwhile
    assert connector_sa is not None

    reply = _applied(agent.apply(edge.mesh_file("without-edge-2", edge.mesh(with_edge2=False))))

    assert _conns(edge) == {"connector-1"}
    assert "action=unload-conn peer=edge-2" in reply["changes"]
    assert _table_routes(edge) == {**dict.fromkeys(MESH_CIDRS, "ipsec0"), POD_CIDR: "fabmesh0"}
    assert not set(EDGE2_SUBNETS) & _set_members(edge, "FABMESH-MESH")
    touched = [c for c in reply["changes"] if "peer=connector-1" in c or c == "action=load-credentials"]
    assert touched == [], reply["changes"]
    assert _tunnel_state(edge)["conns"] == {"connector-1": state["conns"]["connector-1"]}
    assert _ike_sa_id(edge, "connector-1") == connector_sa, "connector-1's IKE_SA was torn down and started again"


def test_route_deleted_and_chain_flushed_by_hand_are_restored_by_the_next_apply(
        edge: Edge, agents: list[Agent]) -> None:
    mesh = edge.mesh_file("mesh", edge.mesh())
    agent = _start(agents, edge, "agent")
    first = _applied(agent.apply(mesh))
    state, routes, chains = _tunnel_state(edge), _table_routes(edge), _iptables(edge)

    edge.run("ip", "route", "del", "10.244.0.0/16", "table", TABLE)
    edge.run("iptables", "-t", "nat", "-F", "FABMESH-POSTROUTING")
    assert "10.244.0.0/16" not in _table_routes(edge)
    assert _iptables(edge)["nat"]["FABMESH-POSTROUTING"] == []

    second = _applied(agent.apply(mesh))
    assert _table_routes(edge) == routes
    assert _iptables(edge) == chains
    _assert_wrote_only(edge, state, first["writes"], second, {"netlink": 1, "iptables": 1},
                       "repairing one route and one chain")
