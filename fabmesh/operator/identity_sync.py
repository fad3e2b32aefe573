"""Each node's own identity and status object: ServiceAccount, Role, RoleBinding and TunnelStatus.

Created for every edge and connector the operator serves (before its Pod, which
names the ServiceAccount), deleted with the node's other objects when the node
is gone or loses its role label. Like the other writers it compares first, so an
unchanged cluster costs four lists and no write.

Least privilege for the operator itself: RBAC lets a subject create a Role only
with permissions it holds, and bind a Role only if it holds what the Role grants
(or has ``escalate``/``bind``). The operator holds get/update/patch on
``tunnelstatuses/status`` in its namespace, which is exactly what these Roles
grant, so it needs neither ``escalate`` nor ``bind``: it cannot hand out anything
it does not have (charts/fabmesh/templates/operator-status-rbac.yaml).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from fabmesh.kube.client import ApiError, Kube
from fabmesh.mesh.names import KIND_LABEL, MANAGED_SELECTOR
from fabmesh.operator import objects as o

log = logging.getLogger(__name__)
Guard = Callable[[str | None, str, str, Callable[[], object]], bool]
KINDS = ("serviceaccounts", "roles", "rolebindings", "tunnelstatuses")
_LABEL_KIND = {"serviceaccounts": "node-identity", "roles": "node-identity", "rolebindings": "node-identity",
               "tunnelstatuses": "tunnel-status"}


def wanted(nodes: Mapping[str, tuple[str, str]], namespace: str) -> dict[str, dict[str, dict[str, Any]]]:
    """kind -> name -> body for ``nodes`` (name -> (uid, role)) (pure)."""
    out: dict[str, dict[str, dict[str, Any]]] = {k: {} for k in KINDS}
    for node, (uid, role) in sorted(nodes.items()):
        for kind, body in (("serviceaccounts", o.node_account(node, uid, namespace)),
                           ("roles", o.status_role(node, uid, namespace)),
                           ("rolebindings", o.status_role_binding(node, uid, namespace)),
                           ("tunnelstatuses", o.tunnel_status(node, uid, namespace, role))):
            out[kind][body["metadata"]["name"]] = body
    return out


_COMPARED = {"serviceaccounts": ("automountServiceAccountToken",), "roles": ("rules",),
             "rolebindings": ("roleRef", "subjects"), "tunnelstatuses": ("spec",)}


def differs(kind: str, current: Mapping[str, Any], body: Mapping[str, Any]) -> bool:
    if (current.get("metadata") or {}).get("labels") != body["metadata"]["labels"]:
        return True
    return any(current.get(key) != body.get(key) for key in _COMPARED[kind])


class IdentitySync:
    def __init__(self, kube: Kube, namespace: str, guarded: Guard, warned: set[str]) -> None:
        """``warned`` outlives one pass: what was already logged once (a missing CRD) is not logged again."""
        self.kube, self.ns, self.guarded, self.warned = kube, namespace, guarded, warned

    def _list(self, kind: str) -> dict[str, dict[str, Any]] | None:
        selector = f"{MANAGED_SELECTOR},{KIND_LABEL}={_LABEL_KIND[kind]}"
        try:
            return {x["metadata"]["name"]: x for x in self.kube.list(kind, self.ns, selector)}
        except ApiError as exc:
            if exc.not_found and kind == "tunnelstatuses":
                if "no-crd" not in self.warned:
                    log.warning("the TunnelStatus CRD is not installed: nodes publish no tunnel state "
                                "(install it with the chart)")
                    self.warned.add("no-crd")
                return None
            raise

    def sync(self, nodes: Mapping[str, tuple[str, str]], keep: set[str]) -> None:
        """Make the objects of ``nodes`` exist as built; delete those of nodes not in ``keep``."""
        want = wanted(nodes, self.ns)
        for kind in KINDS:
            current = self._list(kind)
            if current is None:
                continue
            for name, body in want[kind].items():
                node = body["metadata"]["labels"][o.NODE_LABEL]
                have = current.get(name)
                if have is not None and not differs(kind, have, body):
                    continue
                self.guarded(node, kind, name, lambda k=kind, b=body, h=have: self._write(k, b, h))
            for name, obj in sorted(current.items()):
                node = (obj["metadata"].get("labels") or {}).get(o.NODE_LABEL)
                if name in want[kind] or node in keep:
                    continue
                if self.guarded(node, kind, name, lambda k=kind, n=name: self.kube.delete(k, n, self.ns)):
                    log.info("node=%s action=delete %s=%s/%s reason=node-gone-or-role-removed", node, kind[:-1],
                             self.ns, name)

    def _write(self, kind: str, body: dict[str, Any], current: dict[str, Any] | None) -> None:
        name = body["metadata"]["name"]
        node = body["metadata"]["labels"][o.NODE_LABEL]
        if current is not None and kind == "rolebindings" and current.get("roleRef") != body["roleRef"]:
            self.kube.delete(kind, name, self.ns)  # roleRef is immutable
            current = None
        if current is None:
            try:
                self.kube.create(kind, body, self.ns)
            except ApiError as exc:
                if not exc.conflict:
                    raise
                return  # created since we listed: the next pass compares it
            log.info("node=%s action=create %s=%s/%s", node, kind[:-1], self.ns, name)
            return
        body = {**body, "metadata": {**body["metadata"], "resourceVersion": current["metadata"]["resourceVersion"]}}
        self.kube.replace(kind, body, self.ns)
        log.info("node=%s action=update %s=%s/%s", node, kind[:-1], self.ns, name)
