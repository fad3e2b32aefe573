"""``fabmesh operator``: run the operator against a cluster, or one reconcile pass against it (``--once``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fabmesh.operator.health import DEFAULT_PORT as DEFAULT_HEALTH_PORT
from fabmesh.operator.settings import SettingsError, load_settings


def register(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    parser = sub.add_parser(name, help=help_text, description=(
        f"{help_text}. Watches Nodes and writes, per edge node, ConfigMap fabmesh-agent-<node> "
        "(mesh.yaml), Secret fabmesh-tls-<node> and an agent Pod; plus the connector's config. "
        "Leader-elected: run several replicas; a leader that cannot renew its Lease in time exits 1."))
    parser.add_argument("--kubeconfig", help="kubeconfig path (default: in-cluster, then ~/.kube/config)")
    parser.add_argument("--config", type=Path,
                        help="settings YAML (see docs/operator.md; default: built-in defaults)")
    parser.add_argument("--identity", help="leader-election identity (default: hostname-pid)")
    parser.add_argument("--field-manager", default="fabmesh-operator",
                        help="name in metadata.managedFields of what this process writes (default: %(default)s)")
    parser.add_argument("--health-address", default="0.0.0.0",
                        help="address of the /healthz and /readyz endpoint (default: %(default)s)")
    parser.add_argument("--health-port", type=int, default=DEFAULT_HEALTH_PORT,
                        help="port of the /healthz and /readyz endpoint; 0 = none (default: %(default)s)")
    parser.add_argument("--once", action="store_true",
                        help="run one reconcile pass without leader election, print a summary, exit")
    parser.add_argument("--release", action="store_true",
                        help="for an uninstall: once no operator holds the leader Lease, take the copied flannel "
                             "annotations off every Node and remove the fabmesh.io/flannel-release finalizer, exit")
    parser.add_argument("--release-wait", type=float, default=120.0, metavar="SECONDS",
                        help="with --release or --uninstall: how long to wait for a running operator's Lease to lapse "
                             "(default: %(default)s)")
    parser.add_argument("--uninstall", action="store_true",
                        help="for helm uninstall (the chart's pre-delete hook): scale the operator's Deployment to 0, "
                             "ask every agent and connector to remove what it programmed, wait for them, delete "
                             "every object the operator created, release every Node, exit (docs/operator.md)")
    parser.add_argument("--node-timeout", type=float, default=120.0, metavar="SECONDS",
                        help="with --uninstall: how long to wait for the nodes' teardown reports; nodes that did "
                             "not answer are named, to clean up by hand (default: %(default)s)")
    parser.add_argument("--operator-deployment", default="fabmesh-operator", metavar="NAME",
                        help="with --uninstall: the operator's Deployment in the settings' namespace "
                             "(default: %(default)s)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
    except SettingsError as exc:
        print(f"fabmesh operator: bad settings: {exc}", file=sys.stderr)
        return 2
    from fabmesh.kube.client import Kube, load_api_client
    from fabmesh.operator.loop import OperatorLoop
    from fabmesh.operator.reconcile import Reconciler

    api = load_api_client(args.kubeconfig)
    if args.uninstall:
        from fabmesh.operator.uninstall import uninstall

        return uninstall(Kube(api, field_manager=args.field_manager), settings, deployment=args.operator_deployment,
                         lease_wait_s=args.release_wait, node_timeout_s=args.node_timeout)
    if args.release:
        from fabmesh.operator.release import release_all

        return release_all(Kube(api, field_manager=args.field_manager), settings, args.release_wait)
    if args.once:
        kube = Kube(api, field_manager=args.field_manager)
        result = Reconciler(kube, settings).run_once()
        print(json.dumps({"edges": sorted(result.plan.edges), "errors": [str(e) for e in result.errors],
                          "writes": dict(kube.writes)}, indent=2))
        return 1 if result.retry else 0
    health = (args.health_address, args.health_port) if args.health_port else None
    return OperatorLoop(api, settings, args.identity, args.field_manager, health).run()
