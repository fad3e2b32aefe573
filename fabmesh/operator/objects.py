"""The Kubernetes objects the operator owns, rendered as plain dicts (pure).

Names, labels and owner references live here so every writer and reader agrees
on them. Why one agent Pod per edge node rather than a DaemonSet: a DaemonSet's
template cannot mount a *per-node* ConfigMap and Secret, and mounting all of
them would hand every edge node every other node's private key. A Pod per node
mounts exactly its own two objects and carries no ServiceAccount token.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from fabmesh.mesh.names import KIND_LABEL, MANAGED_BY, NODE_LABEL
from fabmesh.mesh.names import SPEC_HASH_ANNOTATION as SPEC_HASH
from fabmesh.operator.settings import OperatorSettings

CA_SECRET = "fabmesh-ca"
IPAM_CONFIGMAP = "fabmesh-ipam"
CONNECTOR_CONFIGMAP = "fabmesh-connector"
CONNECTOR_SECRET = "fabmesh-connector-tls"


def agent_configmap_name(node: str) -> str:
    return f"fabmesh-agent-{node}"


def tls_secret_name(node: str) -> str:
    return f"fabmesh-tls-{node}"


def agent_pod_name(node: str) -> str:
    return f"fabmesh-agent-{node}"


def connector_shard_name(shard: int) -> str:
    return f"fabmesh-connector-peers-{shard:02d}"


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
    ns = settings.namespace
    images = settings.agent_pods
    caps = {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}
    mounts_common = [{"name": "run", "mountPath": "/var/run/fabmesh"}]
    spec: dict[str, Any] = {
        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
        "nodeName": node,
        "hostNetwork": True,
        "dnsPolicy": "ClusterFirstWithHostNet",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "priorityClassName": "system-node-critical",
        "tolerations": [{"operator": "Exists"}],
        "containers": [
            {"name": "agent", "image": images.image, "imagePullPolicy": images.image_pull_policy,
             "args": ["agent", "--config-dir", "/etc/fabmesh/mesh", "--tls-dir", "/etc/fabmesh/tls",
                      "--vici-socket", "/var/run/fabmesh/charon.vici", "--state-dir", "/var/run/fabmesh",
                      "--metrics-port", str(images.metrics_port),
                      *(["--metrics-address", images.metrics_address] if images.metrics_address else [])],
             "securityContext": hardened(caps),
             "resources": images.resources.to_api(),
             "volumeMounts": [*mounts_common, {"name": "tmp", "mountPath": "/tmp"},
                              {"name": "mesh", "mountPath": "/etc/fabmesh/mesh", "readOnly": True},
                              {"name": "tls", "mountPath": "/etc/fabmesh/tls", "readOnly": True},
                              {"name": "cni", "mountPath": settings.node.cni_conf_dir},
                              {"name": "xtables-lock", "mountPath": "/run/xtables.lock"}]},
            {"name": "strongswan", "image": images.strongswan_image,
             "imagePullPolicy": images.image_pull_policy,
             "args": ["charon", "--run-dir", "/var/run/fabmesh", "--backend", settings.tunnel.backend.value],
             "securityContext": hardened({"add": ["NET_ADMIN", "NET_RAW", "NET_BIND_SERVICE"], "drop": ["ALL"]}),
             "resources": images.strongswan_resources.to_api(),
             # charon refuses to start without its pid file, /var/run/charon.pid (compiled in).
             "volumeMounts": [{"name": "charon-run", "mountPath": "/var/run"}, *mounts_common]},
        ],
        "volumes": [
            {"name": "run", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "16Mi"}},
            {"name": "charon-run", "emptyDir": {"sizeLimit": "1Mi"}},
            {"name": "mesh", "configMap": {"name": agent_configmap_name(node)}},
            {"name": "tls", "secret": {"secretName": tls_secret_name(node), "defaultMode": 0o400}},
            {"name": "cni", "hostPath": {"path": settings.node.cni_conf_dir, "type": "DirectoryOrCreate"}},
            {"name": "xtables-lock", "hostPath": {"path": "/run/xtables.lock", "type": "FileOrCreate"}},
        ],
    }
    if settings.tunnel.backend.value == "libipsec":  # userspace ESP needs a TUN device from the host
        spec["volumes"].append({"name": "tun", "hostPath": {"path": "/dev/net/tun", "type": "CharDevice"}})
        spec["containers"][1]["volumeMounts"].append({"name": "tun", "mountPath": "/dev/net/tun"})
    meta = metadata(agent_pod_name(node), ns, "agent", node, uid)
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
