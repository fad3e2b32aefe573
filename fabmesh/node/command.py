"""Command-line wiring shared by ``fabmesh agent`` and ``fabmesh connector``: flags, run, status."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from fabmesh.mesh.names import POD_ANNOTATIONS_FILE, TEARDOWN_ANNOTATION
from fabmesh.mesh.ports import DEFAULT_METRICS_PORT
from fabmesh.node.loop import NodeLoop, NodeLoopOptions
from fabmesh.node.status_writer import IN_CLUSTER_TOKEN, StatusTarget, in_cluster_server


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (0-65535; 0 disables)")
    return port


def add_node_flags(parser: argparse.ArgumentParser, *, edge: bool) -> None:
    parser.add_argument("--config-dir", type=Path, default=Path("/etc/fabmesh/mesh"),
                        help="mounted ConfigMap with mesh.yaml%s (default: /etc/fabmesh/mesh)"
                        % ("" if edge else " and peers-*.yaml shards"))
    parser.add_argument("--tls-dir", type=Path, default=Path("/etc/fabmesh/tls"),
                        help="mounted Secret with tls.crt, tls.key, ca.crt (default: /etc/fabmesh/tls)")
    parser.add_argument("--vici-socket", type=Path, default=Path("/var/run/fabmesh/charon.vici"),
                        help="charon's VICI socket (default: /var/run/fabmesh/charon.vici)")
    parser.add_argument("--state-dir", type=Path, default=Path("/var/run/fabmesh"),
                        help="where the loop keeps what it loaded into charon (default: /var/run/fabmesh)")
    parser.add_argument("--uplink", help="device IKE leaves by, for the kernel backend "
                        "(default: the device the kernel routes towards the peers)")
    parser.add_argument("--metrics-port", type=_port, default=DEFAULT_METRICS_PORT,
                        help=f"serve Prometheus /metrics on this TCP port; 0 disables (default: "
                        f"{DEFAULT_METRICS_PORT}). If it cannot be bound, one error is logged and the "
                        "data plane runs on without metrics")
    parser.add_argument("--metrics-address", default=None,
                        help="address /metrics binds to (default: the node's own address, mesh.yaml "
                        "node.address, i.e. its InternalIP; 0.0.0.0 or :: for every address)")
    parser.add_argument("--status-token-file", type=Path, default=None,
                        help="a ServiceAccount token allowed to patch this node's TunnelStatus (the operator's "
                        f"agent and connector Pods mount one at {IN_CLUSTER_TOKEN}); default: none, no status "
                        "is published")
    parser.add_argument("--status-server", default=None,
                        help="the API server URL for the status (default: in-cluster, from "
                        "KUBERNETES_SERVICE_HOST/PORT)")
    parser.add_argument("--status-ca-file", type=Path, default=None,
                        help="CA bundle that signs the API server's certificate (default: the system's)")
    parser.add_argument("--charon-conf", type=Path, default=None,
                        help="the strongswan.conf charon runs with, to report its NAT keepalive interval "
                        "(default: strongswan.conf next to --vici-socket, where `fabmesh charon` writes it)")
    parser.add_argument("--teardown-file", type=Path, default=None,
                        help=f"the Pod's annotations as the downward API writes them (the operator's Pods mount "
                        f"them at {POD_ANNOTATIONS_FILE}): {TEARDOWN_ANNOTATION}=<token> there means an uninstall, "
                        "and the loop removes everything it programmed (default: none, never)")
    parser.add_argument("--termination-log", type=Path, default=None,
                        help="with --teardown-file: once everything is removed, write the token here and exit 0 "
                        "(the operator's Pods pass /dev/termination-log: kubelet reports it to the API as the "
                        "container's termination message); default: stay up, idle")
    parser.add_argument("--status-namespace", default="fabmesh-system",
                        help="namespace of the TunnelStatus objects (default: fabmesh-system)")
    if not edge:
        parser.add_argument("--node-name", default=None,
                            help="the node this connector runs on: while mesh.yaml names another node (the "
                            "active connector) it stands by and runs no tunnels (default: always active)")
    if edge:
        parser.add_argument("--cni-conf-dir", type=Path, default=None,
                            help="override mesh.yaml's settings.cni_conf_dir (where the conflist goes)")
        parser.add_argument("--ipam-data-dir", default=None,
                            help="host-local IPAM state directory (default: the plugin's /var/lib/cni/networks)")


def _status_target(args: argparse.Namespace) -> StatusTarget | None:
    if args.status_token_file is None:
        return None
    server = args.status_server or in_cluster_server()
    if server is None:
        raise SystemExit("--status-token-file needs --status-server outside a Pod (no KUBERNETES_SERVICE_HOST)")
    return StatusTarget(server=server, token_file=args.status_token_file, ca_file=args.status_ca_file,
                        namespace=args.status_namespace, name=getattr(args, "node_name", None) or "")


def options(args: argparse.Namespace) -> NodeLoopOptions:
    return NodeLoopOptions(
        config_dir=args.config_dir, tls_dir=args.tls_dir, vici_socket=args.vici_socket,
        state_dir=args.state_dir, cni_conf_dir=getattr(args, "cni_conf_dir", None),
        ipam_data_dir=getattr(args, "ipam_data_dir", None), uplink=args.uplink,
        metrics_address=args.metrics_address, metrics_port=args.metrics_port,
        node_name=getattr(args, "node_name", None), status=_status_target(args), charon_conf=args.charon_conf,
        teardown_file=args.teardown_file, termination_log=args.termination_log)


def run(args: argparse.Namespace) -> int:
    return NodeLoop(options(args)).run()


def cleanup(args: argparse.Namespace) -> int:
    """By hand, on a node whose agent or connector never answered the uninstall: remove what it programmed.

    Reads the node's settings from ``--config-dir`` when that is still there (a kubelet keeps a deleted
    Pod's volumes only until it cleans them up), else uses the defaults or the flags given here.
    """
    from fabmesh.mesh.model import Backend, MeshConfigError, NodeSettings
    from fabmesh.node.apply import NodeApplier
    from fabmesh.node.config import load
    from fabmesh.node.desired import desired_state
    from fabmesh.node.teardown import plan_teardown

    try:
        config = load(args.config_dir, args.tls_dir)
    except MeshConfigError:
        config = None
    settings = config.mesh.settings if config else NodeSettings()
    overrides = {k: v for k, v in (("route_table", args.route_table), ("bridge", args.bridge),
                                   ("cni_conf_name", args.cni_conf_name)) if v is not None}
    settings = settings.model_copy(update=overrides)
    anchors: tuple[str, ...] = ()
    if config is not None and config.mesh.tunnel.backend is Backend.LIBIPSEC:
        anchors = desired_state(config.mesh, config.cert_pem, ike_remotes=frozenset()).anchors
    edge = args.command == "agent"
    cni_dir = getattr(args, "cni_conf_dir", None)
    plan = plan_teardown(settings, edge=edge, cni_conf_dir=str(cni_dir) if cni_dir else None,
                         anchor_subnets=anchors)
    applier = NodeApplier(config.mesh.node.name if config else "local", args.vici_socket, args.state_dir, None)
    report = applier.teardown(plan)
    for change in report.changes:
        print(change)
    for error in report.errors:
        print(f"error: {error}", file=sys.stderr)
    print(f"fabmesh {args.command} cleanup: {len(report.changes)} change(s), "
          f"{'nothing of fabmesh left' if report.ok else 'some steps failed, run again'}")
    return 0 if report.ok else 1


def status(args: argparse.Namespace) -> int:
    """Peers, SAs and routes of the local node, read from charon and the kernel."""
    from fabmesh.node.config import load
    from fabmesh.strongswan.driver import Charon, ViciError

    report: dict[str, object] = {}
    try:
        config = load(args.config_dir, args.tls_dir)
        report["node"] = config.mesh.node.model_dump(mode="json")
        peers = {p.name: {"role": p.role.value, "subnets": list(p.subnets), "initiate": p.initiate}
                 for p in config.mesh.peers}
        table = config.mesh.settings.route_table
    except Exception as exc:
        print(f"cannot read the node's config: {exc}", file=sys.stderr)
        return 1
    try:
        with Charon(args.vici_socket, timeout=5) as charon:
            sas = charon.sas()
    except ViciError as exc:
        print(f"warning: {exc}", file=sys.stderr)
        sas = {}
    for name, peer in peers.items():
        sa = sas.get(name, {})
        children = list(sa.get("child-sas", {}).values())
        peer.update(state=sa.get("state", "DOWN"), remote=sa.get("remote-host"),
                    bytes_in=sum(int(c.get("bytes-in", 0)) for c in children),
                    bytes_out=sum(int(c.get("bytes-out", 0)) for c in children))
    report["peers"] = peers
    routes = subprocess.run(["ip", "-j", "route", "show", "table", str(table)], capture_output=True, text=True)
    report["routes"] = json.loads(routes.stdout or "[]")
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"node {report['node']['name']} ({report['node']['role']})")  # type: ignore[index]
    print(f"{'PEER':<24}{'ROLE':<11}{'STATE':<13}{'REMOTE':<17}{'IN':>12}{'OUT':>12}  SUBNETS")
    for name, peer in peers.items():
        print(f"{name:<24}{peer['role']:<11}{peer['state']:<13}{peer['remote'] or '-':<17}"
              f"{peer['bytes_in']:>12}{peer['bytes_out']:>12}  {','.join(peer['subnets'])}")
    print(f"routes in table {table}:")
    for route in report["routes"]:  # type: ignore[union-attr]
        print(f"  {route.get('dst')} dev {route.get('dev')} src {route.get('prefsrc', '-')}")
    return 0


def register_node_command(sub: argparse._SubParsersAction, name: str, help_text: str, *, edge: bool) -> None:
    parser = sub.add_parser(name, help=help_text, description=f"{help_text}. Reads the mounted ConfigMap and "
                            "Secret; its only Kubernetes credential (--status-token-file) may write nothing but "
                            "this node's TunnelStatus.")
    add_node_flags(parser, edge=edge)
    parser.set_defaults(func=run)
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    verbs.add_parser("run", help="run the reconcile loop (the default)").set_defaults(func=run)
    clean = verbs.add_parser("cleanup", help="remove everything fabmesh programmed on this node (after an uninstall "
                             "this node did not answer; docs/operator.md)")
    clean.add_argument("--route-table", type=int, default=None, help="fabmesh's routing table (default: from "
                       "--config-dir, else 2620)")
    clean.add_argument("--bridge", default=None, help="an edge's pod bridge (default: from --config-dir, "
                       "else fabmesh0)")
    clean.add_argument("--cni-conf-name", default=None, help="an edge's conflist name (default: from "
                       "--config-dir, else 10-fabmesh.conflist)")
    clean.set_defaults(func=cleanup)
    st = verbs.add_parser("status", help="print peers, SAs and routes of the local node")
    st.add_argument("--json", action="store_true", help="print one JSON object")
    st.set_defaults(func=status)
