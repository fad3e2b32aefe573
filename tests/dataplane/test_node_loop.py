"""The real ``fabmesh agent`` / ``fabmesh connector`` processes in namespaces, each with its real charon.

What only the whole loop shows: its metrics endpoint (where it binds, what happens when it cannot, what a
removed peer leaves behind) and a connector behind a cloud's 1:1 NAT answering an edge that dials its
ExternalIP. Each process is started with ``ip netns exec`` from the repository, reads its config and TLS
files like a Pod reads its mounted ConfigMap and Secret, and is stopped by PID.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fabmesh.mesh.model import Backend, LocalNode, NodeMesh, Peer, Role, TunnelSettings
from fabmesh.mesh.ports import DEFAULT_METRICS_PORT
from fabmesh.pki.authority import KeyPair, issue_leaf, new_ca
from fabmesh.strongswan.driver import Charon
from fabmesh.testenv.hosts import Host, Network, stop_pid, wait_for

pytestmark = pytest.mark.dataplane

NOW = datetime.datetime.now(datetime.UTC)
REPO = Path(__file__).resolve().parents[2]
TABLE = "2620"
MESH_CIDRS = ("10.233.0.0/16", "10.244.0.0/16", "10.96.0.0/12")
EDGE_ADDRESS = "192.0.2.1"  # the edge's InternalIP, on lo as in the lab
POD_CIDR = "10.233.1.0/24"
EDGE_SUBNETS = (POD_CIDR, f"{EDGE_ADDRESS}/32")
CONNECTOR_EXTERNAL_IP = "198.51.100.200"
LIBIPSEC = TunnelSettings(backend=Backend.LIBIPSEC)


@dataclass
class Node:
    """One node's files, its charon and (once started) its loop process."""

    host: Host
    ca: KeyPair
    leaf: KeyPair
    process: subprocess.Popen[bytes] | None = None

    @property
    def config_dir(self) -> Path:
        return self.host.directory / "mesh"

    @property
    def log(self) -> Path:
        return self.host.directory / "loop.log"

    @property
    def vici_socket(self) -> Path:
        assert self.host.charon
        return self.host.charon.vici_socket

    def write_mesh(self, mesh: NodeMesh) -> None:
        """Swap mesh.yaml in one rename, as kubelet swaps ``..data``."""
        self.config_dir.mkdir(exist_ok=True)
        tmp = self.config_dir / ".mesh.yaml.tmp"
        tmp.write_text(mesh.to_yaml())
        os.replace(tmp, self.config_dir / "mesh.yaml")

    def start(self, command: str, *flags: str) -> None:
        tls = self.host.directory / "tls"
        tls.mkdir(exist_ok=True)
        for name, text in (("tls.crt", self.leaf.cert_pem), ("tls.key", self.leaf.key_pem),
                           ("ca.crt", self.ca.cert_pem)):
            (tls / name).write_text(text)
        extra = ["--cni-conf-dir", str(self.host.directory / "cni")] if command == "agent" else []
        argv = [sys.executable, "-m", "fabmesh.cli", command, "--config-dir", str(self.config_dir),
                "--tls-dir", str(tls), "--vici-socket", str(self.vici_socket),
                "--state-dir", str(self.host.directory / "state"), *extra, *flags]
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                ["ip", "netns", "exec", self.host.netns, *argv], cwd=REPO, stdin=subprocess.DEVNULL,
                stdout=out, stderr=out, start_new_session=True,
                env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"})

    def stop(self) -> None:
        if self.process is not None:
            stop_pid(self.process.pid)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def conns(self) -> dict[str, dict]:
        with Charon(self.vici_socket) as charon:
            return charon.conns()

    def sas(self) -> dict[str, dict]:
        with Charon(self.vici_socket) as charon:
            return charon.sas()

    def routes(self) -> set[str]:
        """The routes in our table; none while the agent has not created the table yet."""
        proc = self.host.run("ip", "-j", "route", "show", "table", TABLE, check=False)
        if proc.returncode != 0 and "does not exist" in proc.stderr:
            return set()
        if proc.returncode != 0:
            raise AssertionError(f"ip route show table {TABLE}: {proc.stderr.strip()}")
        return {r["dst"] for r in json.loads(proc.stdout or "[]")}

    def scrape(self, address: str, port: int) -> str | None:
        """GET /metrics from inside the namespace; None when nothing answers."""
        code = ("import sys, urllib.request\n"
                "try:\n"
                f"    print(urllib.request.urlopen('http://{address}:{port}/metrics', timeout=2).read().decode())\n"
                "except OSError:\n"
                "    sys.exit(3)\n")
        done = self.host.run(sys.executable, "-c", code, check=False)
        return done.stdout if done.returncode == 0 else None


