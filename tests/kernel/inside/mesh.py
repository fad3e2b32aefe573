"""A kernel-ESP mesh without Kubernetes: Node objects -> the operator's own planner -> files -> real node processes.

Under software emulation kube-apiserver needs minutes to become ready and the operator's lease
deadlines cannot be met, so the kernel tier leaves the control plane out and does in-process what
the operator and kubelet do for a node: ``read_node`` and ``plan`` (the operator's pure decisions)
turn Node objects into every node's ``mesh.yaml``; the CA and leaves are issued by
:mod:`fabmesh.pki.authority` for the addresses the plan names; both are written where kubelet
would project the ConfigMap and the Secret. Everything on a node is then real: one charon with
``kernel-netlink`` only, ``fabmesh agent`` / ``fabmesh connector`` processes, pods added with the
CNI plugins through the conflist the agent writes. The result is recorded as a :class:`LabState`
(no kubeconfig), so the lab's helpers (probe, processes, teardown) and the e2e helpers work on it.

Topology: connector-1 (cloud pod CIDR 10.244.0.0/24 with a pod on its own bridge, standing in for
the cloud side: flannel is not under test here), edge-1 and edge-2 on the WAN in community ``a``
(a direct tunnel), edge-3 behind a NAT router in no community (relayed by the connector, ESP in UDP).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
from pathlib import Path
from typing import Any

from fabmesh.lab import processes
from fabmesh.lab.bringup import cloud_conflist
from fabmesh.lab.state import LabHost, LabNatRouter, LabPod, LabState
from fabmesh.mesh import names
from fabmesh.mesh.model import Backend
from fabmesh.mesh.names import FLANNEL_PREFIX
from fabmesh.operator.inventory import NodeInfo, read_node
from fabmesh.operator.plan import plan
from fabmesh.operator.settings import OperatorSettings
from fabmesh.pki.authority import issue_leaf, new_ca
from fabmesh.testenv import cni
from fabmesh.testenv.hosts import Network, unique_prefix, wait_for

WAN_CIDR = "198.51.100.0/24"
CONNECTOR_POD_CIDR = "10.244.0.0/24"
NAT_LAN = "172.16.1.0/24"
# name -> (WAN address, InternalIP on lo, communities); edge-3 sits behind the NAT router instead.
WAN_EDGES = {"edge-1": ("198.51.100.11", "192.0.2.1", ("a",)), "edge-2": ("198.51.100.12", "192.0.2.2", ("a",))}
CONNECTOR_WAN = "198.51.100.1"
NAT_WAN = "198.51.100.21"
EDGE3_LAN_IP = "172.16.1.2"


def settings(backend: Backend) -> OperatorSettings:
    return OperatorSettings.model_validate({"tunnel": {"backend": backend.value},
                                            "node": {"resync_period_s": 10}})


def node_object(host: LabHost) -> dict[str, Any]:
    """The Node an admin and kubelet (and flanneld, on the connector) would have made for ``host``."""
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    addresses = [{"type": "InternalIP", "address": host.node_ip}]
    spec: dict[str, Any] = {}
    if host.role == "edge":
        labels = {names.EDGE_LABEL: "", **{f"{names.COMMUNITY_LABEL_PREFIX}{c}": "" for c in host.communities}}
        if host.nat is None:
            addresses.append({"type": "ExternalIP", "address": host.wan_ip})
    else:
        labels = {names.CONNECTOR_LABEL: ""}
        annotations = {FLANNEL_PREFIX + "backend-type": "vxlan", FLANNEL_PREFIX + "public-ip": host.wan_ip,
                       FLANNEL_PREFIX + "backend-data": json.dumps({"VNI": 1, "VtepMAC": "0a:58:0a:f4:00:01"})}
        spec = {"podCIDR": host.pod_cidr, "podCIDRs": [host.pod_cidr]}
    return {"metadata": {"name": host.name, "labels": labels, "annotations": annotations,
                         "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": spec, "status": {"addresses": addresses}}


def _create_hosts(state: LabState) -> None:
    net = Network(prefix=state.prefix, directory=Path(state.directory) / "hosts", wan_cidr=WAN_CIDR).create()
    conn = net.add_host("connector-1", CONNECTOR_WAN)
    # flanneld puts the pod CIDR's first address on flannel.1; the connector routes to edges from it.
    conn.run("ip", "addr", "add", f"{ipaddress.ip_network(CONNECTOR_POD_CIDR).network_address}/32", "dev", "lo")
    state.hosts.append(LabHost(name="connector-1", role="connector", netns=conn.netns, wan_ip=conn.wan_ip,
                               node_ip=conn.wan_ip, pod_cidr=CONNECTOR_POD_CIDR))
    for name, (wan_ip, node_ip, communities) in WAN_EDGES.items():
        host = net.add_host(name, wan_ip)
        host.run("ip", "addr", "add", f"{node_ip}/32", "dev", "lo")
        state.hosts.append(LabHost(name=name, role="edge", netns=host.netns, wan_ip=wan_ip, node_ip=node_ip,
                                   communities=list(communities)))
    router = net.add_nat_router("home", NAT_WAN, NAT_LAN)
    state.nats.append(LabNatRouter(name="home", netns=router.netns, wan_ip=router.wan_ip, lan_cidr=router.lan_cidr,
                                   type="masquerade"))
    e3 = net.add_host_behind_router("edge-3", router, EDGE3_LAN_IP)
    state.hosts.append(LabHost(name="edge-3", role="edge", netns=e3.netns, wan_ip=e3.wan_ip, node_ip=e3.wan_ip,
                               nat="home"))
    state.save()


def _write_configs(state: LabState) -> None:
    """What the operator decides and kubelet projects: ``mesh.yaml`` and the TLS Secret's files per node."""
    now = datetime.datetime.now(datetime.UTC)
    config = settings(state.backend)
    infos = [read_node(node_object(h), config) for h in state.hosts]
    bad = [i for i in infos if not isinstance(i, NodeInfo)]
    assert not bad, bad
    ca = new_ca(now=now)
    result = plan([i for i in infos if isinstance(i, NodeInfo)], config, ca.cert_pem)
    assert not result.errors, result.errors
    connector = result.connector_mesh()
    assert connector is not None
    meshes = {**result.edges, connector.node.name: connector}
    for h in state.hosts:
        base = Path(state.directory) / "hosts" / h.name
        (base / "mesh").mkdir(parents=True, exist_ok=True)
        (base / "mesh" / "mesh.yaml").write_text(meshes[h.name].to_yaml())
        leaf = issue_leaf(ca, name=h.name, addresses=result.cert_addresses[h.name], now=now)
        (base / "tls").mkdir(parents=True, exist_ok=True)
        for file, text in (("tls.crt", leaf.cert_pem), ("tls.key", leaf.key_pem), ("ca.crt", ca.cert_pem)):
            (base / "tls" / file).write_text(text)
        if h.role == "edge":
            h.pod_cidr = result.cidrs[h.name]
    state.save()


