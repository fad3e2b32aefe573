"""nodes-tier fixtures: a control plane and real kubelet + containerd nodes in lab namespaces.

Slow to build the first time (kubelet and friends are compiled once into ~/.cache/fabmesh),
so only this tier asks for them (``ensure_node_assets``); the api tier never does.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fabmesh.kube.client import Kube, load_api_client
from fabmesh.testenv.assets import ensure_flanneld, ensure_node_assets
from fabmesh.testenv.controlplane import ControlPlane
from fabmesh.testenv.hosts import Network, unique_prefix
from fabmesh.testenv.images import LocalImages, ensure_local_images
from fabmesh.testenv.kubenode import NodeLink
from tests.conftest import require_root_tools

# A /28 of TEST-NET-3 that no other tier uses; it lives only in the lab's namespaces (the WAN bridge
# holds the API relay's address), never in the root namespace.
NODE_WAN = "203.0.113.224/28"


@pytest.fixture(scope="session")
def node_binaries() -> Path:
    require_root_tools("go", "ip", "nsenter", "socat", "curl", "containerd", "containerd-shim-runc-v2", "runc", "ctr",
                       "/usr/lib/cni/bridge", "/bin/busybox")
    return ensure_node_assets()


@pytest.fixture(scope="session")
def local_images() -> LocalImages:
    return ensure_local_images()


@pytest.fixture(scope="module")
def control_plane(tmp_path_factory: pytest.TempPathFactory, node_binaries: Path) -> Iterator[ControlPlane]:
    cp = ControlPlane(directory=tmp_path_factory.mktemp("controlplane"))
    try:
        cp.start()
        cp.start_controllers(node_binaries)
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="module")
def admin(control_plane: ControlPlane) -> Kube:
    return Kube(load_api_client(str(control_plane.kubeconfig)))


@pytest.fixture(scope="module")
def node_network(tmp_path_factory: pytest.TempPathFactory, control_plane: ControlPlane) -> Iterator[
        tuple[Network, NodeLink]]:
    """The lab WAN for real nodes and the API server relayed into it (loopback and a unix socket only)."""
    directory = tmp_path_factory.mktemp("nodes")
    net = Network(prefix=unique_prefix("fmt"), directory=directory, wan_cidr=NODE_WAN).create()
    link = NodeLink(network=net, directory=directory / "link")
    try:
        link.start(control_plane)
        yield net, link
    finally:
        try:
            link.stop()
        finally:
            net.destroy()


@pytest.fixture(scope="session")
def flanneld_binary() -> Path:
    """flanneld at the pinned release, built once (``python -m fabmesh.testenv.assets --node`` builds it too)."""
    require_root_tools("go", "nsenter", "iptables", "bridge")
    return ensure_flanneld()