def _node(wan: Network, host: Host, ca: KeyPair, addresses: list[str]) -> Node:
    host.start_charon(Backend.LIBIPSEC)
    return Node(host=host, ca=ca, leaf=issue_leaf(ca, name=host.name, addresses=addresses, now=NOW))


def _edge_mesh(edge: Node, peers: list[Peer]) -> NodeMesh:
    node = LocalNode(name=edge.host.name, role=Role.EDGE, address=EDGE_ADDRESS, endpoint=edge.host.wan_ip,
                     pod_cidr=POD_CIDR)
    return NodeMesh(node=node, local_subnets=EDGE_SUBNETS, mesh_cidrs=MESH_CIDRS, peers=tuple(peers),
                    caCert=edge.ca.cert_pem, tunnel=LIBIPSEC)


def _lonely_peers(*, with_edge2: bool) -> list[Peer]:
    """Peers that never answer (nobody has these addresses): the loop still programs everything for them."""
    peers = [Peer(name="connector-1", role=Role.CONNECTOR, endpoint="198.51.100.250", subnets=MESH_CIDRS,
                  initiate=True)]
    if with_edge2:
        peers.append(Peer(name="edge-2", role=Role.EDGE, endpoint="198.51.100.251",
                          subnets=("10.233.2.0/24", "192.0.2.2/32")))
    return peers


@pytest.fixture
def nodes() -> Iterator[list[Node]]:
    started: list[Node] = []
    yield started
    for node in started:
        node.stop()


@pytest.fixture
def edge(wan: Network, nodes: list[Node]) -> Node:
    host = wan.add_host("edge-1")
    host.run("ip", "addr", "add", f"{EDGE_ADDRESS}/32", "dev", "lo")
    node = _node(wan, host, new_ca(now=NOW), [host.wan_ip, EDGE_ADDRESS])
    nodes.append(node)
    return node


