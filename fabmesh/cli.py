"""The ``fabmesh`` command: one entry point per component, plus the lab and the kubectl tools.

Each subcommand lives in its component's package and registers its own flags
through a ``register(subparsers)`` function, so this module only wires them.
A subcommand that is not built yet says so and exits 2: no fake output.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

NOT_BUILT = 2

# name -> (module with register(), one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "operator": ("fabmesh.operator.command", "run the operator: IPAM, PKI, communities, per-node configs"),
    "connector": ("fabmesh.connector.command", "run the cloud connector: responder for every edge tunnel"),
    "agent": ("fabmesh.agent.command", "run the edge agent: bridge, CNI, routes, iptables, tunnels"),
    "charon": ("fabmesh.strongswan.command", "run charon with fabmesh's strongswan.conf (the sidecar)"),
    "lab": ("fabmesh.lab.command", "a local hybrid cluster in network namespaces (demo and e2e)"),
    "status": ("fabmesh.kubectl.command", "per-node mesh status from the cluster (kubectl plugin)"),
    "doctor": ("fabmesh.kubectl.command", "check the mesh for common faults (kubectl plugin)"),
    "graph": ("fabmesh.kubectl.command", "the mesh as Graphviz DOT (kubectl plugin)"),
}


def _not_built(name: str) -> Callable[[argparse.Namespace], int]:
    def run(_: argparse.Namespace) -> int:
        print(f"fabmesh {name}: not built yet in this release; see the project's issues.", file=sys.stderr)
        return NOT_BUILT

    return run


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
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is None or not module_name.startswith(exc.name):
                raise
            p = sub.add_parser(name, help=f"{help_text} [not built yet]",
                               description=f"{help_text}. Not built yet: exits {NOT_BUILT}.")
            p.set_defaults(func=_not_built(name))
            continue
        module.register(sub, name, help_text)
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
    """``kubectl fabmesh status|doctor|graph``: the same commands, under kubectl's plugin name."""
    parser = build_parser(("status", "doctor", "graph"), prog="kubectl fabmesh")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
