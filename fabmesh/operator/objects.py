"""The Kubernetes objects the operator owns, rendered as plain dicts (pure).

Names, labels and owner references live here so every writer and reader agrees
on them. Why one agent Pod per edge node rather than a DaemonSet: a DaemonSet's
template cannot mount a *per-node* ConfigMap and Secret, and mounting all of
them would hand every edge node every other node's private key. A Pod per node
mounts exactly its own two objects and carries no ServiceAccount token.

Each such node also gets an identity of its own for one purpose: a ServiceAccount
``fabmesh-node-<node>``, a Role that may get/update/patch only the ``status`` of
``TunnelStatus/<node>`` (by ``resourceNames``), and their RoleBinding. The Pod
mounts a projected, short-lived token of that ServiceAccount and nothing else
(``automountServiceAccountToken`` stays false). The operator creates the
``TunnelStatus`` object itself, so the node never needs ``create``.

Connectors follow the same rule: each labelled connector node has its own key
(Secret ``fabmesh-connector-tls-<node>``) and its own Pod mounting only that
Secret plus the connector's ConfigMaps, so a connector node that is compromised
holds its own key, never another connector's. Standbys get their key and Pod
up front (failover issues nothing); their loop stays idle while ``mesh.yaml``
names another node (``--node-name``).
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from fabmesh.mesh import tunnelstatus
from fabmesh.mesh.names import KIND_LABEL, MANAGED_BY, NODE_LABEL, POD_ANNOTATIONS_FILE, POD_INFO_DIR
from fabmesh.mesh.names import SPEC_HASH_ANNOTATION as SPEC_HASH
from fabmesh.operator.settings import NodePods, OperatorSettings

CA_SECRET = "fabmesh-ca"
IPAM_CONFIGMAP = "fabmesh-ipam"
CONNECTOR_CONFIGMAP = "fabmesh-connector"
CONNECTOR_SECRET_PREFIX = "fabmesh-connector-tls-"
CONNECTOR_SHARD_PREFIX = "fabmesh-connector-peers-"
# Read by the route agent on every cloud node (the chart's DaemonSet mounts it; it holds no secret).
CLOUD_ROUTES_CONFIGMAP = "fabmesh-cloud-routes"


def agent_configmap_name(node: str) -> str:
    return f"fabmesh-agent-{node}"


def tls_secret_name(node: str) -> str:
    return f"fabmesh-tls-{node}"


def connector_secret_name(node: str) -> str:
    return f"{CONNECTOR_SECRET_PREFIX}{node}"


def agent_pod_name(node: str) -> str:
    return f"fabmesh-agent-{node}"


def connector_pod_name(node: str) -> str:
    return f"fabmesh-connector-{node}"


def connector_shard_name(shard: int) -> str:
    return f"{CONNECTOR_SHARD_PREFIX}{shard:02d}"


def node_account_name(node: str) -> str:
    return f"fabmesh-node-{node}"


def status_role_name(node: str) -> str:
    return f"fabmesh-status-{node}"


STATUS_TOKEN_DIR = "/var/run/secrets/fabmesh.io/status"
TERMINATION_LOG = "/dev/termination-log"  # the containers' default terminationMessagePath
STATUS_VERBS = ("get", "patch", "update")


def node_account(node: str, uid: str, namespace: str) -> dict[str, Any]:
    """The node's ServiceAccount; its tokens are only ever projected into its own Pod."""
    return {"apiVersion": "v1", "kind": "ServiceAccount", "automountServiceAccountToken": False,
            "metadata": metadata(node_account_name(node), namespace, "node-identity", node, uid)}


def status_role(node: str, uid: str, namespace: str) -> dict[str, Any]:
    """get/update/patch of this node's TunnelStatus ``status`` and nothing else: no create, list or watch."""
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": metadata(status_role_name(node), namespace, "node-identity", node, uid),
            "rules": [{"apiGroups": [tunnelstatus.GROUP], "resources": [tunnelstatus.SUBRESOURCE],
                       "resourceNames": [node], "verbs": list(STATUS_VERBS)}]}


def status_role_binding(node: str, uid: str, namespace: str) -> dict[str, Any]:
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": metadata(status_role_name(node), namespace, "node-identity", node, uid),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": status_role_name(node)},
            "subjects": [{"kind": "ServiceAccount", "name": node_account_name(node), "namespace": namespace}]}


