"""Bring a whole hybrid cluster up in network namespaces: hosts, Nodes, the operator, node processes, pods.

Real parts only: etcd + kube-apiserver, the real operator process with the
chart's RBAC, one charon per tunnel host (userspace ESP by default, kernel ESP with
``backend=kernel``), the real agent and
connector processes inside their hosts' namespaces, pods added by the real CNI
plugins with the conflist the agent wrote, flannel-style VXLAN between cloud
hosts programmed from the Node annotations the operator writes
(:mod:`fabmesh.lab.nodesim`, which also projects ConfigMaps and Secrets like
kubelet). Everything started is recorded in :class:`LabState` as soon as it
runs, so a bring-up that fails half way is still removed by
:func:`fabmesh.lab.teardown.down`.
"""

from __future__ import annotations

import ipaddress
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from fabmesh.kube.client import Kube, load_api_client
from fabmesh.lab import probe
from fabmesh.lab.processes import spawn, start_charon, start_node_process
from fabmesh.lab.state import LabHost, LabNatRouter, LabPod, LabState
from fabmesh.lab.topology import LabRole, NatType, Topology
from fabmesh.mesh import names
from fabmesh.mesh.model import Backend
from fabmesh.mesh.names import FLANNEL_PREFIX
from fabmesh.testenv import cni
from fabmesh.testenv.cluster import install_operator_rbac, spawn_operator
from fabmesh.testenv.controlplane import ControlPlane
from fabmesh.testenv.hosts import Host, Network, unique_prefix, wait_for

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def _setup_cloud_host(host: Host, pod_cidr: str) -> str:
    """flannel.1 as flanneld's vxlan backend makes it; returns its VtepMAC."""
    net = ipaddress.ip_network(pod_cidr)
    host.run("ip", "link", "add", "flannel.1", "type", "vxlan", "id", "1", "local", host.wan_ip, "dev", "wan0",
             "dstport", "8472", "nolearning")
    host.run("ip", "addr", "add", f"{net.network_address}/32", "dev", "flannel.1")
    host.run("ip", "link", "set", "flannel.1", "mtu", "1450", "up")
    return json.loads(host.run("ip", "-j", "link", "show", "flannel.1").stdout)[0]["address"]


def cloud_conflist(path: Path, pod_cidr: str, ipam_dir: Path) -> None:
    """A cloud node's CNI config as flannel's would be: a bridge on the node's pod CIDR, no masquerade."""
    net = ipaddress.ip_network(pod_cidr)
    conf = {"cniVersion": "1.0.0", "name": "cbr0", "plugins": [
        {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False, "mtu": 1450,
         "ipam": {"type": "host-local", "dataDir": str(ipam_dir),
                  "ranges": [[{"subnet": str(net), "gateway": str(net.network_address + 1)}]],
                  "routes": [{"dst": "0.0.0.0/0"}]}},
        {"type": "loopback"}]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(conf, indent=2))


def _node_object(host: LabHost, topo_labels: dict[str, str], annotations: dict[str, str],
                 external_ip: str | None) -> dict[str, Any]:
    addresses = [{"type": "InternalIP", "address": host.node_ip}]
    if external_ip:
        addresses.append({"type": "ExternalIP", "address": external_ip})
    body: dict[str, Any] = {"metadata": {"name": host.name, "labels": topo_labels, "annotations": annotations},
                            "spec": {}, "status": {"addresses": addresses}}
    if host.role != "edge" and host.pod_cidr:
        body["spec"] = {"podCIDR": host.pod_cidr, "podCIDRs": [host.pod_cidr]}
    return body


