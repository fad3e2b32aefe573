"""The CNI network configuration an edge agent writes for its node's pods (pure rendering).

bridge + host-local IPAM on the node's pod CIDR, then portmap (hostPort) and
loopback, as a conflist the container runtime (or the lab's CNI runner) feeds
to the reference plugins. The pod MTU is the tunnel MTU, so pods never send a
packet the tunnel must fragment. ``ipMasq`` stays off: the agent's own
iptables rules masquerade only traffic leaving the mesh, so the source pod IP
survives inside it.
"""

from __future__ import annotations

import ipaddress
import json

from fabmesh.mesh.model import NodeMesh

CNI_VERSION = "1.0.0"
NETWORK_NAME = "fabmesh"


def gateway(pod_cidr: str) -> str:
    return str(next(ipaddress.ip_network(pod_cidr).hosts()))


def render_conflist(mesh: NodeMesh, ipam_data_dir: str | None = None) -> str:
    assert mesh.node.pod_cidr, "only nodes with a pod CIDR run pods"
    net = ipaddress.ip_network(mesh.node.pod_cidr)
    ipam: dict[str, object] = {
        "type": "host-local",
        "ranges": [[{"subnet": str(net), "gateway": gateway(str(net))}]],
        "routes": [{"dst": "0.0.0.0/0" if net.version == 4 else "::/0"}],
    }
    if ipam_data_dir:
        ipam["dataDir"] = ipam_data_dir
    conf = {
        "cniVersion": CNI_VERSION,
        "name": NETWORK_NAME,
        "plugins": [
            {"type": "bridge", "bridge": mesh.settings.bridge, "isGateway": True, "ipMasq": False,
             "hairpinMode": True, "mtu": mesh.tunnel.mtu, "ipam": ipam},
            {"type": "portmap", "capabilities": {"portMappings": True}, "snat": False},
            {"type": "loopback"},
        ],
    }
    return json.dumps(conf, indent=2) + "\n"
