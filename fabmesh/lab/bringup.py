"""Bring a whole hybrid cluster up in network namespaces: hosts, Nodes, the operator, node processes, pods.

Real parts only: etcd + kube-apiserver, the real operator process with the
chart's RBAC, one charon per tunnel host (userspace ESP by default, kernel ESP with
``backend=kernel``), the real agent and
connector processes inside their hosts' namespaces, the route agent (``fabmesh cloud-agent``) on
every other cloud host, pods added by the real CNI plugins with the conflist the agent wrote, and
real flanneld (v0.28, kube subnet manager, vxlan) on every cloud host, which routes edge pod CIDRs
to the connector from the Node annotations the operator writes. flanneld reaches the API server
through a :class:`~fabmesh.testenv.kubenode.NodeLink` (a relay when the API server stays on the
box's loopback; its own address with ``api_host``). ConfigMaps and Secrets are projected like
kubelet does by :mod:`fabmesh.lab.nodesim`. Everything started is recorded in :class:`LabState`
as soon as it runs, so a bring-up that fails half way is still removed by
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
from fabmesh.testenv.assets import ensure_flanneld
from fabmesh.testenv.cluster import install_operator_rbac, spawn_operator
from fabmesh.testenv.controlplane import ControlPlane
from fabmesh.testenv.flannel import Flanneld
from fabmesh.testenv.hosts import Host, Network, unique_prefix, wait_for
from fabmesh.testenv.kubenode import NodeLink

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


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
       backend: Backend = Backend.LIBIPSEC, api_host: str | None = None) -> LabState:
    """Build the whole lab in ``directory`` (:func:`up_with_control_plane`); returns its state."""
    return up_with_control_plane(topology, directory, progress, timeout, backend, api_host)[0]


def up_with_control_plane(topology: Topology, directory: Path, progress: Progress = _quiet, timeout: float = 120,
                          backend: Backend = Backend.LIBIPSEC,
                          api_host: str | None = None) -> tuple[LabState, ControlPlane]:
    """Build the whole lab in ``directory`` and wait for every tunnel; raises on the first step that fails.

    ``backend`` is the operator's ``tunnel.backend`` and every charon's: libipsec (userspace ESP, works
    on any kernel with TUN) by default; ``kernel`` needs ESP in the kernel (the kernel test tier's VM).
    ``api_host`` names a cloud host to run etcd and kube-apiserver in (its namespace): the API server
    then reaches edge kubelets the way a real one does, through that host's routes (the route agent,
    the connector, the tunnels); the root namespace reaches it over a loopback relay. None: on the
    box's loopback, as before. The control plane handle is returned too, for what needs its CA (a real
    kubelet's certificates, :class:`fabmesh.testenv.kubenode.KubeNode`); teardown needs only the state.
    """
    directory.mkdir(parents=True, exist_ok=True)
    state = LabState(prefix=unique_prefix("fmlab"), directory=str(directory), backend=backend)
    state.save()
    if api_host is None:
        progress("starting etcd and kube-apiserver")
        cp = _start_control_plane(state, directory / "controlplane", timeout)
    progress("creating hosts (network namespaces)")
    net = _create_hosts(state, topology, directory / "hosts")
    if api_host is not None:
        host = state.host(api_host)
        if host.role != "cloud":
            raise ValueError(f"api_host {api_host}: must be a cloud host that is not the connector, not a {host.role}")
        progress(f"starting etcd and kube-apiserver in {api_host}")
        cp = _start_control_plane(state, directory / "controlplane", timeout, host)
    admin = Kube(load_api_client(str(cp.kubeconfig)))
    progress("registering Nodes and installing the operator's RBAC")
    op_kubeconfig = install_operator_rbac(cp, admin, state.operator_namespace)
    _register_nodes(admin, state)
    progress("starting flanneld on the cloud hosts")
    _start_flannel(state, cp, admin, net, topology.cloud_pod_cidr, directory, timeout)
    progress("starting the operator")
    settings_file = directory / "operator.yaml"
    settings_file.write_text(yaml.safe_dump(operator_settings(topology, state.operator_namespace, backend)))
    # Supervised: it exits on losing its Lease (an API server outage) and, as under a kubelet, comes back.
    state.pids["operator"] = spawn_operator(op_kubeconfig, settings_file, "lab-operator", directory / "logs",
                                            restart=True).pid
    state.save()
    progress("starting the kubelet stand-in, charons, the connector, the agents and the route agents")
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
    return state, cp


def _start_control_plane(state: LabState, directory: Path, timeout: float,
                         host: LabHost | None = None, service_accounts: bool = False) -> ControlPlane:
    cp = ControlPlane(directory=directory, ready_timeout=max(90.0, timeout),
                      netns=host.netns if host else None, host_address=host.wan_ip if host else None,
                      service_accounts=service_accounts)
    try:
        cp.start()
    finally:  # etcd may run even if kube-apiserver never came up: record what did start
        state.pids.update({f"controlplane-{i}": pid for i, pid in enumerate(cp.pids)})
        state.save()
    state.kubeconfig = str(cp.kubeconfig)
    if host is not None:
        state.api_host, state.api_lab_url = host.name, cp.lab_url
    state.save()
    return cp


def _create_hosts(state: LabState, topology: Topology, directory: Path) -> Network:
    """One namespace per node, on the WAN bridge or behind its NAT router; returns the network.

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
            state.hosts.append(LabHost(name=node.name, role=node.role.value, netns=host.netns, wan_ip=host.wan_ip,
                                       node_ip=host.wan_ip, pod_cidr=pod_cidr))
    state.save()
    return net