def operator_settings(topology: Topology, namespace: str, backend: Backend = Backend.LIBIPSEC) -> dict[str, Any]:
    return {
        "namespace": namespace,
        "edge_pod_pool": topology.edge_pod_pool,
        "cloud_pod_cidrs": [topology.cloud_pod_cidr],
        "service_cidr": topology.service_cidr,
        "resync_period_s": 10,
        "tunnel": {"backend": backend.value},
        "leader_election": {"lease_duration_s": 4, "renew_deadline_s": 3, "retry_period_s": 1},
        # A lab is watched by a person: tunnel state in the API within seconds (docs/operator.md, Debugging).
        "node": {"status_poll_s": 2, "status_min_interval_s": 2},
        # The lab runs agents and the connector as processes (no kubelet), so the operator's Pods are off.
        "agent_pods": {"enabled": False},
        "connector_pods": {"enabled": False},
    }


def up(topology: Topology, directory: Path, progress: Progress = _quiet, timeout: float = 120,
       backend: Backend = Backend.LIBIPSEC) -> LabState:
    """Build the whole lab in ``directory`` and wait for every tunnel; raises on the first step that fails.

    ``backend`` is the operator's ``tunnel.backend`` and every charon's: libipsec (userspace ESP, works
    on any kernel with TUN) by default; ``kernel`` needs ESP in the kernel (the kernel test tier's VM).
    """
    directory.mkdir(parents=True, exist_ok=True)
    state = LabState(prefix=unique_prefix("fmlab"), directory=str(directory), backend=backend)
    state.save()
    progress("starting etcd and kube-apiserver")
    cp = _start_control_plane(state, directory / "controlplane", timeout)
    admin = Kube(load_api_client(str(cp.kubeconfig)))
    progress("creating hosts (network namespaces)")
    macs = _create_hosts(state, topology, directory / "hosts")
    progress("registering Nodes and installing the operator's RBAC")
    op_kubeconfig = install_operator_rbac(cp, admin, state.operator_namespace)
    _register_nodes(admin, state, macs)
    progress("starting the operator")
    settings_file = directory / "operator.yaml"
    settings_file.write_text(yaml.safe_dump(operator_settings(topology, state.operator_namespace, backend)))
    # Supervised: it exits on losing its Lease (an API server outage) and, as under a kubelet, comes back.
    state.pids["operator"] = spawn_operator(op_kubeconfig, settings_file, "lab-operator", directory / "logs",
                                            restart=True).pid
    state.save()
    progress("starting kubelet/flanneld stand-ins, charons, the connector and the agents")
    spawn(state, "nodesim", [sys.executable, "-m", "fabmesh.lab.nodesim", "--dir", str(directory)])
    spawn(state, "apiproxy", [sys.executable, "-m", "fabmesh.lab.apiproxy", "--dir", str(directory)])
    for h in state.hosts:
        if h.role != "cloud":
            start_charon(state, h.name)
            start_node_process(state, h.name)
    progress("adding pods with the CNI plugins")
    _add_pods(state, directory / "hosts", timeout)
    progress("waiting for every tunnel")
    probe.wait_tunnels(state, timeout)
    return state


def _start_control_plane(state: LabState, directory: Path, timeout: float) -> ControlPlane:
    cp = ControlPlane(directory=directory, ready_timeout=max(90.0, timeout))
    try:
        cp.start()
    finally:  # etcd may run even if kube-apiserver never came up: record what did start
        state.pids.update({f"controlplane-{i}": pid for i, pid in enumerate(cp.pids)})
        state.save()
    state.kubeconfig = str(cp.kubeconfig)
    state.save()
    return cp


