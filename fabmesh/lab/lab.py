"""Bring a whole hybrid cluster up in network namespaces, check it, and take it down.

Real parts only: etcd + kube-apiserver, the real operator process with the
chart's RBAC, one charon per tunnel host (userspace ESP), the real agent and
connector processes inside their hosts' namespaces, pods added by the real CNI
plugins with the conflist the agent wrote, flannel-style VXLAN between cloud
hosts programmed from the Node annotations the operator writes
(:mod:`fabmesh.lab.nodesim`, which also projects ConfigMaps and Secrets like
kubelet).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from fabmesh.kube.client import Kube, load_api_client
from fabmesh.lab.state import LabHost, LabPod, LabState
from fabmesh.lab.topology import LabRole, Topology
from fabmesh.mesh import names, topology
from fabmesh.mesh.model import Role
from fabmesh.mesh.names import FLANNEL_PREFIX
from fabmesh.mesh.ports import DEFAULT_METRICS_PORT
from fabmesh.mesh.topology import LabelError, LabelKeys, read_labels
from fabmesh.strongswan.driver import Charon, ViciError
from fabmesh.testenv import cni
from fabmesh.testenv.cluster import install_operator_rbac, spawn_operator
from fabmesh.testenv.controlplane import ControlPlane
from fabmesh.testenv.hosts import Host, Network, owned_namespaces, sh, stop_pid, unique_prefix, wait_for

log = logging.getLogger("fabmesh.lab")
Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def _spawn(state: LabState, name: str, argv: list[str], netns: str | None = None) -> int:
    logs = Path(state.directory) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cmd = (["ip", "netns", "exec", netns] if netns else []) + argv
    with open(logs / f"{name}.log", "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    state.pids[name] = proc.pid
    state.save()
    return proc.pid


def _fabmesh(*args: str) -> list[str]:
    return [sys.executable, "-m", "fabmesh.cli", *args]


def _setup_cloud_host(host: Host, pod_cidr: str) -> str:
    """flannel.1 as flanneld's vxlan backend makes it; returns its VtepMAC."""
    net = ipaddress.ip_network(pod_cidr)
    host.run("ip", "link", "add", "flannel.1", "type", "vxlan", "id", "1", "local", host.wan_ip, "dev", "wan0",
             "dstport", "8472", "nolearning")
    host.run("ip", "addr", "add", f"{net.network_address}/32", "dev", "flannel.1")
    host.run("ip", "link", "set", "flannel.1", "mtu", "1450", "up")
    return json.loads(host.run("ip", "-j", "link", "show", "flannel.1").stdout)[0]["address"]


def _cloud_conflist(path: Path, pod_cidr: str, ipam_dir: Path) -> None:
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


def operator_settings(topology: Topology, namespace: str) -> dict[str, Any]:
    return {
        "namespace": namespace,
        "edge_pod_pool": topology.edge_pod_pool,
        "cloud_pod_cidrs": [topology.cloud_pod_cidr],
        "service_cidr": topology.service_cidr,
        "resync_period_s": 10,
        "tunnel": {"backend": "libipsec"},
        "leader_election": {"lease_duration_s": 4, "renew_deadline_s": 3, "retry_period_s": 1},
        # The lab runs agents as processes (no kubelet), so the operator's agent Pods are off.
        "agent_pods": {"enabled": False},
    }