def _register_nodes(admin: Kube, state: LabState) -> None:
    """A Node per host with the labels an admin would set (flanneld annotates the cloud ones itself)."""
    for h in state.hosts:
        labels: dict[str, str] = {}
        if h.role == "edge":
            labels[names.EDGE_LABEL] = ""
            labels.update({f"{names.COMMUNITY_LABEL_PREFIX}{c}": "" for c in h.communities})
        elif h.role == "connector":
            labels[names.CONNECTOR_LABEL] = ""
        external = h.wan_ip if h.role == "edge" and h.nat is None else None
        # What kubelet writes at registration. Not cosmetic: flanneld v0.28.10 panics ("assignment to
        # entry in nil map", kube.go AcquireLease) on a Node with no annotations at all.
        annotations = {"volumes.kubernetes.io/controller-managed-attach-detach": "true"}
        admin.create("nodes", _node_object(h, labels, annotations, external))


def _start_flannel(state: LabState, cp: ControlPlane, admin: Kube, net: Network, network: str, directory: Path,
                   timeout: float) -> None:
    """The API relay into the WAN, then real flanneld on every cloud host (never on an edge, as in FabEdge);
    returns once every cloud Node carries the annotations flanneld writes (the operator copies the connector's)."""
    binary = ensure_flanneld()
    if cp.lab_url:  # the API server runs on a lab host: flanneld dials its own address, no relay
        link = NodeLink.inside(cp, directory / "link")
    else:
        link = NodeLink(network=net, directory=directory / "link")
        try:
            link.start(cp)
        finally:  # record whatever relay started, so teardown stops it by PID
            state.pids.update({f"api-relay-{i}": relay.pid for i, relay in enumerate(link.relays)})
            state.save()
    for h in state.hosts:
        if h.role == "edge":
            continue
        host = Host(name=h.name, netns=h.netns, wan_ip=h.wan_ip, directory=directory / "hosts" / h.name)
        daemon = Flanneld(host=host, name=h.name, binary=binary, directory=host.directory / "flannel")
        try:
            daemon.start(cp, link, admin, network)
        finally:
            if daemon.proc is not None:
                state.pids[f"flanneld-{h.name}"] = daemon.proc.pid
                state.save()
    for h in state.hosts:
        if h.role != "edge":
            wait_for(lambda n=h.name: FLANNEL_PREFIX + "backend-data" in (
                (admin.get("nodes", n) or {}).get("metadata", {}).get("annotations") or {}),
                timeout=timeout, interval=0.2, what=f"flanneld annotating Node {h.name} "
                f"(see {directory / 'hosts' / h.name / 'flannel' / 'flanneld.log'})")


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