def _create_hosts(state: LabState, topology: Topology, directory: Path) -> dict[str, str]:
    """One namespace per node, on the WAN bridge or behind its NAT router; returns each cloud
    host's flannel VtepMAC.

    An edge behind a NAT has its LAN address as InternalIP and no ExternalIP: it does not know
    the address the WAN sees (the router's), and nobody can dial it there anyway. An edge on the
    WAN keeps an InternalIP on ``lo`` and its WAN address as ExternalIP.
    """
    net = Network(prefix=state.prefix, directory=directory, wan_cidr=topology.wan_cidr).create()
    state.wan_cidr = topology.wan_cidr
    for i, nat in enumerate(topology.nats):
        router = net.add_nat_router(nat.name, topology.nat_wan_ip(i), topology.lan_cidr(i),
                                    symmetric=nat.type is NatType.SYMMETRIC)
        state.nats.append(LabNatRouter(name=nat.name, netns=router.netns, wan_ip=router.wan_ip,
                                       lan_cidr=router.lan_cidr, type=nat.type.value))
    state.save()
    lan_hosts = {nat.name: ipaddress.ip_network(topology.lan_cidr(i)).hosts() for i, nat in enumerate(topology.nats)}
    for hosts in lan_hosts.values():
        next(hosts)  # the router's own address
    macs: dict[str, str] = {}
    cloud_index = edge_index = 0
    for i, node in enumerate(topology.nodes):
        if node.nat is not None:
            host = net.add_host_behind_router(node.name, net.nats[node.nat], str(next(lan_hosts[node.nat])))
        else:
            host = net.add_host(node.name, topology.wan_ip(i))
        if node.role is LabRole.EDGE:
            if node.nat is None:
                node_ip = topology.edge_ip(edge_index)
                host.run("ip", "addr", "add", f"{node_ip}/32", "dev", "lo")
            else:
                node_ip = host.wan_ip
            edge_index += 1
            state.hosts.append(LabHost(name=node.name, role="edge", netns=host.netns, wan_ip=host.wan_ip,
                                       node_ip=node_ip, communities=list(node.communities), nat=node.nat))
        else:
            pod_cidr = topology.cloud_pod_subnet(cloud_index)
            cloud_index += 1
            macs[node.name] = _setup_cloud_host(host, pod_cidr)
            state.hosts.append(LabHost(name=node.name, role=node.role.value, netns=host.netns, wan_ip=host.wan_ip,
                                       node_ip=host.wan_ip, pod_cidr=pod_cidr))
    state.save()
    return macs


def _register_nodes(admin: Kube, state: LabState, macs: dict[str, str]) -> None:
    """A Node per host with the labels an admin would set and the annotations flanneld would write."""
    for h in state.hosts:
        labels: dict[str, str] = {}
        annotations: dict[str, str] = {}
        if h.role == "edge":
            labels[names.EDGE_LABEL] = ""
            labels.update({f"{names.COMMUNITY_LABEL_PREFIX}{c}": "" for c in h.communities})
        else:
            if h.role == "connector":
                labels[names.CONNECTOR_LABEL] = ""
            annotations = {FLANNEL_PREFIX + "backend-type": "vxlan", FLANNEL_PREFIX + "public-ip": h.wan_ip,
                           FLANNEL_PREFIX + "backend-data": json.dumps({"VNI": 1, "VtepMAC": macs[h.name]})}
        external = h.wan_ip if h.role == "edge" and h.nat is None else None
        admin.create("nodes", _node_object(h, labels, annotations, external))


def _add_pods(state: LabState, hosts_dir: Path, timeout: float) -> None:
    """One pod per host, through the CNI config its network plugin wrote (the agent's, on edges)."""
    for h in state.hosts:
        base = hosts_dir / h.name
        if h.role == "edge":
            conflist = base / "cni" / "10-fabmesh.conflist"
            wait_for(conflist.exists, timeout=timeout, interval=0.2, what=f"the agent's CNI config on {h.name}")
        else:
            conflist = base / "cni" / "10-flannel.conflist"
            cloud_conflist(conflist, h.pod_cidr or "", base / "ipam")
        pod = cni.add_pod(conflist, h.netns, "pod")
        state.pods.append(LabPod(name=f"pod-{h.name}", node=h.name, ip=pod.ip, netns=pod.netns))
        if h.role == "edge":
            h.pod_cidr = str(ipaddress.ip_network(f"{pod.ip}/24", strict=False))
        state.save()