def tunnel_status(node: str, uid: str, namespace: str, role: str) -> dict[str, Any]:
    """The empty TunnelStatus the node fills in (its ``status``)."""
    return {"apiVersion": tunnelstatus.API_VERSION, "kind": tunnelstatus.KIND,
            "metadata": metadata(node, namespace, "tunnel-status", node, uid),
            "spec": {"node": node, "role": role}}


def owner(node: str, uid: str) -> list[dict[str, Any]]:
    return [{"apiVersion": "v1", "kind": "Node", "name": node, "uid": uid}] if uid else []


def metadata(name: str, namespace: str, kind: str, node: str | None = None,
             uid: str = "") -> dict[str, Any]:
    labels = {**MANAGED_BY, KIND_LABEL: kind}
    if node:
        labels[NODE_LABEL] = node
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels}
    if node and uid:
        meta["ownerReferences"] = owner(node, uid)
    return meta


def configmap(name: str, namespace: str, kind: str, data: dict[str, str], node: str | None = None,
              uid: str = "") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": metadata(name, namespace, kind, node, uid), "data": data}


def tls_secret(name: str, namespace: str, kind: str, cert: str, key: str, ca: str,
               node: str | None = None, uid: str = "") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": metadata(name, namespace, kind, node, uid),
            "data": {"tls.crt": b64(cert), "tls.key": b64(key), "ca.crt": b64(ca)}}


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def unb64(text: str | None) -> str:
    return base64.b64decode(text or "").decode()


def agent_pod(node: str, uid: str, settings: OperatorSettings) -> dict[str, Any]:
    """The agent Pod for one edge node: host network, NET_ADMIN, its own config, no API token."""
    images = settings.agent_pods
    args = ["agent", *_node_args(images.metrics_port, images.metrics_address)]
    mounts = [{"name": "cni", "mountPath": settings.node.cni_conf_dir}]
    volumes = [{"name": "mesh", "configMap": {"name": agent_configmap_name(node)}},
               {"name": "tls", "secret": {"secretName": tls_secret_name(node), "defaultMode": 0o400}},
               {"name": "cni", "hostPath": {"path": settings.node.cni_conf_dir, "type": "DirectoryOrCreate"}}]
    return _node_pod(agent_pod_name(node), "agent", node, uid, settings, images, args, mounts, volumes)


def _status_volume(expiration_s: int) -> dict[str, Any]:
    """The node ServiceAccount's token, bound to the Pod and to the API server's audience, rotated by kubelet.

    ``kube-root-ca.crt`` is the CA bundle kube-controller-manager publishes in every namespace.
    """
    return {"name": "status-token", "projected": {"defaultMode": 0o400, "sources": [
        {"serviceAccountToken": {"path": "token", "expirationSeconds": expiration_s}},
        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}}]}}


def connector_pod(node: str, uid: str, address: str, settings: OperatorSettings) -> dict[str, Any]:
    """The connector Pod for one connector node: like the agent's, with its own Secret and no CNI.

    It mounts ``fabmesh-connector`` (the active connector's header) and every peer shard, which
    every connector may read (they hold names and subnets, no keys), plus only its own Secret.
    ``--node-name`` tells the loop which node it runs on: while ``mesh.yaml`` names another
    node it is a standby and loads nothing. Its metrics bind to the node's own ``address``
    (unless the settings name one): mesh.yaml's address is the active connector's.
    """
    pods = settings.connector_pods
    args = ["connector", *_node_args(pods.metrics_port, pods.metrics_address or address),
            *(["--uplink", pods.uplink] if pods.uplink else []), "--node-name", node]
    # mesh.yaml plus one peers-NN.yaml per shard (the operator writes every shard, even empty ones).
    # Shards are optional so a pass still writing them never blocks the Pod; without mesh.yaml or
    # the Secret the Pod waits, as it has nothing to answer with.
    sources = [{"configMap": {"name": CONNECTOR_CONFIGMAP, "items": [{"key": "mesh.yaml", "path": "mesh.yaml"}]}},
               *({"configMap": {"name": connector_shard_name(i), "optional": True,
                                "items": [{"key": "peers.yaml", "path": f"peers-{i:02d}.yaml"}]}}
                 for i in range(settings.connector_shards))]
    volumes = [{"name": "mesh", "projected": {"sources": sources}},
               {"name": "tls", "secret": {"secretName": connector_secret_name(node), "defaultMode": 0o400}}]
    return _node_pod(connector_pod_name(node), "connector", node, uid, settings, pods, args, [], volumes)


