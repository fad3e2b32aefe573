"""The ``fabmesh`` command: one entry point per component, plus the lab and the kubectl tools.

Each subcommand lives in its component's package and registers its own flags
through a ``register(subparsers)`` function, so this module only wires them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
from collections.abc import Sequence

# name -> (module with register(), one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "operator": ("fabmesh.operator.command", "run the operator: IPAM, PKI, communities, per-node configs"),
    "connector": ("fabmesh.connector.command", "run the cloud connector: responder for every edge tunnel"),
    "agent": ("fabmesh.agent.command", "run the edge agent: bridge, CNI, routes, iptables, tunnels"),
    "cloud-agent": ("fabmesh.cloudagent.command",
                    "run the route agent on a cloud node: edge addresses via the active connector"),
    "charon": ("fabmesh.strongswan.command", "run charon with fabmesh's strongswan.conf (the sidecar)"),
    "lab": ("fabmesh.lab.command", "a local hybrid cluster in network namespaces (demo and e2e)"),
    "status": ("fabmesh.kubectl.command", "per-node mesh status from the cluster (kubectl plugin)"),
    "doctor": ("fabmesh.kubectl.command", "check the mesh for common faults (kubectl plugin)"),
    "graph": ("fabmesh.kubectl.command", "the mesh as Graphviz DOT (kubectl plugin)"),
    "tunnels": ("fabmesh.kubectl.command", "one node's tunnels as it reports them (kubectl plugin)"),
    "ping": ("fabmesh.kubectl.command", "ping from a Pod and name the path the tunnels saw (kubectl plugin)"),
}


def build_parser(names: Sequence[str] = tuple(SUBCOMMANDS), prog: str = "fabmesh") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="fabmesh: an IPsec (IKEv2, X.509) edge mesh for hybrid Kubernetes clusters.",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log verbosity (default: INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in names:
        module_name, help_text = SUBCOMMANDS[name]
        importlib.import_module(module_name).register(sub, name, help_text)
    return parser


def _requested(argv: Sequence[str] | None) -> tuple[str, ...]:
    """Just the subcommand on the command line, when it names one: importing every component (pyroute2, the
    kubernetes client) costs seconds on a busy machine, which ``fabmesh lab down`` or an agent start need not pay.
    """
    pre = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    pre.add_argument("--log-level")
    pre.add_argument("command", nargs="?")
    try:
        known, _ = pre.parse_known_args(argv)
    except argparse.ArgumentError:  # the full parser reports it
        return tuple(SUBCOMMANDS)
    return (known.command,) if known.command in SUBCOMMANDS else tuple(SUBCOMMANDS)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser(_requested(argv)).parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return int(args.func(args) or 0)


def kubectl_plugin(argv: Sequence[str] | None = None) -> int:
    """``kubectl fabmesh status|doctor|graph|tunnels|ping``: the same commands, under kubectl's plugin name."""
    parser = build_parser(("status", "doctor", "graph", "tunnels", "ping"), prog="kubectl fabmesh")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
