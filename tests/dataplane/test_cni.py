"""The agent's conflist, run through the real reference plugins by the test CNI runtime."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest

from fabmesh.mesh.model import LocalNode, NodeMesh, Role
from fabmesh.node.cni import render_conflist
from fabmesh.testenv.cni import CniError, CniPod, add_pod, del_pod
from fabmesh.testenv.hosts import Host, Network, owned_namespaces

pytestmark = pytest.mark.dataplane

POD_CIDR = "10.233.5.0/24"
GATEWAY = "10.233.5.1"


@pytest.fixture
def mesh() -> NodeMesh:
    node = LocalNode(name="edge-1", role=Role.EDGE, address="192.0.2.10", endpoint="198.51.100.1",
                     pod_cidr=POD_CIDR)
    return NodeMesh(node=node, local_subnets=(POD_CIDR,), mesh_cidrs=("10.233.0.0/16",), caCert="x")


@pytest.fixture
def ipam_dir(tmp_path: Path) -> Path:
    return tmp_path / "ipam"


@pytest.fixture
def conflist(mesh: NodeMesh, ipam_dir: Path, tmp_path: Path) -> Path:
    path = tmp_path / mesh.settings.cni_conf_name
    path.write_text(render_conflist(mesh, ipam_data_dir=str(ipam_dir)))
    return path


@pytest.fixture
def host(wan: Network) -> Host:
    return wan.add_host("h1")


def _precreate_bridge(host: Host, bridge: str) -> None:
    """What the agent does before any pod starts."""
    host.run("ip", "link", "add", bridge, "type", "bridge")
    host.run("ip", "link", "set", bridge, "up")
    host.run("ip", "addr", "add", f"{GATEWAY}/24", "dev", bridge)


def _link(pod: CniPod, ifname: str) -> dict:
    return json.loads(pod.run("ip", "-j", "link", "show", "dev", ifname).stdout)[0]


def _default_route(pod: CniPod) -> dict:
    routes = json.loads(pod.run("ip", "-j", "route", "show", "default").stdout)
    assert len(routes) == 1, routes
    return routes[0]


def _allocated_ips(ipam_dir: Path, network: str = "fabmesh") -> set[str]:
    """host-local keeps one file per allocated address, named after it."""
    store = ipam_dir / network
    if not store.exists():
        return set()
    return {p.name for p in store.iterdir() if _is_ip(p.name)}


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _bridge_ports(host: Host, bridge: str) -> list[str]:
    links = json.loads(host.run("ip", "-j", "link", "show", "master", bridge).stdout or "[]")
    return [link["ifname"] for link in links]


@pytest.mark.parametrize("agent_made_bridge", [True, False],
                         ids=["bridge-precreated-by-agent", "bridge-made-by-plugin"])
def test_two_pods_get_mesh_addresses_tunnel_mtu_default_route_and_reach_each_other_and_gateway(
        mesh: NodeMesh, conflist: Path, ipam_dir: Path, host: Host, agent_made_bridge: bool) -> None:
    bridge = mesh.settings.bridge
    if agent_made_bridge:
        _precreate_bridge(host, bridge)

    pods = [add_pod(conflist, host.netns, name) for name in ("a", "b")]

    assert len({pod.ip for pod in pods}) == 2
    for pod in pods:
        assert ipaddress.ip_address(pod.ip) in ipaddress.ip_network(POD_CIDR)
        assert _link(pod, "eth0")["mtu"] == mesh.tunnel.mtu == 1400
        route = _default_route(pod)
        assert (route["gateway"], route["dev"]) == (GATEWAY, "eth0")
        assert "UP" in _link(pod, "lo")["flags"]  # the loopback plugin ran
        assert pod.ping(GATEWAY)
    assert pods[0].ping(pods[1].ip) and pods[1].ping(pods[0].ip)
    assert _allocated_ips(ipam_dir) == {pod.ip for pod in pods}
    assert len(_bridge_ports(host, bridge)) == 2

    for pod in pods:
        del_pod(pod)

    assert not {pod.netns for pod in pods} & set(owned_namespaces(host.netns))
    assert _allocated_ips(ipam_dir) == set()
    assert _bridge_ports(host, bridge) == []


def test_deleting_a_pod_twice_is_harmless(conflist: Path, ipam_dir: Path, host: Host) -> None:
    pod = add_pod(conflist, host.netns, "a")

    del_pod(pod)
    del_pod(pod)  # CNI DEL must be idempotent; the netns is already gone the second time

    assert pod.netns not in owned_namespaces(host.netns)
    assert _allocated_ips(ipam_dir) == set()


def test_unknown_plugin_raises_cni_error_naming_it_and_rolls_back_the_plugins_before_it(
        conflist: Path, ipam_dir: Path, host: Host, mesh: NodeMesh) -> None:
    conf = json.loads(conflist.read_text())
    conf["plugins"].insert(1, {"type": "does-not-exist"})
    conflist.write_text(json.dumps(conf))

    with pytest.raises(CniError, match="does-not-exist") as raised:
        add_pod(conflist, host.netns, "a")

    assert raised.value.plugin == "does-not-exist"
    assert owned_namespaces(host.netns) == [host.netns]
    assert _allocated_ips(ipam_dir) == set()  # the bridge plugin's ADD was undone by its DEL
    assert _bridge_ports(host, mesh.settings.bridge) == []


def test_plugin_error_object_is_reported_with_code_and_msg_and_earlier_pods_keep_working(
        conflist: Path, ipam_dir: Path, host: Host) -> None:
    conf = json.loads(conflist.read_text())
    # A /30 with the gateway on .1 leaves host-local exactly one address (.2) to give out.
    conf["plugins"][0]["ipam"]["ranges"] = [[{"subnet": "10.233.5.0/30", "gateway": GATEWAY}]]
    conflist.write_text(json.dumps(conf))
    first = add_pod(conflist, host.netns, "a")

    with pytest.raises(CniError) as raised:
        add_pod(conflist, host.netns, "b")

    error = raised.value
    assert error.plugin == "bridge"
    assert error.code is not None and "no IP addresses available" in error.msg
    assert f"{host.netns}-b" not in owned_namespaces(host.netns)
    assert _allocated_ips(ipam_dir) == {first.ip}
    assert first.ping(GATEWAY)
    del_pod(first)


def test_conflist_without_plugins_is_rejected_before_any_namespace_is_made(tmp_path: Path, host: Host) -> None:
    empty = tmp_path / "empty.conflist"
    empty.write_text(json.dumps({"cniVersion": "1.0.0", "name": "fabmesh", "plugins": []}))

    with pytest.raises(ValueError, match="plugins"):
        add_pod(empty, host.netns, "a")

    assert owned_namespaces(host.netns) == [host.netns]
