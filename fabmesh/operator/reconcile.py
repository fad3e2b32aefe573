"""One level-triggered pass: observe the cluster, plan, and write only what differs.

Order matters for crash safety:
1. the CA (created once; a race between two creators is settled by the API: 409),
2. the IPAM record ConfigMap, updated with a resourceVersion compare-and-swap
   *before* any CIDR is used anywhere: of two writers only one can win, and an
   operator killed after this step finds its allocation again on restart,
3. per-node Secrets (certificates), ConfigMaps, the connector's config,
4. Node annotations and ``spec.podCIDR`` (guarded by the Node's resourceVersion),
5. agent Pods, then deletion of what belongs to Nodes that are gone,
6. Warning Events for every node that could not be planned.

Every write compares first; an unchanged cluster costs reads only.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fabmesh.kube.client import ApiError, Kube
from fabmesh.mesh.model import PeerShard, dump_yaml
from fabmesh.mesh.names import (
    AGENT_SELECTOR,
    EVENTS_NAMESPACE,
    INVALID_NODE_REASON,
    MANAGED_SELECTOR,
    STATUS_ANNOTATION,
)
from fabmesh.operator import objects as o
from fabmesh.operator.inventory import InvalidNode, NodeInfo, read_node
from fabmesh.operator.plan import MeshPlan, plan
from fabmesh.operator.settings import OperatorSettings
from fabmesh.pki.authority import KeyPair, PKIError, describe, issue_leaf, new_ca, renewal_reason

log = logging.getLogger(__name__)
Clock = Callable[[], datetime.datetime]


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass
class PassResult:
    plan: MeshPlan
    errors: list[InvalidNode] = field(default_factory=list)
    retry: bool = False  # a compare-and-swap lost a race: run again soon


class Reconciler:
    def __init__(self, kube: Kube, settings: OperatorSettings, clock: Clock = utcnow) -> None:
        self.kube = kube
        self.settings = settings
        self.clock = clock
        self.ns = settings.namespace
        self._emitted: set[str] = set()

    # -- observe ---------------------------------------------------------------------------------

    def _nodes(self) -> tuple[list[NodeInfo], list[InvalidNode], set[str]]:
        """Readable nodes, unreadable ones, and the names of every edge-labelled node."""
        infos: list[NodeInfo] = []
        invalid: list[InvalidNode] = []
        edge_names: set[str] = set()
        for obj in self.kube.list("nodes"):
            if self.settings.edge_label in (obj["metadata"].get("labels") or {}):
                edge_names.add(obj["metadata"]["name"])
            info = read_node(obj, self.settings)
            if isinstance(info, InvalidNode):
                invalid.append(info)
            else:
                infos.append(info)
        return infos, invalid, edge_names

    def _ca(self) -> KeyPair:
        secret = self.kube.get("secrets", o.CA_SECRET, self.ns)
        if secret is None:
            now = self.clock()
            ca = new_ca(now=now, lifetime=datetime.timedelta(days=self.settings.ca_lifetime_days))
            body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                    "metadata": o.metadata(o.CA_SECRET, self.ns, "ca"),
                    "data": {"tls.crt": o.b64(ca.cert_pem), "tls.key": o.b64(ca.key_pem)}}
            try:
                self.kube.create("secrets", body, self.ns)
                log.info("action=create-ca secret=%s/%s", self.ns, o.CA_SECRET)
                return ca
            except ApiError as exc:
                if not exc.conflict:
                    raise
                secret = self.kube.get("secrets", o.CA_SECRET, self.ns)  # another writer won; use theirs
                assert secret is not None
        data = secret["data"]
        return KeyPair(cert_pem=o.unb64(data["tls.crt"]), key_pem=o.unb64(data["tls.key"]))

    # -- the pass --------------------------------------------------------------------------------

    def run_once(self) -> PassResult:
        infos, invalid, edge_names = self._nodes()
        ca = self._ca()
        ipam_cm = self.kube.get("configmaps", o.IPAM_CONFIGMAP, self.ns)
        recorded = json.loads((ipam_cm or {}).get("data", {}).get("allocations.json", "{}"))
        configmaps = {c["metadata"]["name"]: c
                      for c in self.kube.list("configmaps", self.ns, MANAGED_SELECTOR)}
        # An edge that turns invalid stays in its peers' configs as its own ConfigMap last described it.
        last_good = {name: cm["data"]["mesh.yaml"] for name in edge_names
                     if (cm := configmaps.get(o.agent_configmap_name(name))) and "mesh.yaml" in (cm.get("data") or {})}
        mesh = plan(infos, self.settings, ca.cert_pem, recorded, last_good)
        result = PassResult(plan=mesh, errors=[*invalid, *mesh.errors])
        if mesh.ipam_record != recorded and not self._write_ipam(ipam_cm, mesh.ipam_record):
            result.retry = True
            return result  # lost the race: nothing may use these allocations; replan from fresh state
        for node, cidr in sorted(mesh.allocated.items()):
            log.info("node=%s action=allocate-pod-cidr cidr=%s", node, cidr)

        by_name = {n.name: n for n in infos}
        secrets = {s["metadata"]["name"]: s for s in self.kube.list("secrets", self.ns, MANAGED_SELECTOR)}
        expiry: dict[str, str] = {}
        for name, addresses in sorted(mesh.cert_addresses.items()):
            node = by_name[name]
            secret_name = o.tls_secret_name(name) if name in mesh.edges else o.CONNECTOR_SECRET
            try:
                expiry[name] = self._sync_secret(secret_name, node, addresses, ca, secrets.get(secret_name))
            except PKIError as exc:
                result.errors.append(InvalidNode(name, f"certificate.{exc.field}", exc.reason))

        for name, node_mesh in sorted(mesh.edges.items()):
            if name not in expiry:
                continue
            self._sync_configmap(o.configmap(o.agent_configmap_name(name), self.ns, "agent-config",
                                             {"mesh.yaml": node_mesh.to_yaml()}, name, by_name[name].uid),
                                 configmaps)
        if mesh.connector is not None:
            self._sync_configmap(o.configmap(o.CONNECTOR_CONFIGMAP, self.ns, "connector-config",
                                             {"mesh.yaml": mesh.connector.to_yaml()}), configmaps)
            for shard, peers in sorted(mesh.connector_shards.items()):
                text = dump_yaml(PeerShard(shard=shard, peers=peers))
                self._sync_configmap(o.configmap(o.connector_shard_name(shard), self.ns, "connector-peers",
                                                 {"peers.yaml": text}), configmaps)

        for name in sorted(mesh.edges):
            if not self._patch_node(by_name[name], mesh, expiry.get(name)):
                result.retry = True
        if self.settings.agent_pods.enabled:
            self._sync_pods({n: by_name[n].uid for n in mesh.edges if n in expiry}, edge_names)
        self._delete_stale(edge_names, mesh, configmaps, secrets)
        for error in result.errors:
            self._event(error, by_name.get(error.node))
        return result

    # -- writers ---------------------------------------------------------------------------------

    def _write_ipam(self, current: dict[str, Any] | None, record: dict[str, str]) -> bool:
        body = o.configmap(o.IPAM_CONFIGMAP, self.ns, "ipam",
                           {"allocations.json": json.dumps(dict(sorted(record.items())), indent=0)})
        try:
            if current is None:
                self.kube.create("configmaps", body, self.ns)
            else:
                body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                self.kube.replace("configmaps", body, self.ns)
        except ApiError as exc:
            if exc.conflict:
                log.info("action=ipam-conflict configmap=%s/%s: another writer changed it; replanning",
                         self.ns, o.IPAM_CONFIGMAP)
                return False
            raise
        return True

    def _sync_secret(self, secret_name: str, node: NodeInfo, addresses: tuple[str, ...], ca: KeyPair,
                     current: dict[str, Any] | None) -> str:
        now = self.clock()
        existing = None
        if current is not None:
            data = current.get("data") or {}
            existing = KeyPair(cert_pem=o.unb64(data.get("tls.crt")), key_pem=o.unb64(data.get("tls.key")))
        reason = renewal_reason(ca, existing, name=node.name, addresses=addresses, now=now)
        if reason is None and existing is not None:
            if o.unb64((current or {}).get("data", {}).get("ca.crt")) == ca.cert_pem:
                return describe(existing.cert_pem).not_after.isoformat()
            leaf = existing
        else:
            leaf = issue_leaf(ca, name=node.name, addresses=addresses, now=now,
                              lifetime=datetime.timedelta(days=self.settings.cert_lifetime_days))
        body = o.tls_secret(secret_name, self.ns, "tls", leaf.cert_pem, leaf.key_pem, ca.cert_pem,
                            node.name, node.uid)
        if current is None:
            self.kube.create("secrets", body, self.ns)
        else:
            body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            self.kube.replace("secrets", body, self.ns)
        info = describe(leaf.cert_pem)
        log.info("node=%s action=issue-certificate secret=%s reason=%s serial=%x not-after=%s",
                 node.name, secret_name, reason.value if reason else "ca-bundle", info.serial,
                 info.not_after.isoformat())
        return info.not_after.isoformat()

    def _sync_configmap(self, body: dict[str, Any], existing: dict[str, dict[str, Any]]) -> None:
        name = body["metadata"]["name"]
        current = existing.get(name)
        if current is not None and current.get("data") == body["data"] and \
                current["metadata"].get("labels") == body["metadata"]["labels"]:
            return
        if current is None:
            self.kube.create("configmaps", body, self.ns)
        else:
            body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            self.kube.replace("configmaps", body, self.ns)
        log.info("action=%s configmap=%s/%s bytes=%d", "create" if current is None else "update", self.ns,
                 name, sum(len(v) for v in body["data"].values()))

    def _patch_node(self, node: NodeInfo, mesh: MeshPlan, expiry: str | None) -> bool:
        edge = mesh.edges[node.name].node
        status = f"cidr={edge.pod_cidr} communities={','.join(edge.communities) or '-'} " \
                 f"cert-expires={expiry or 'none'}"
        patch = mesh.node_patches.get(node.name)
        annotations = dict(patch.annotations) if patch else {}
        if node.annotations.get(STATUS_ANNOTATION) != status:
            annotations[STATUS_ANNOTATION] = status
        body: dict[str, Any] = {"metadata": {"resourceVersion": node.resource_version}}
        if annotations:
            body["metadata"]["annotations"] = annotations
        if patch and patch.spec_pod_cidr:
            body["spec"] = {"podCIDR": patch.spec_pod_cidr, "podCIDRs": [patch.spec_pod_cidr]}
        if len(body) == 1 and len(body["metadata"]) == 1:
            return True
        try:
            self.kube.merge_patch("nodes", node.name, body)
        except ApiError as exc:
            if exc.conflict:
                return False  # the Node changed under us; the next pass sees the new version
            raise
        log.info("node=%s action=annotate keys=%s%s", node.name, ",".join(sorted(annotations)),
                 " spec.podCIDR=" + patch.spec_pod_cidr if patch and patch.spec_pod_cidr else "")
        return True

    def _sync_pods(self, want: dict[str, str], edge_names: set[str]) -> None:
        pods = {p["metadata"]["labels"].get(o.NODE_LABEL): p
                for p in self.kube.list("pods", self.ns, AGENT_SELECTOR)}
        for node, uid in sorted(want.items()):
            body = o.agent_pod(node, uid, self.settings)
            current = pods.get(node)
            if current is not None:
                if current["metadata"].get("annotations", {}).get(o.SPEC_HASH) == \
                        body["metadata"]["annotations"][o.SPEC_HASH]:
                    continue
                self.kube.delete("pods", current["metadata"]["name"], self.ns)  # Pod specs are immutable
            try:
                self.kube.create("pods", body, self.ns)
            except ApiError as exc:
                if not exc.conflict:  # 409: the old Pod is still terminating; next pass
                    raise
            log.info("node=%s action=%s pod=%s/%s", node, "replace-pod" if current else "create-pod", self.ns,
                     body["metadata"]["name"])
        for node, pod in sorted(pods.items(), key=lambda item: item[0] or ""):
            if node not in edge_names:  # a node in error keeps its running agent
                # The Node is gone (or no longer edge): as the pod GC controller would, do not wait
                # for a kubelet that may never confirm.
                self.kube.delete("pods", pod["metadata"]["name"], self.ns, grace_period_s=0)
                log.info("node=%s action=delete-pod pod=%s/%s", node, self.ns, pod["metadata"]["name"])

    def _delete_stale(self, edge_names: set[str], mesh: MeshPlan, configmaps: dict[str, Any],
                      secrets: dict[str, Any]) -> None:
        """Delete what belongs to Nodes that are gone or no longer edges (no GC is assumed).

        A node that is still an edge keeps its objects even while it is in error:
        a bad label must not tear down a working node.
        """
        keep_cm = {o.IPAM_CONFIGMAP, *(o.agent_configmap_name(n) for n in edge_names)}
        keep_secret = {o.CA_SECRET, *(o.tls_secret_name(n) for n in edge_names)}
        if mesh.connector is not None:
            keep_cm |= {o.CONNECTOR_CONFIGMAP, *(o.connector_shard_name(i) for i in mesh.connector_shards)}
            keep_secret.add(o.CONNECTOR_SECRET)
        for name in sorted(set(configmaps) - keep_cm):
            self.kube.delete("configmaps", name, self.ns)
            log.info("action=delete configmap=%s/%s reason=node-gone-or-not-edge", self.ns, name)
        for name in sorted(set(secrets) - keep_secret):
            self.kube.delete("secrets", name, self.ns)
            log.info("action=delete secret=%s/%s reason=node-gone-or-not-edge", self.ns, name)

    def _event(self, error: InvalidNode, node: NodeInfo | None) -> None:
        """One Warning Event per (node, field, reason): a deterministic name makes it idempotent."""
        key = hashlib.sha256(f"{error.node}|{error.field}|{error.reason}".encode()).hexdigest()[:10]
        name = f"{error.node}.fabmesh.{key}"
        if name in self._emitted:
            return
        self._emitted.add(name)
        now = self.clock().strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": name, "namespace": EVENTS_NAMESPACE, "labels": dict(o.MANAGED_BY)},
            "involvedObject": {"apiVersion": "v1", "kind": "Node", "name": error.node,
                               **({"uid": node.uid} if node else {})},
            "reason": INVALID_NODE_REASON, "type": "Warning",
            "message": f"{error.field}: {error.reason}",
            "source": {"component": "fabmesh-operator"},
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }
        try:
            self.kube.create("events", body, EVENTS_NAMESPACE)
        except ApiError as exc:
            if not exc.conflict:
                raise
            return
        log.warning("node=%s field=%s: %s", error.node, error.field, error.reason)
