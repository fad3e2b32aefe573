"""One level-triggered pass: observe the cluster, plan (pure), and write only what the plan says.

Observe reads the Nodes, the CA Secret, the IPAM record, the operator's Secrets,
ConfigMaps, agent and connector Pods. Planning is pure (``plan.py``, ``certs.py``,
``status.py``, with the clock read once and passed in). Writing goes in an order
that matters for crash safety:
1. the CA, if there is none (a race between two creators is settled by the API: 409),
2. the IPAM record ConfigMap, updated with a resourceVersion compare-and-swap
   *before* any CIDR is used anywhere: of two writers only one can win, and an
   operator killed after this step finds its allocation again on restart,
3. per-node Secrets (issuing a leaf generates its key here), ConfigMaps, the connector's config,
4. Node annotations, ``spec.podCIDR`` and the flannel finalizer (guarded by the Node's resourceVersion),
   and the flannel release of Nodes being deleted or no longer edges (``flannel.py``: strip, then,
   in a later pass, remove the finalizer),
5. each served node's ServiceAccount, Role, RoleBinding and TunnelStatus (``identity_sync.py``),
   agent and connector Pods, then deletion of what belongs to Nodes that are gone
   (or lost their role label),
6. Warning Events for every node that could not be planned or written.

Every write compares first; an unchanged cluster costs reads only. Every
per-object write is isolated: the API server refusing one node's object (a 403
from an admission policy, a 422 on an immutable ConfigMap) becomes that node's
Warning Event, and the pass goes on with the other nodes and with deleting
stale objects.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fabmesh.kube.client import ApiError, Kube
from fabmesh.mesh.model import PeerShard, dump_yaml
from fabmesh.mesh.names import (
    AGENT_SELECTOR,
    CONNECTOR_SELECTOR,
    EVENTS_NAMESPACE,
    INVALID_NODE_REASON,
    MANAGED_SELECTOR,
)
from fabmesh.operator import ca_roll
from fabmesh.operator import objects as o
from fabmesh.operator.certs import ca_from_secret, current_keys, issue, plan_certificates
from fabmesh.operator.flannel import FlannelHold, Release, Step, plan_release, read_hold
from fabmesh.operator.identity_sync import IdentitySync
from fabmesh.operator.inventory import InvalidNode, NodeInfo, read_node
from fabmesh.operator.plan import MeshPlan, NodePatch, plan
from fabmesh.operator.settings import OperatorSettings
from fabmesh.operator.status import node_writes
from fabmesh.pki.authority import (
    KeyPair,
    PKIError,
    ca_needs_rotation,
    describe,
    issued_by,
    new_ca,
    public_key_b64,
)

log = logging.getLogger(__name__)
Clock = Callable[[], datetime.datetime]
# Event names already sent, remembered so a resync does not re-post them; bounded, oldest forgotten
# first (forgetting one only costs a create that the API answers with 409).
EMITTED_MAX = 4096


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass
class Observed:
    nodes: list[NodeInfo]
    invalid: list[InvalidNode]
    edge_names: set[str]  # every edge-labelled Node, readable or not
    connector_names: set[str]  # every connector-labelled Node, readable or not
    ca_secret: dict[str, Any] | None
    ipam_cm: dict[str, Any] | None
    secrets: dict[str, dict[str, Any]]
    configmaps: dict[str, dict[str, Any]]
    pods: dict[str | None, dict[str, Any]]  # agent Pods by their node label
    connector_pods: dict[str | None, dict[str, Any]]  # connector Pods by their node label
    holds: list[FlannelHold] = field(default_factory=list)  # every Node, as the flannel release reads it


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
        self._emitted: OrderedDict[str, None] = OrderedDict()
        self._warned: set[str] = set()

    # -- observe ---------------------------------------------------------------------------------

    def _observe(self) -> Observed:
        infos: list[NodeInfo] = []
        invalid: list[InvalidNode] = []
        edge_names: set[str] = set()
        connector_names: set[str] = set()
        holds: list[FlannelHold] = []
        for obj in self.kube.list("nodes"):
            holds.append(read_hold(obj, self.settings.edge_label))
            labels = obj["metadata"].get("labels") or {}
            # A node with both labels is in error (an Event says so) and keeps what it has under either role:
            # a bad label must not tear down a working node.
            if self.settings.edge_label in labels:
                edge_names.add(obj["metadata"]["name"])
            if self.settings.connector_label in labels:
                connector_names.add(obj["metadata"]["name"])
            info = read_node(obj, self.settings)
            if isinstance(info, InvalidNode):
                invalid.append(info)
            else:
                infos.append(info)
        return Observed(
            nodes=infos, invalid=invalid, edge_names=edge_names, connector_names=connector_names,
            ca_secret=self.kube.get("secrets", o.CA_SECRET, self.ns),
            ipam_cm=self.kube.get("configmaps", o.IPAM_CONFIGMAP, self.ns),
            secrets={s["metadata"]["name"]: s for s in self.kube.list("secrets", self.ns, MANAGED_SELECTOR)},
            configmaps={c["metadata"]["name"]: c for c in self.kube.list("configmaps", self.ns, MANAGED_SELECTOR)},
            pods=self._pods(self.settings.agent_pods.enabled, AGENT_SELECTOR),
            connector_pods=self._pods(self.settings.connector_pods.enabled, CONNECTOR_SELECTOR), holds=holds)

    def _pods(self, enabled: bool, selector: str) -> dict[str | None, dict[str, Any]]:
        if not enabled:
            return {}
        return {p["metadata"]["labels"].get(o.NODE_LABEL): p for p in self.kube.list("pods", self.ns, selector)}

    # -- the pass --------------------------------------------------------------------------------

    def run_once(self) -> PassResult:
        now = self.clock()
        seen = self._observe()
        if seen.ca_secret is None:
            self._create_ca(now)
            seen.ca_secret = self.kube.get("secrets", o.CA_SECRET, self.ns)
        assert seen.ca_secret is not None
        authority = self._roll_ca(seen.ca_secret, seen.secrets, now)
        if authority is None:
            return PassResult(plan=MeshPlan(), retry=True)  # the CA Secret changed under us: start again
        ca, bundle = authority.signer, authority.bundle()
        recorded = json.loads((seen.ipam_cm or {}).get("data", {}).get("allocations.json", "{}"))
        # An edge that turns invalid stays in its peers' configs as its own ConfigMap last described it.
        kept = {name: (seen.configmaps.get(o.agent_configmap_name(name)) or {}).get("data") or {}
                for name in seen.edge_names}
        last_good = {name: data["mesh.yaml"] for name, data in kept.items() if "mesh.yaml" in data}
        # Peers pin the key of the leaf each node's Secret holds now: a replaced key is refused at their
        # next resync; a renewal keeps the key and so changes no peer's config.
        keys = current_keys(seen.secrets, [*(n.name for n in seen.nodes), *last_good], seen.edge_names)
        mesh = plan(seen.nodes, self.settings, bundle, recorded, last_good, keys)
        certs = plan_certificates(seen.secrets, mesh.cert_addresses, mesh.edges, ca, now,
                                  uids={n.name: n.uid for n in seen.nodes}, bundle=bundle)
        result = PassResult(plan=mesh, errors=[*seen.invalid, *mesh.errors, *certs.errors])
        if mesh.ipam_record != recorded and not self._write_ipam(seen.ipam_cm, mesh.ipam_record):
            result.retry = True
            return result  # lost the race: nothing may use these allocations; replan from fresh state
        for node, cidr in sorted(mesh.allocated.items()):
            log.info("node=%s action=allocate-pod-cidr cidr=%s", node, cidr)
        for node in sorted(recorded.keys() - mesh.ipam_record.keys()):
            log.info("node=%s action=release-pod-cidr cidr=%s", node, recorded[node])

        by_name = {n.name: n for n in seen.nodes}
        expiry = dict(certs.expiry)
        issued: dict[str, str] = {}
        lifetime = datetime.timedelta(days=self.settings.cert_lifetime_days)
        for action in certs.actions:
            try:
                leaf = issue(action, ca, now, lifetime)
            except PKIError as exc:
                result.errors.append(InvalidNode(action.node, f"certificate.{exc.field}", exc.reason))
                continue
            node = by_name[action.node]
            if self._guarded(result, action.node, "secrets", action.secret_name,
                             lambda a=action, k=leaf, n=node: self._write_secret(a.secret_name, n, k, bundle,
                                                                                 seen.secrets.get(a.secret_name))):
                info = describe(leaf.cert_pem)
                log.info("node=%s action=issue-certificate secret=%s reason=%s serial=%x not-after=%s key=%s",
                         action.node, action.secret_name, action.log_reason, info.serial,
                         info.not_after.isoformat(), "kept" if action.keep is not None else "new")
                expiry[action.node] = info.not_after.isoformat()
                issued[action.node] = public_key_b64(leaf.cert_pem)
        if any(keys.get(node) != key for node, key in issued.items()):
            # New nodes and revoked keys: pin what was just issued (a renewal keeps the key: no replan).
            replanned = plan(seen.nodes, self.settings, bundle, mesh.ipam_record, last_good, {**keys, **issued})
            result.errors.extend(e for e in replanned.errors if e not in mesh.errors)
            mesh = result.plan = replanned

        for name, node_mesh in sorted(mesh.edges.items()):
            if name not in expiry:
                continue
            self._sync_configmap(result, name, o.configmap(
                o.agent_configmap_name(name), self.ns, "agent-config", {"mesh.yaml": node_mesh.to_yaml()}, name,
                by_name[name].uid), seen.configmaps)
        if mesh.connector is not None:
            owner = mesh.connector.node.name
            self._sync_configmap(result, owner, o.configmap(o.CONNECTOR_CONFIGMAP, self.ns, "connector-config",
                                                            {"mesh.yaml": mesh.connector.to_yaml()}), seen.configmaps)
            for shard, peers in sorted(mesh.connector_shards.items()):
                text = dump_yaml(PeerShard(shard=shard, peers=peers))
                self._sync_configmap(result, owner, o.configmap(o.connector_shard_name(shard), self.ns,
                                                                "connector-peers", {"peers.yaml": text}),
                                     seen.configmaps)

        if mesh.cloud is not None:
            self._sync_configmap(result, None, o.configmap(o.CLOUD_ROUTES_CONFIGMAP, self.ns, "cloud-routes",
                                                           {"routes.yaml": mesh.cloud.to_yaml()}), seen.configmaps)

        for name, patch in node_writes(mesh, by_name, expiry).items():
            self._patch_node(result, by_name[name], patch)
        for release in plan_release(seen.holds):
            self.release_flannel(result, release)
        # Before the Pods, which name the ServiceAccount (admission refuses a Pod whose account is missing).
        served = {**{n: (by_name[n].uid, "edge") for n in mesh.edges if n in expiry},
                  **{n: (by_name[n].uid, "connector") for n in mesh.connectors
                     if n in expiry and mesh.connector is not None}}
        IdentitySync(self.kube, self.ns, lambda node, kind, name, write: self._guarded(
            result, node, kind, name, write), self._warned).sync(served, seen.edge_names | seen.connector_names)
        if self.settings.agent_pods.enabled:
            self._sync_pods(result, {n: o.agent_pod(n, by_name[n].uid, self.settings)
                                     for n in mesh.edges if n in expiry}, seen.edge_names, seen.pods)
        if self.settings.connector_pods.enabled:
            # A Pod per connector whose own Secret is written (none before the connector ConfigMap
            # exists); the active one's loop runs the tunnels, the others stand by.
            self._sync_pods(result, {n: o.connector_pod(n, by_name[n].uid, by_name[n].internal_ip, self.settings)
                                     for n in mesh.connectors if n in expiry and mesh.connector is not None},
                            seen.connector_names, seen.connector_pods)
        self._delete_stale(result, seen.edge_names, seen.connector_names, mesh, seen.configmaps, seen.secrets)
        for error in result.errors:
            self._event(error, by_name.get(error.node))
        return result

    # -- writers ---------------------------------------------------------------------------------

    def _roll_ca(self, secret: dict[str, Any], secrets: dict[str, dict[str, Any]],
                 now: datetime.datetime) -> ca_roll.CAState | None:
        """The CA state for this pass, after taking the roll's next step if one is due.

        None: the write lost a race with another writer (the caller replans from fresh state).
        """
        state = ca_roll.state_from_secret(secret)
        lifetime = datetime.timedelta(days=self.settings.cert_lifetime_days)
        old_left = state.phase is ca_roll.Phase.SIGN_NEXT and any(
            o.unb64((s.get("data") or {}).get("tls.crt")) and
            not issued_by(state.signer.cert_pem, o.unb64(s["data"]["tls.crt"]))
            for name, s in secrets.items() if name != o.CA_SECRET)
        step = ca_roll.decide(state, now, requested=ca_roll.requested(secret),
                              due=ca_needs_rotation(state.signer, now=now, leaf_lifetime=lifetime),
                              settle=datetime.timedelta(seconds=self.settings.ca_roll_settle_s),
                              old_leaves_left=old_left)
        if step is ca_roll.Step.NONE:
            return state
        next_ca = None
        if step is ca_roll.Step.START:
            next_ca = new_ca(now=now, lifetime=datetime.timedelta(days=self.settings.ca_lifetime_days))
        after = ca_roll.advance(state, step, now, next_ca)
        data, annotations = ca_roll.secret_data(after)
        body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {**secret["metadata"],
                             "annotations": {k: v for k, v in {**(secret["metadata"].get("annotations") or {}),
                                                               **annotations}.items() if v is not None}},
                "data": data}
        try:
            self.kube.replace("secrets", body, self.ns)
        except ApiError as exc:
            if exc.conflict:
                return None
            raise
        log.info("action=ca-roll step=%s phase=%s secret=%s/%s", step.value, after.phase.value, self.ns, o.CA_SECRET)
        return after

    def _create_ca(self, now: datetime.datetime) -> KeyPair:
        ca = new_ca(now=now, lifetime=datetime.timedelta(days=self.settings.ca_lifetime_days))
        body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": o.metadata(o.CA_SECRET, self.ns, "ca"),
                "data": {"tls.crt": o.b64(ca.cert_pem), "tls.key": o.b64(ca.key_pem)}}
        try:
            self.kube.create("secrets", body, self.ns)
        except ApiError as exc:
            if not exc.conflict:
                raise
            theirs = ca_from_secret(self.kube.get("secrets", o.CA_SECRET, self.ns))  # another writer won
            assert theirs is not None
            return theirs
        log.info("action=create-ca secret=%s/%s", self.ns, o.CA_SECRET)
        return ca

    def _guarded(self, result: PassResult, node: str | None, kind: str, name: str,
                 write: Callable[[], object]) -> bool:
        """Run one object's write; an API refusal becomes that node's error, not the pass's end.

        The error is an InvalidNode whose field is ``kind/name``, so it reaches the same Warning
        Event (``FabmeshInvalidNode``) that ``kubectl fabmesh doctor`` already reports.
        """
        try:
            write()
        except ApiError as exc:
            status_reason, message = _refusal(exc)
            log.warning("node=%s object=%s/%s/%s status=%d reason=%s: %s", node or "-", kind, self.ns, name,
                        exc.status, status_reason, message)
            if node:
                result.errors.append(InvalidNode(node, f"{kind}/{name}",
                                                 f"the API server refused the write ({exc.status} {status_reason}): "
                                                 f"{message}"))
            return False
        return True

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

    def _write_secret(self, secret_name: str, node: NodeInfo, leaf: KeyPair, bundle: str,
                      current: dict[str, Any] | None) -> None:
        body = o.tls_secret(secret_name, self.ns, "tls", leaf.cert_pem, leaf.key_pem, bundle,
                            node.name, node.uid)
        if current is None:
            self.kube.create("secrets", body, self.ns)
        else:
            body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            self.kube.replace("secrets", body, self.ns)

    def _sync_configmap(self, result: PassResult, node: str | None, body: dict[str, Any],
                        existing: dict[str, dict[str, Any]]) -> None:
        name = body["metadata"]["name"]
        current = existing.get(name)
        if current is not None and current.get("data") == body["data"] and \
                current["metadata"].get("labels") == body["metadata"]["labels"]:
            return

        def write() -> None:
            if current is None:
                self.kube.create("configmaps", body, self.ns)
            else:
                body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                self.kube.replace("configmaps", body, self.ns)

        if self._guarded(result, node, "configmaps", name, write):
            log.info("action=%s configmap=%s/%s bytes=%d", "create" if current is None else "update", self.ns,
                     name, sum(len(v) for v in body["data"].values()))

    def _patch_node(self, result: PassResult, node: NodeInfo, patch: NodePatch) -> None:
        body: dict[str, Any] = {"metadata": {"resourceVersion": node.resource_version}}
        if patch.annotations:
            body["metadata"]["annotations"] = dict(patch.annotations)
        if patch.spec_pod_cidr:
            body["spec"] = {"podCIDR": patch.spec_pod_cidr, "podCIDRs": [patch.spec_pod_cidr]}
        if patch.finalizers:
            body["metadata"]["finalizers"] = list(patch.finalizers)  # a merge patch replaces the whole list

        def write() -> None:
            try:
                self.kube.merge_patch("nodes", node.name, body)
            except ApiError as exc:
                if not exc.conflict:
                    raise
                result.retry = True  # the Node changed under us; the next pass sees the new version
                return
            log.info("node=%s action=annotate keys=%s%s%s", node.name, ",".join(sorted(patch.annotations)),
                     " spec.podCIDR=" + patch.spec_pod_cidr if patch.spec_pod_cidr else "",
                     " finalizers=" + ",".join(patch.finalizers) if patch.finalizers else "")

        self._guarded(result, node.name, "nodes", node.name, write)

    def release_flannel(self, result: PassResult, release: Release) -> None:
        """One step of letting go of a Node's copied flannel keys (``flannel.py``), guarded by resourceVersion.

        A conflict means the Node changed: the next pass plans again from what is there. After a strip,
        the Node watch brings that pass, and it removes the finalizer.
        """
        body: dict[str, Any] = {"metadata": {"resourceVersion": release.resource_version}}
        if release.step is Step.STRIP:
            body["metadata"]["annotations"] = dict.fromkeys(release.remove)  # null deletes a key
        else:
            body["metadata"]["finalizers"] = list(release.finalizers) or None

        def write() -> None:
            try:
                self.kube.merge_patch("nodes", release.node, body)
            except ApiError as exc:
                if exc.not_found:
                    return
                if not exc.conflict:
                    raise
                result.retry = True
                return
            log.info("node=%s action=%s reason=%s%s%s", release.node, release.step.value, release.why.value,
                     " keys=" + ",".join(release.remove) if release.remove else "",
                     " kept=" + ",".join(release.kept) if release.kept else "")

        self._guarded(result, release.node, "nodes", release.node, write)

    def _sync_pods(self, result: PassResult, want: dict[str, dict[str, Any]], role_names: set[str],
                   pods: dict[str | None, dict[str, Any]]) -> None:
        """Create each wanted Pod, replace one whose spec changed, delete those of Nodes without the role."""
        for node, body in sorted(want.items()):
            current = pods.get(node)
            if current is not None:
                if current["metadata"].get("annotations", {}).get(o.SPEC_HASH) == \
                        body["metadata"]["annotations"][o.SPEC_HASH]:
                    continue
                if not current["metadata"].get("deletionTimestamp"):  # Pod specs are immutable
                    old = current["metadata"]["name"]
                    if not self._guarded(result, node, "pods", old, lambda p=old: self.kube.delete("pods", p, self.ns)):
                        continue
                    log.info("node=%s action=delete-pod pod=%s/%s reason=spec-changed", node, self.ns, old)
            self._guarded(result, node, "pods", body["metadata"]["name"], lambda n=node, b=body: self._create_pod(n, b))
        for node, pod in sorted(pods.items(), key=lambda item: item[0] or ""):
            if node not in role_names:  # a node in error keeps its running Pod
                # The Node is gone (or lost its role): as the pod GC controller would, do not wait
                # for a kubelet that may never confirm.
                name = pod["metadata"]["name"]
                if self._guarded(result, node, "pods", name,
                                 lambda n=name: self.kube.delete("pods", n, self.ns, grace_period_s=0)):
                    log.info("node=%s action=delete-pod pod=%s/%s", node, self.ns, name)

    def _create_pod(self, node: str, body: dict[str, Any]) -> None:
        try:
            self.kube.create("pods", body, self.ns)
        except ApiError as exc:
            if not exc.conflict:
                raise
            log.debug("node=%s pod=%s/%s: the old Pod is still terminating; creating it next pass", node, self.ns,
                      body["metadata"]["name"])
            return
        log.info("node=%s action=create-pod pod=%s/%s", node, self.ns, body["metadata"]["name"])

    def _delete_stale(self, result: PassResult, edge_names: set[str], connector_names: set[str], mesh: MeshPlan,
                      configmaps: dict[str, Any], secrets: dict[str, Any]) -> None:
        """Delete what belongs to Nodes that are gone or lost their role label (no GC is assumed).

        A node that still carries its label keeps its objects even while it is in error:
        a bad label must not tear down a working node.
        """
        keep_cm = {o.IPAM_CONFIGMAP, o.CLOUD_ROUTES_CONFIGMAP, *(o.agent_configmap_name(n) for n in edge_names)}
        keep_secret = {o.CA_SECRET, *(o.tls_secret_name(n) for n in edge_names),
                       *(o.connector_secret_name(n) for n in connector_names)}
        if mesh.connector is not None:
            keep_cm |= {o.CONNECTOR_CONFIGMAP, *(o.connector_shard_name(i) for i in mesh.connector_shards)}
        for kind, objs, keep in (("configmaps", configmaps, keep_cm), ("secrets", secrets, keep_secret)):
            for name in sorted(set(objs) - keep):
                node = (objs[name]["metadata"].get("labels") or {}).get(o.NODE_LABEL)
                if self._guarded(result, node, kind, name, lambda k=kind, n=name: self.kube.delete(k, n, self.ns)):
                    log.info("action=delete %s=%s/%s reason=node-gone-or-role-removed", kind[:-1], self.ns, name)

    def _event(self, error: InvalidNode, node: NodeInfo | None) -> None:
        """One Warning Event per (node, field, reason): a deterministic name makes it idempotent."""
        key = hashlib.sha256(f"{error.node}|{error.field}|{error.reason}".encode()).hexdigest()[:10]
        name = f"{error.node}.fabmesh.{key}"
        if name in self._emitted:
            self._emitted.move_to_end(name)
            return
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
            if not exc.conflict:  # Events are best effort: the next pass tries again
                log.warning("node=%s object=events/%s/%s status=%d reason=%s: cannot record %s",
                            error.node, EVENTS_NAMESPACE, name, exc.status, exc.reason, error.field)
                return
            self._remember(name)
            return
        self._remember(name)
        log.warning("node=%s field=%s: %s", error.node, error.field, error.reason)

    def _remember(self, name: str) -> None:
        self._emitted[name] = None
        if len(self._emitted) > EMITTED_MAX:
            self._emitted.popitem(last=False)


def _refusal(exc: ApiError) -> tuple[str, str]:
    """The API server's Status reason and message (``Forbidden``, ``Invalid``...), else the HTTP reason."""
    try:
        status = json.loads(exc.body)
    except ValueError:
        status = None
    if isinstance(status, dict):
        return str(status.get("reason") or exc.reason), str(status.get("message") or "").strip()
    return exc.reason, exc.body[:300].strip()
