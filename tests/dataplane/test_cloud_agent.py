"""The real ``fabmesh cloud-agent`` process in a cloud host's namespace, with two would-be connectors on the WAN.

It runs with CAP_NET_ADMIN and CAP_NET_RAW only (``setpriv``), as the chart's DaemonSet does, reads ``routes.yaml``
projected the way kubelet projects a ConfigMap (``..data`` swaps) and must: route
edge addresses via the active connector from the host's flannel-style address, keep flannel's
MASQUERADE off that traffic (proved by a packet: the connector drops anything from the cloud host's
own address), follow the operator to another connector, and leave nothing behind when stopped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fabmesh.lab.nodesim import project
from fabmesh.mesh.cloud import ActiveConnector, CloudRoutes, CloudRouteSettings
from fabmesh.testenv.hosts import Host, Network, stop_pid, wait_for

pytestmark = pytest.mark.dataplane

REPO = Path(__file__).resolve().parents[2]
TABLE = "2621"
EDGE_ADDRESS = "172.16.1.2"  # a NATed edge's InternalIP: behind the connector, reachable nowhere else
FLANNEL_ADDRESS = "10.244.1.0"  # what flanneld puts on flannel.1 (the node's pod subnet's network address)
FLANNEL_MASQUERADE = "-s 10.244.0.0/16 ! -d 224.0.0.0/4 -j MASQUERADE"  # as flanneld appends it


def routes_yaml(connector: Host) -> dict[str, str]:
    config = CloudRoutes(connector=ActiveConnector(name=connector.name, address=connector.wan_ip),
                         subnets=(f"{EDGE_ADDRESS}/32",), source_cidrs=("10.244.0.0/16",),
                         settings=CloudRouteSettings(resync_period_s=1))  # full passes every second
    return {"routes.yaml": config.to_yaml()}


def as_connector(host: Host) -> None:
    """Stand in for a connector's tunnel: the edge address on lo, and no cleartext from the cloud host's own
    address (the tunnels carry mesh sources only: what a SNATed packet would have)."""
    host.run("ip", "addr", "add", f"{EDGE_ADDRESS}/32", "dev", "lo")
    host.run("ip", "route", "add", f"{FLANNEL_ADDRESS}/32", "via", "198.51.100.10")


class Agent:
    def __init__(self, host: Host, config_dir: Path) -> None:
        self.host, self.config_dir = host, config_dir
        self.log = host.directory / "cloud-agent.log"
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                # With CAP_NET_ADMIN and CAP_NET_RAW alone, as the chart's DaemonSet runs it: root's other
                # capabilities are dropped from the bounding set before exec.
                ["ip", "netns", "exec", host.netns, "setpriv", "--bounding-set=-all,+net_admin,+net_raw",
                 "--inh-caps=-all", sys.executable, "-m", "fabmesh.cli", "cloud-agent",
                 "--config-dir", str(config_dir), "--node-name", host.name],
                cwd=REPO, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"})

    def routes(self) -> dict[str, tuple[str | None, str | None]]:
        done = self.host.run("ip", "-j", "route", "show", "table", TABLE, check=False)
        if done.returncode != 0:  # "FIB table does not exist": the kernel dropped it with its last route
            return {}
        return {r["dst"]: (r.get("gateway"), r.get("prefsrc")) for r in json.loads(done.stdout or "[]")}

    def rules(self) -> list[dict]:
        return [r for r in json.loads(self.host.run("ip", "-j", "rule", "show").stdout) if r.get("table") == TABLE]

    def nat(self) -> str:
        return self.host.run("iptables-save", "-t", "nat").stdout

    def ipsets(self) -> str:
        return self.host.run("ipset", "list", "-n").stdout

    def changes(self) -> list[str]:
        """The change lines the agent logged (one per write: routes, rule, chain, jump, set)."""
        return [line for line in self.log.read_text().splitlines() if " action=" in line or " table=" in line]


@pytest.fixture
def cloud(wan: Network) -> Iterator[tuple[Agent, Host, Host]]:
    host = wan.add_host("cloud", "198.51.100.10")
    conn_a, conn_b = wan.add_host("conn-a", "198.51.100.1"), wan.add_host("conn-b", "198.51.100.2")
    host.run("ip", "addr", "add", f"{FLANNEL_ADDRESS}/32", "dev", "lo")
    host.run("iptables", "-t", "nat", "-A", "POSTROUTING", *FLANNEL_MASQUERADE.split())
    for connector in (conn_a, conn_b):
        connector.run("iptables", "-A", "INPUT", "-s", host.wan_ip, "-j", "DROP")
    project(host.directory / "cloud", routes_yaml(conn_a))
    agent = Agent(host, host.directory / "cloud")
    try:
        yield agent, conn_a, conn_b
    finally:
        stop_pid(agent.process.pid)


def test_edge_addresses_follow_the_active_connector_without_snat_and_nothing_is_left_on_stop(
        cloud: tuple[Agent, Host, Host]) -> None:
    agent, conn_a, conn_b = cloud
    as_connector(conn_a)
    wait_for(lambda: agent.routes() == {EDGE_ADDRESS: (conn_a.wan_ip, FLANNEL_ADDRESS)}, timeout=30,
             what=f"a route to {EDGE_ADDRESS} via {conn_a.name}; log: {agent.log}")
    assert [r["priority"] for r in agent.rules()] == [101]
    assert "-A POSTROUTING -m comment --comment \"fabmesh cloud-agent\" -j FMCLOUD-POSTROUTING" in agent.nat()
    assert "FMCLOUD-EDGE" in agent.ipsets()
    # The packet leaves with the flannel address: flannel's MASQUERADE (after our ACCEPT) never saw it,
    # and conn-a drops anything from the host's own address.
    assert agent.host.run("ping", "-c", "1", "-W", "2", EDGE_ADDRESS, check=False).returncode == 0
    # Full passes over an unchanged node write nothing (resync_period_s is 1 s here).
    written = agent.changes()
    time.sleep(3)
    assert agent.changes() == written

    project(agent.config_dir, routes_yaml(conn_b))  # the operator names another connector
    wait_for(lambda: agent.routes() == {EDGE_ADDRESS: (conn_b.wan_ip, FLANNEL_ADDRESS)}, timeout=30,
             what=f"the route re-pointed to {conn_b.name}; log: {agent.log}")
    as_connector(conn_b)
    assert agent.host.run("ping", "-c", "1", "-W", "2", EDGE_ADDRESS, check=False).returncode == 0

    stop_pid(agent.process.pid)
    assert agent.process.wait(timeout=10) == 0, agent.log.read_text()
    assert agent.routes() == {} and agent.rules() == []
    assert "FMCLOUD" not in agent.nat() and "FMCLOUD" not in agent.ipsets()
    assert FLANNEL_MASQUERADE in agent.nat()  # what is not ours stays
    assert agent.host.run("ping", "-c", "1", "-W", "1", EDGE_ADDRESS, check=False).returncode != 0


def test_on_the_active_connector_the_agent_holds_nothing(cloud: tuple[Agent, Host, Host]) -> None:
    agent = cloud[0]
    wait_for(lambda: EDGE_ADDRESS in agent.routes(), timeout=30, what=f"the route; log: {agent.log}")
    # This node becomes the connector (the operator names it): everything the agent wrote goes.
    config = CloudRoutes(connector=ActiveConnector(name=agent.host.name, address=agent.host.wan_ip),
                         subnets=(f"{EDGE_ADDRESS}/32",), source_cidrs=("10.244.0.0/16",))
    project(agent.config_dir, {"routes.yaml": config.to_yaml()})
    wait_for(lambda: agent.routes() == {} and agent.rules() == [] and "FMCLOUD" not in agent.ipsets(),
             timeout=30, what=f"the agent idle on the connector; log: {agent.log}")
    assert "FMCLOUD" not in agent.nat()
    assert agent.process.poll() is None


def test_before_the_operator_writes_routes_yaml_the_agent_waits_logging_once(wan: Network) -> None:
    host = wan.add_host("cloud", "198.51.100.10")
    connector = wan.add_host("conn-a", "198.51.100.1")
    host.run("ip", "addr", "add", f"{FLANNEL_ADDRESS}/32", "dev", "lo")
    agent = Agent(host, host.directory / "cloud")  # the optional ConfigMap is not there yet
    try:
        wait_for(lambda: "config unusable" in agent.log.read_text(), timeout=30, what=f"the error; log: {agent.log}")
        time.sleep(5)  # two retries (every 2 s) happen here
        assert agent.log.read_text().count("config unusable") == 1, agent.log.read_text()
        assert agent.routes() == {} and agent.process.poll() is None
        project(agent.config_dir, routes_yaml(connector))
        wait_for(lambda: agent.routes() == {EDGE_ADDRESS: (connector.wan_ip, FLANNEL_ADDRESS)}, timeout=30,
                 what=f"the route once routes.yaml exists; log: {agent.log}")
    finally:
        stop_pid(agent.process.pid)
