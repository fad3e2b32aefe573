"""What the operator reports on each edge Node: the ``fabmesh.io/status`` annotation (pure).

The annotation is one line a person (and ``kubectl fabmesh``) reads: the node's
pod CIDR, its communities and when its certificate expires. The expiry is only
known once the certificates are settled (a leaf may be issued in this very
pass), so this step runs after certificate issuing and before the Node writes,
and folds the annotation into each node's :class:`NodePatch`, only where it
differs from what the Node already carries.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from fabmesh.mesh.model import LocalNode
from fabmesh.mesh.names import STATUS_ANNOTATION
from fabmesh.operator.inventory import NodeInfo
from fabmesh.operator.plan import MeshPlan, NodePatch


def status_text(node: LocalNode, expiry: str | None) -> str:
    return f"cidr={node.pod_cidr} communities={','.join(node.communities) or '-'} cert-expires={expiry or 'none'}"


def node_writes(mesh: MeshPlan, nodes: Mapping[str, NodeInfo], expiry: Mapping[str, str]) -> dict[str, NodePatch]:
    """Every edge Node's patch: the plan's annotations and spec.podCIDR plus the status, if it changed.

    Nodes with nothing to change are left out.
    """
    patches = {}
    for name, node_mesh in sorted(mesh.edges.items()):
        if nodes[name].deleting:
            continue  # nothing is added to a Node being deleted: the flannel release is its only write
        patch = mesh.node_patches.get(name) or NodePatch()
        annotations = dict(patch.annotations)
        status = status_text(node_mesh.node, expiry.get(name))
        if nodes[name].annotations.get(STATUS_ANNOTATION) != status:
            annotations[STATUS_ANNOTATION] = status
        if annotations or patch.spec_pod_cidr or patch.finalizers:
            patches[name] = replace(patch, annotations=annotations)
    return patches
