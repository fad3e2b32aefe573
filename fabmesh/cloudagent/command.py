"""``fabmesh cloud-agent``: the route agent on cloud nodes that are not the connector."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

DESCRIPTION = """\
Routes edge node addresses (kubelet, for kubectl logs/exec/port-forward and metrics) and, when the
operator says so (cloud_agent.route_edge_pod_cidrs, for a cloud CNI that is not flannel), the edge pod
pool from this cloud node via the active connector's address on the cloud network, with a source
address inside the cloud pod CIDRs and no SNAT. Routes live in their own table (cloud_agent.route_table,
default 2621) behind an ip rule at priority 101; the no-SNAT rule in the nat chain FMCLOUD-POSTROUTING
with the ipset FMCLOUD-EDGE. Re-pointed when the operator names another connector; idle on the active
connector itself. Stopping (SIGTERM) removes all of it. Needs NET_ADMIN and NET_RAW (iptables' set
match opens a raw socket) and no Kubernetes credentials: it reads the mounted ConfigMap
fabmesh-cloud-routes only and writes nothing to the API.
"""


def register(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    parser = sub.add_parser(name, help=help_text, description=DESCRIPTION,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-dir", type=Path, default=Path("/etc/fabmesh/cloud"),
                        help="the mounted ConfigMap fabmesh-cloud-routes, holding routes.yaml "
                        "(default: /etc/fabmesh/cloud)")
    parser.add_argument("--node-name", default=os.environ.get("NODE_NAME") or None,
                        help="the node it runs on (default: $NODE_NAME, from the downward API); where it is the "
                        "active connector the agent stays idle (it also does when the connector's address is "
                        "one of this node's)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fabmesh.cloudagent.loop import CloudLoop, CloudLoopOptions

    return CloudLoop(CloudLoopOptions(config_dir=args.config_dir, node_name=args.node_name)).run()
