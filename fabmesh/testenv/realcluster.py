"""What a cluster of real nodes needs before fabmesh, and the ``helm install`` that adds it.

Shared by the nodes-tier tests (tests/nodes/test_helm_install.py) and ``fabmesh lab up --nodes real``
(:mod:`fabmesh.lab.realnodes`), so both install fabmesh the same way: the product image built here
(:mod:`fabmesh.testenv.product_image`) with ``pullPolicy=Never``, one operator replica, userspace
ESP (this box's kernel has no ESP).
"""

from __future__ import annotations

from fabmesh.kube.client import Kube
from fabmesh.testenv.product_image import ProductImage

NAMESPACE = "fabmesh-system"


def node_ready(admin: Kube, name: str) -> bool:
    """The Node's Ready condition is True (False when it is missing or not registered yet)."""
    node = admin.get("nodes", name)
    conditions = (node or {}).get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def publish_api_endpoint(admin: Kube, address: str, port: int) -> None:
    """The ``kubernetes`` Service's EndpointSlice, naming where Pods reach the API server.

    The lab's API server runs with ``--endpoint-reconciler-type none`` (it listens on the box's
    loopback, or on a lab host's address it does not advertise), so nothing else writes it; Pods
    (the operator) dial the Service's ClusterIP and kube-proxy sends them here.
    """
    admin._call("POST", "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices", {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "kubernetes", "labels": {
            "kubernetes.io/service-name": "kubernetes",
            "endpointslice.kubernetes.io/managed-by": "fabmesh-tests"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [address], "conditions": {"ready": True}}],
        "ports": [{"name": "https", "port": port, "protocol": "TCP"}]})


def install_values(image: ProductImage, cni_conf_dir: str) -> list[str]:
    """``helm install`` flags: the built image (never pulled), one operator, userspace ESP, and the
    CNI config directory the agent Pods write to (each lab node has its own: the box's is shared)."""
    return ["--set", f"image.repository={image.repository}",
            "--set-string", f"image.tag={image.tag}",
            "--set", "image.pullPolicy=Never",
            "--set", "operator.replicas=1",
            # The host kernel here has no ESP: userspace ESP (charon's libipsec, a TUN device).
            "--set", "operator.settings.tunnel.backend=libipsec",
            "--set", f"operator.settings.node.cni_conf_dir={cni_conf_dir}"]