def _occupy(host: Host, address: str, port: int) -> subprocess.Popen[str]:
    """A listener on address:port inside the namespace (what node-exporter does to 9100)."""
    code = ("import socket, sys\n"
            f"s = socket.socket(); s.bind(({address!r}, {port})); s.listen()\n"
            "print('listening', flush=True); sys.stdin.read()\n")
    proc = subprocess.Popen(["ip", "netns", "exec", host.netns, sys.executable, "-c", code],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout and proc.stdout.readline().strip() == "listening"
    return proc


def _tunnel_up(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {s.labels["peer"]: s.value for f in text_string_to_metric_families(text)
            if f.name == "fabmesh_tunnel_up" for s in f.samples}


def test_taken_metrics_port_is_logged_once_and_the_agent_still_programs_tunnels_and_routes(edge: Node) -> None:
    squatter = _occupy(edge.host, EDGE_ADDRESS, DEFAULT_METRICS_PORT)
    try:
        edge.write_mesh(_edge_mesh(edge, _lonely_peers(with_edge2=True)))
        edge.start("agent")  # the default port, on the node's own address: the one the squatter holds

        wait_for(lambda: set(edge.conns()) == {"connector-1", "edge-2"}, timeout=30, what="the agent's connections")
        wait_for(lambda: set(MESH_CIDRS) <= edge.routes(), timeout=30, what="the agent's routes")
        # A second pass after the first: the loop kept going, and did not try (and log) again.
        edge.write_mesh(_edge_mesh(edge, _lonely_peers(with_edge2=False)))
        wait_for(lambda: set(edge.conns()) == {"connector-1"}, timeout=30, what="the next pass")
        assert edge.running(), edge.log.read_text()[-3000:]
        errors = [line for line in edge.log.read_text().splitlines() if "metrics server not started" in line]
        assert len(errors) == 1, edge.log.read_text()[-3000:]
        assert (f"address={EDGE_ADDRESS} port={DEFAULT_METRICS_PORT} errno={errno.errorcode[errno.EADDRINUSE]}"
                in errors[0])
    finally:
        assert squatter.stdin
        squatter.stdin.close()
        stop_pid(squatter.pid)


def test_metrics_bind_the_node_address_and_a_removed_peer_disappears_from_them(edge: Node) -> None:
    edge.write_mesh(_edge_mesh(edge, _lonely_peers(with_edge2=True)))
    edge.start("agent")

    text = wait_for(lambda: (t := edge.scrape(EDGE_ADDRESS, DEFAULT_METRICS_PORT)) and "edge-2" in t and t,
                    timeout=30, what="edge-2 in the agent's /metrics")
    assert set(_tunnel_up(text)) == {"connector-1", "edge-2"}
    assert edge.scrape(edge.host.wan_ip, DEFAULT_METRICS_PORT) is None, "metrics must not be on the WAN address"

    edge.write_mesh(_edge_mesh(edge, _lonely_peers(with_edge2=False)))
    wait_for(lambda: set(edge.conns()) == {"connector-1"}, timeout=30, what="edge-2's connection unloaded")
    wait_for(lambda: (t := edge.scrape(EDGE_ADDRESS, DEFAULT_METRICS_PORT)) and "connector-1" in t
             and 'fabmesh_reconcile_total{result="ok"} 2.0' in t, timeout=30, what="a pass after the removal")
    text = edge.scrape(EDGE_ADDRESS, DEFAULT_METRICS_PORT) or ""
    assert 'peer="edge-2"' not in text, [line for line in text.splitlines() if "edge-2" in line]
    assert set(_tunnel_up(text)) == {"connector-1"}


def test_connector_behind_a_1to1_nat_accepts_the_edge_that_dials_its_external_ip(
        wan: Network, edge: Node, nodes: list[Node]) -> None:
    ca = edge.ca
    connector = _node(wan, wan.add_host_behind_nat("connector-1", CONNECTOR_EXTERNAL_IP), ca,
                      [CONNECTOR_EXTERNAL_IP])
    nodes.append(connector)
    own = connector.host.wan_ip
    assert CONNECTOR_EXTERNAL_IP not in connector.host.run("ip", "-o", "addr").stdout
    connector.write_mesh(NodeMesh(
        node=LocalNode(name="connector-1", role=Role.CONNECTOR, address=own, endpoint=CONNECTOR_EXTERNAL_IP),
        local_subnets=MESH_CIDRS, mesh_cidrs=MESH_CIDRS,
        peers=(Peer(name="edge-1", role=Role.EDGE, subnets=EDGE_SUBNETS),), caCert=ca.cert_pem, tunnel=LIBIPSEC))
    edge.write_mesh(_edge_mesh(edge, [Peer(name="connector-1", role=Role.CONNECTOR, endpoint=CONNECTOR_EXTERNAL_IP,
                                           subnets=MESH_CIDRS, initiate=True)]))
    connector.start("connector", "--metrics-port", "0")
    edge.start("agent", "--metrics-port", "0")

    # The connector's connection may bind only to an address it has.
    wait_for(lambda: "edge-1" in connector.conns(), timeout=30, what="the connector's connection for edge-1")
    local_addrs = connector.conns()["edge-1"]["local_addrs"]
    assert all(a == "%any" or a in connector.host.run("ip", "-o", "addr").stdout for a in local_addrs), local_addrs

    def established() -> dict | None:
        sa = edge.sas().get("connector-1", {})
        return sa if sa.get("state") == "ESTABLISHED" and sa.get("child-sas") else None

    try:
        sa = wait_for(established, timeout=45, interval=0.5, what="the edge's tunnel to the NATed connector")
    except TimeoutError:
        raise AssertionError("no tunnel; connector charon log:\n"
                             + connector.host.charon.log_file.read_text()[-3000:]) from None  # type: ignore[union-attr]
    assert sa["remote-host"] == CONNECTOR_EXTERNAL_IP
    seen_by_connector = connector.sas()["edge-1"]
    assert seen_by_connector["state"] == "ESTABLISHED"
    assert seen_by_connector["local-host"] == own  # the NAT rewrote the destination to the VM's own address
