"""What the running lab can reach: tunnels charon reports established, and a ping matrix between pods.

The rules for which tunnels should exist and which path a pair takes live in
:mod:`fabmesh.mesh.topology`; this module only reads the placement (Node
labels from the API, so a ``kubectl label`` shows up here) and observes. A
pair's ``path`` is observed: every ping is bracketed by readings of every
tunnel host's CHILD_SA counters and :mod:`fabmesh.mesh.probepath` names the path
from the SAs that carried it (the ``evidence``); ``intended`` is added where
the rules call for another path.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fabmesh.kube.client import Kube, load_api_client
from fabmesh.lab.state import LabState
from fabmesh.mesh import probepath as paths
from fabmesh.mesh import topology
from fabmesh.mesh.model import Role
from fabmesh.mesh.topology import LabelError, LabelKeys, read_labels
from fabmesh.strongswan.driver import Charon, ViciError
from fabmesh.testenv.hosts import sh, wait_for


def placement(state: LabState) -> tuple[dict[str, Role | None], dict[str, tuple[str, ...]], str | None]:
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
    roles, communities, connector = placement(state)
    return topology.expected_tunnels({n: r for n, r in roles.items() if r is not None}, communities, connector)


def vici_path(state: LabState, name: str) -> Path:
    """Where one host's charon listens: ``hosts/<name>/run/charon.vici``.

    With real nodes charon runs in the agent or connector Pod and its socket lies in the Pod's
    emptyDir (the newest, should an old Pod's directory linger), a path longer than a unix socket
    address may be: the short path is made a symlink to it (connect follows it), re-pointed when
    the Pod is replaced.
    """
    short = Path(state.directory) / "hosts" / name / "run" / "charon.vici"
    if state.nodes != "real":
        return short
    pods = Path(state.directory) / "hosts" / name / "kube" / "kubelet" / "pods"
    found = list(pods.glob("*/volumes/kubernetes.io~empty-dir/run/charon.vici"))
    if not found:
        return short
    newest = max(found, key=lambda p: p.stat().st_mtime)
    if not short.is_symlink() or short.readlink() != newest:
        short.parent.mkdir(parents=True, exist_ok=True)
        tmp = short.with_suffix(".new")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(newest)
        tmp.replace(short)
    return short


def established_tunnels(state: LabState, name: str) -> set[str]:
    """The peers one host's charon has an ESTABLISHED IKE_SA with a CHILD_SA to (empty if it does not answer)."""
    try:
        with Charon(vici_path(state, name), timeout=5) as charon:
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


def read_counters(state: LabState) -> paths.Counters:
    """Every tunnel host's CHILD_SA packet counters (a host whose charon does not answer adds none)."""
    out: paths.Counters = {}
    for h in state.hosts:
        if h.role == "cloud":
            continue
        try:
            with Charon(vici_path(state, h.name), timeout=5) as charon:
                out.update(paths.counters(h.name, charon.ike_sas()))
        except ViciError:
            continue
    return out


def observe_pair(state: LabState, src: str, dst: str) -> tuple[bool, paths.Observed, list[paths.Counted]]:
    """One ping from node ``src``'s pod to node ``dst``'s, and the path the SA counters saw it take
    (what ``check`` does for every pair, for one pair: cheap enough to poll during a fault)."""
    roles, _, connector = placement(state)
    edges = {n for n, r in roles.items() if r is Role.EDGE}
    pod_of = {p.node: p for p in state.pods}
    before = read_counters(state)
    ok = ping(pod_of[src].netns, pod_of[dst].ip)
    evidence = paths.counted(before, read_counters(state))
    return ok, paths.observed_path(src, dst, edges, connector, evidence), evidence


def check(state: LabState, wait: float = 0.0) -> dict[str, Any]:
    """Ping every pod from every pod, observing the path; with ``wait``, retry failing pairs until they
    pass or time runs out."""
    roles, communities, connector = placement(state)
    edges = {n for n, r in roles.items() if r is Role.EDGE}
    node_of = {p.name: p.node for p in state.pods}
    deadline = time.monotonic() + wait
    results: dict[tuple[str, str], tuple[bool, list[paths.Counted]]] = {}
    while True:
        before = read_counters(state)
        for src in state.pods:
            for dst in state.pods:
                if src is dst or results.get((src.name, dst.name), (False,))[0]:
                    continue
                ok = ping(src.netns, dst.ip)
                after = read_counters(state)
                results[(src.name, dst.name)] = (ok, paths.counted(before, after))
                before = after
        if all(ok for ok, _ in results.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    pods = [{"name": p.name, "node": p.node, "ip": p.ip} for p in state.pods]
    pairs = []
    for (s, d), (ok, evidence) in results.items():
        observed = paths.observed_path(node_of[s], node_of[d], edges, connector, evidence)
        intended = topology.intended_path(node_of[s], node_of[d], roles, communities).value
        pair: dict[str, Any] = {"src": s, "dst": d, "ok": ok, "path": observed.value,
                                "evidence": [c.as_json() for c in evidence]}
        if intended != observed.value:
            pair["intended"] = intended
        pairs.append(pair)
    return {"kubeconfig": state.kubeconfig, "prefix": state.prefix, "pods": pods, "pairs": pairs,
            "nodes": [{"name": h.name, "role": h.role, "communities": sorted(communities.get(h.name, ())),
                       "wan_ip": h.wan_ip, "public_ip": h.public_ip(state), "nat": h.nat,
                       "node_ip": h.node_ip} for h in state.hosts],
            "nats": [{"name": n.name, "type": n.type, "wan_ip": n.wan_ip, "lan_cidr": n.lan_cidr}
                     for n in state.nats]}