def _add_pods(state: LabState, timeout: float) -> None:
    for h in state.hosts:
        base = Path(state.directory) / "hosts" / h.name
        if h.role == "edge":
            conflist = base / "cni" / "10-fabmesh.conflist"
            wait_for(conflist.exists, timeout=timeout, interval=0.2, what=f"the agent's CNI config on {h.name}")
        else:
            conflist = base / "cni" / "10-cbr0.conflist"
            cloud_conflist(conflist, h.pod_cidr or "", base / "ipam")
        pod = cni.add_pod(conflist, h.netns, "pod")
        state.pods.append(LabPod(name=f"pod-{h.name}", node=h.name, ip=pod.ip, netns=pod.netns))
        state.save()


def build(directory: Path, timeout: float, backend: Backend = Backend.KERNEL) -> LabState:
    """Hosts, configs, charons, node processes and pods; returns once the pods exist.

    ``backend`` is the kernel tier's (kernel-netlink); libipsec builds the same mesh on a host without ESP.
    """
    state = LabState(prefix=unique_prefix("fmk"), directory=str(directory), backend=backend)
    state.save()
    _create_hosts(state)
    _write_configs(state)
    for h in state.hosts:
        processes.start_charon(state, h.name)
        processes.start_node_process(state, h.name)
    _add_pods(state, timeout)
    return state