def up(topology: Topology, directory: Path, progress: Progress = _quiet, timeout: float = 120) -> LabState:
    directory.mkdir(parents=True, exist_ok=True)
    state = LabState(prefix=unique_prefix("fmlab"), directory=str(directory))
    state.save()
    progress("starting etcd and kube-apiserver")
    cp = ControlPlane(directory=directory / "controlplane").start()
    state.pids.update({f"controlplane-{i}": pid for i, pid in enumerate(cp.pids)})
    state.kubeconfig = str(cp.kubeconfig)
    state.save()
    admin = Kube(load_api_client(str(cp.kubeconfig)))

    progress("creating hosts (network namespaces)")
    net = Network(prefix=state.prefix, directory=directory / "hosts", wan_cidr=topology.wan_cidr).create()
    hosts: dict[str, Host] = {}
    macs: dict[str, str] = {}
    cloud_index = edge_index = 0
    for i, node in enumerate(topology.nodes):
        host = net.add_host(node.name, topology.wan_ip(i))
        hosts[node.name] = host
        if node.role is LabRole.EDGE:
            node_ip = topology.edge_ip(edge_index)
            edge_index += 1
            host.run("ip", "addr", "add", f"{node_ip}/32", "dev", "lo")
            state.hosts.append(LabHost(name=node.name, role="edge", netns=host.netns, wan_ip=host.wan_ip,
                                       node_ip=node_ip, communities=list(node.communities)))
        else:
            pod_cidr = topology.cloud_pod_subnet(cloud_index)
            cloud_index += 1
            macs[node.name] = _setup_cloud_host(host, pod_cidr)
            state.hosts.append(LabHost(name=node.name, role=node.role.value, netns=host.netns, wan_ip=host.wan_ip,
                                       node_ip=host.wan_ip, pod_cidr=pod_cidr))
    state.save()

    progress("registering Nodes and installing the operator's RBAC")
    namespace = state.operator_namespace
    op_kubeconfig = install_operator_rbac(cp, admin, namespace)
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
        admin.create("nodes", _node_object(h, labels, annotations, h.wan_ip if h.role == "edge" else None))

    progress("starting the operator")
    settings_file = directory / "operator.yaml"
    settings_file.write_text(yaml.safe_dump(operator_settings(topology, namespace)))
    state.pids["operator"] = spawn_operator(op_kubeconfig, settings_file, "lab-operator", directory / "logs").pid
    state.save()

    progress("starting kubelet/flanneld stand-ins, charons, the connector and the agents")
    _spawn(state, "nodesim", [sys.executable, "-m", "fabmesh.lab.nodesim", "--dir", str(directory)])
    for h in state.hosts:
        if h.role == "cloud":
            continue
        state.pids[f"charon-{h.name}"] = hosts[h.name].start_charon().pid
        start_node_process(state, h.name)
    state.save()

    progress("adding pods with the CNI plugins")
    for h in state.hosts:
        base = hosts[h.name].directory
        if h.role == "edge":
            conflist = base / "cni" / "10-fabmesh.conflist"
            wait_for(conflist.exists, timeout=timeout, interval=0.2, what=f"the agent's CNI config on {h.name}")
        else:
            conflist = base / "cni" / "10-flannel.conflist"
            _cloud_conflist(conflist, h.pod_cidr or "", base / "ipam")
        pod = cni.add_pod(conflist, h.netns, "pod")
        state.pods.append(LabPod(name=f"pod-{h.name}", node=h.name, ip=pod.ip, netns=pod.netns))
        if h.role == "edge":
            h.pod_cidr = str(ipaddress.ip_network(f"{pod.ip}/24", strict=False))
    state.save()
    progress("waiting for every tunnel")
    wait_tunnels(state, timeout)
    return state


def _host(state: LabState, name: str) -> Host:
    h = state.host(name)
    return Host(name=h.name, netns=h.netns, wan_ip=h.wan_ip, directory=Path(state.directory) / "hosts" / h.name)


def start_node_process(state: LabState, name: str) -> int:
    """Start the agent (edge) or connector process of one host; returns its PID."""
    h = state.host(name)
    base = Path(state.directory) / "hosts" / name
    common = ["--config-dir", str(base / "mesh"), "--tls-dir", str(base / "tls"),
              "--vici-socket", str(base / "run" / "charon.vici"), "--state-dir", str(base / "state"),
              "--metrics-port", str(DEFAULT_METRICS_PORT), "--metrics-address", h.wan_ip]
    if h.role == "connector":
        return _spawn(state, f"node-{name}", _fabmesh("connector", *common), h.netns)
    return _spawn(state, f"node-{name}", _fabmesh("agent", *common, "--cni-conf-dir", str(base / "cni"),
                                                  "--ipam-data-dir", str(base / "ipam")), h.netns)


def restart_node_process(state: LabState, name: str) -> int:
    """Stop the agent/connector by PID (SIGTERM: it leaves the data plane alone) and start it again."""
    stop_pid(state.pids[f"node-{name}"])
    return start_node_process(state, name)


def restart_charon(state: LabState, name: str) -> int:
    """Kill charon (SIGKILL, as a crash) and start a fresh one, as kubelet restarts a container."""
    host = _host(state, name)
    old = state.pids[f"charon-{name}"]
    with contextlib.suppress(ProcessLookupError):
        os.kill(old, signal.SIGKILL)
    stop_pid(old)
    pid = host.start_charon().pid
    state.pids[f"charon-{name}"] = pid
    state.save()
    return pid