def _node_args(metrics_port: int, metrics_address: str) -> list[str]:
    return ["--config-dir", "/etc/fabmesh/mesh", "--tls-dir", "/etc/fabmesh/tls",
            "--status-token-file", f"{STATUS_TOKEN_DIR}/token", "--status-ca-file", f"{STATUS_TOKEN_DIR}/ca.crt",
            "--vici-socket", "/var/run/fabmesh/charon.vici", "--state-dir", "/var/run/fabmesh",
            "--teardown-file", POD_ANNOTATIONS_FILE, "--termination-log", TERMINATION_LOG,
            "--metrics-port", str(metrics_port), *(["--metrics-address", metrics_address] if metrics_address else [])]


def _node_pod(name: str, role: str, node: str, uid: str, settings: OperatorSettings, images: NodePods,
              args: list[str], mounts: list[dict[str, Any]], volumes: list[dict[str, Any]]) -> dict[str, Any]:
    """A host-network Pod pinned to ``node``: the ``role`` container plus charon, nothing writable but volumes."""
    caps = {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}
    mounts_common = [{"name": "run", "mountPath": "/var/run/fabmesh"}]
    main: dict[str, Any] = {
        "name": role, "image": images.image, "imagePullPolicy": images.image_pull_policy,
        "args": [args[0], "--status-namespace", settings.namespace,
                 *(["--status-server", images.status_server] if images.status_server else []), *args[1:]],
        "securityContext": hardened(caps),
        "resources": images.resources.to_api(),
        "volumeMounts": [*mounts_common, {"name": "tmp", "mountPath": "/tmp"},
                         {"name": "mesh", "mountPath": "/etc/fabmesh/mesh", "readOnly": True},
                         {"name": "tls", "mountPath": "/etc/fabmesh/tls", "readOnly": True},
                         {"name": "status-token", "mountPath": STATUS_TOKEN_DIR, "readOnly": True},
                         {"name": "pod-info", "mountPath": POD_INFO_DIR, "readOnly": True},
                         *mounts, {"name": "xtables-lock", "mountPath": "/run/xtables.lock"}]}
    spec: dict[str, Any] = {
        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
        "nodeName": node,
        "hostNetwork": True,
        "dnsPolicy": "ClusterFirstWithHostNet",
        "serviceAccountName": node_account_name(node),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "priorityClassName": "system-node-critical",
        "tolerations": [{"operator": "Exists"}],
        "containers": [
            main,
            {"name": "strongswan", "image": images.strongswan_image,
             "imagePullPolicy": images.image_pull_policy,
             "args": ["charon", "--run-dir", "/var/run/fabmesh", "--backend", settings.tunnel.backend.value,
                      "--ignore-interface", settings.node.bridge],
             "securityContext": hardened({"add": ["NET_ADMIN", "NET_RAW", "NET_BIND_SERVICE"], "drop": ["ALL"]}),
             "resources": images.strongswan_resources.to_api(),
             # charon refuses to start without its pid file, /var/run/charon.pid (compiled in).
             "volumeMounts": [{"name": "charon-run", "mountPath": "/var/run"}, *mounts_common]},
        ],
        "volumes": [
            {"name": "run", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "16Mi"}},
            {"name": "charon-run", "emptyDir": {"sizeLimit": "1Mi"}},
            *volumes,
            _status_volume(images.status_token_expiration_s),
            # Its own annotations: fabmesh.io/teardown there is the uninstall (fabmesh/node/teardown.py).
            {"name": "pod-info", "downwardAPI": {"items": [
                {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}}]}},
            {"name": "xtables-lock", "hostPath": {"path": "/run/xtables.lock", "type": "FileOrCreate"}},
        ],
    }
    if settings.tunnel.backend.value == "libipsec":  # userspace ESP needs a TUN device from the host
        spec["volumes"].append({"name": "tun", "hostPath": {"path": "/dev/net/tun", "type": "CharDevice"}})
        spec["containers"][1]["volumeMounts"].append({"name": "tun", "mountPath": "/dev/net/tun"})
    meta = metadata(name, settings.namespace, role, node, uid)
    meta["annotations"] = {SPEC_HASH: spec_hash(spec)}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def hardened(capabilities: dict[str, list[str]]) -> dict[str, Any]:
    """A container's securityContext: the capabilities it needs and nothing else.

    ``allowPrivilegeEscalation: false`` (no_new_privs) does not take capabilities away from a root
    process; it stops a setuid binary from gaining more. The root filesystem is read-only: every
    path a process writes is an emptyDir or an explicit hostPath.
    """
    return {"capabilities": capabilities, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True}


def spec_hash(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
