"""Every Kubernetes key fabmesh reads or writes, defined once.

Labels a user puts on Nodes, annotations the operator records, the labels on
the objects the operator owns and the selectors that find them. The operator,
the kubectl plugin, the lab and the chart's tests all import them from here,
so a renamed key cannot drift between a writer and its readers.
"""

from __future__ import annotations

# -- labels a user sets on Nodes (defaults; the operator's settings may rename them) ---------------
# Role labels live where a kubelet cannot write them: the NodeRestriction admission plugin refuses a
# kubelet any change to labels in node-restriction.kubernetes.io/ and to kubernetes.io labels outside
# the kubelet's own set (node-role.kubernetes.io/ is not in it). A compromised node cannot make
# itself an edge of another's choosing or the connector. Community labels are kubelet-writable on
# purpose: joining a community gives a node direct tunnels, never another node's traffic.
EDGE_LABEL = "node-role.kubernetes.io/edge"
CONNECTOR_LABEL = "node-restriction.kubernetes.io/fabmesh-connector"
COMMUNITY_LABEL_PREFIX = "community.fabmesh.io/"
KUBELET_PROOF_NAMESPACE = "node-restriction.kubernetes.io"

# -- annotations on Nodes ---------------------------------------------------------------------------
POD_CIDR_ANNOTATION = "fabmesh.io/pod-cidr"  # written by the operator on edges
STATUS_ANNOTATION = "fabmesh.io/status"  # "cidr=... communities=a,b cert-expires=ISO"
FLANNEL_PREFIX = "flannel.alpha.coreos.com/"  # written by flanneld; copied from the connector onto edges
FLANNEL_KEYS = ("backend-type", "backend-data", "public-ip")
# flanneld's kube subnet manager ignores every Node without this marker (flanneld sets it on its own Node):
# the operator writes it on edges, next to the copied keys, or no cloud node routes their pod CIDRs.
FLANNEL_LEASE_MARKER = {"kube-subnet-manager": "true"}
# What the operator last copied onto an edge (JSON of the three keys): on release it strips only keys that
# still hold these values, never what a node's own flanneld wrote since (an edge turned cloud node).
FLANNEL_COPY_ANNOTATION = "fabmesh.io/flannel-copy"
# On every edge that carries copied flannel keys: its deletion waits until the operator has removed the
# marker (a separate, earlier write), so flanneld never sees a marked edge go and never drops the
# connector's shared FDB entry. See fabmesh/operator/flannel.py.
FLANNEL_FINALIZER = "fabmesh.io/flannel-release"

# -- labels on the objects the operator owns -------------------------------------------------------
MANAGED_BY_KEY = "app.kubernetes.io/managed-by"
MANAGED_BY = {MANAGED_BY_KEY: "fabmesh"}
MANAGED_SELECTOR = f"{MANAGED_BY_KEY}=fabmesh"
NODE_LABEL = "fabmesh.io/node"
KIND_LABEL = "fabmesh.io/kind"
SPEC_HASH_ANNOTATION = "fabmesh.io/spec-hash"
AGENT_SELECTOR = f"{MANAGED_SELECTOR},{KIND_LABEL}=agent"
CONNECTOR_SELECTOR = f"{MANAGED_SELECTOR},{KIND_LABEL}=connector"

# -- uninstall ---------------------------------------------------------------------------------------
# The uninstall hook sets this on every agent and connector Pod (value: one token per uninstall); the Pod
# reads its own annotations from a downward API file, removes what it programmed, and reports the token
# in its TunnelStatus (status.teardown). See fabmesh/node/teardown.py.
TEARDOWN_ANNOTATION = "fabmesh.io/teardown"
POD_INFO_DIR = "/etc/fabmesh/pod"
POD_ANNOTATIONS_FILE = f"{POD_INFO_DIR}/annotations"

# Nodes are cluster-scoped; Events about them go to this namespace, as kubelet's do.
EVENTS_NAMESPACE = "default"
INVALID_NODE_REASON = "FabmeshInvalidNode"