def _placement(state: LabState) -> tuple[dict[str, Role | None], dict[str, tuple[str, ...]], str | None]:
    """Roles, communities and the active connector from the API's Nodes (``kubectl label`` changes them);
    from the topology when the API cannot be read."""
    try:
        kube = Kube(load_api_client(state.kubeconfig), timeout=3)
        nodes = kube.list("nodes")
    except Exception:
        roles: dict[str, Role | None] = {h.name: Role(h.role) for h in state.hosts}
        connector = topology.active_connector({h.name: "" for h in state.hosts if h.role == Role.CONNECTOR})
        return roles, {h.name: tuple(h.communities) for h in state.hosts}, connector
    placed = {n["metadata"]["name"]: read_labels(n["metadata"].get("labels") or {}, LabelKeys()) for n in nodes}
    roles = {n: None if isinstance(p, LabelError) else p.role for n, p in placed.items()}
    communities = {n: () if isinstance(p, LabelError) else p.communities for n, p in placed.items()}
    created = {n["metadata"]["name"]: n["metadata"].get("creationTimestamp") or "" for n in nodes}
    connector = topology.active_connector({n: created[n] for n, r in roles.items() if r is Role.CONNECTOR})
    return roles, communities, connector


def expected_tunnels(state: LabState) -> dict[str, set[str]]:
    """Per tunnel host, the peers it should have an IKE_SA with, by the topology rules."""
    roles, communities, connector = _placement(state)
    return topology.expected_tunnels({n: r for n, r in roles.items() if r is not None}, communities, connector)


def established_tunnels(state: LabState, name: str) -> set[str]:
    try:
        with Charon(Path(state.directory) / "hosts" / name / "run" / "charon.vici", timeout=5) as charon:
            return {n for n, sa in charon.sas().items() if sa.get("state") == "ESTABLISHED" and sa.get("child-sas")}
    except ViciError:
        return set()


def wait_tunnels(state: LabState, timeout: float) -> None:
    """Until every tunnel the topology implies is up (a ping can pass through the relay before that)."""
    expected = expected_tunnels(state)
    wait_for(lambda: all(peers <= established_tunnels(state, n) for n, peers in expected.items()),
             timeout=timeout, interval=0.25, what="every expected tunnel to be established")


def ping(netns: str, ip: str, timeout_s: int = 1) -> bool:
    return sh("ping", "-n", "-q", "-c", "1", "-W", str(timeout_s), ip, ns=netns, check=False).returncode == 0


def check(state: LabState, wait: float = 0.0) -> dict[str, Any]:
    """Ping every pod from every pod; with ``wait``, retry failing pairs until they pass or time runs out."""
    deadline = time.monotonic() + wait
    results: dict[tuple[str, str], bool] = {}
    while True:
        for src in state.pods:
            for dst in state.pods:
                if src is dst or results.get((src.name, dst.name)):
                    continue
                results[(src.name, dst.name)] = ping(src.netns, dst.ip)
        if all(results.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    pods = [{"name": p.name, "node": p.node, "ip": p.ip} for p in state.pods]
    node_of = {p.name: p.node for p in state.pods}
    roles, communities, _ = _placement(state)
    pairs = [{"src": s, "dst": d, "ok": ok,
              "path": topology.intended_path(node_of[s], node_of[d], roles, communities).value}
             for (s, d), ok in results.items()]
    return {"kubeconfig": state.kubeconfig, "prefix": state.prefix, "pods": pods, "pairs": pairs,
            "nodes": [{"name": h.name, "role": h.role, "communities": sorted(communities.get(h.name, ())),
                       "wan_ip": h.wan_ip, "node_ip": h.node_ip} for h in state.hosts]}


def down(directory: Path) -> str | None:
    state = LabState.load(directory)
    if state is None:
        return None
    for name, pid in sorted(state.pids.items(), key=lambda kv: kv[0].startswith("controlplane")):
        stop_pid(pid, timeout=10)
        log.debug("stopped %s pid=%d", name, pid)
    for netns in owned_namespaces(state.prefix):
        sh("ip", "netns", "del", netns, check=False)
    shutil.rmtree(directory, ignore_errors=True)
    return state.prefix

