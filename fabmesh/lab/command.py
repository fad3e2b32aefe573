"""``fabmesh lab up|status|down``: a mesh on one Linux machine, in network namespaces.

This first lab is the foundation demo: two hosts on a WAN bridge, each with a
pod behind it and its own charon (userspace ESP, ``kernel-libipsec``), one
IKEv2 tunnel authenticated by X.509 certificates from fabmesh's PKI, loaded
over VICI with the same connection builder the agent uses. It prints a
reachability matrix and exits 0 only when every pair reaches.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from fabmesh.lab.state import DEFAULT_DIR, LabState
from fabmesh.mesh.model import Backend, LocalNode, NodeMesh, Peer, Role, TunnelSettings
from fabmesh.node.tunnel_sync import Credentials, TunnelSync
from fabmesh.node.tunnels import desired_connections
from fabmesh.pki.authority import KeyPair, issue_leaf, new_ca
from fabmesh.strongswan.driver import Charon
from fabmesh.testenv.hosts import Network, owned_namespaces, sh, stop_pid, unique_prefix, wait_for

DEMO = {"a": ("198.51.100.1", "10.10.1.0/24"), "b": ("198.51.100.2", "10.10.2.0/24")}


def register(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    parser = sub.add_parser(name, help=help_text, description=f"{help_text}. Needs root.")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR,
                        help=f"lab state directory (default: {DEFAULT_DIR}, or $FABMESH_LAB_DIR)")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    up = verbs.add_parser("up", help="create the lab and print the reachability matrix")
    up.add_argument("--json", action="store_true", help="print the result as one JSON object")
    up.set_defaults(func=_up)
    status = verbs.add_parser("status", help="re-check and print the matrix of the running lab")
    status.add_argument("--json", action="store_true", help="print the result as one JSON object")
    status.set_defaults(func=_status)
    down = verbs.add_parser("down", help="remove everything the lab created (safe to run twice)")
    down.set_defaults(func=_down)


def _mesh(name: str, peer: str, ca_pem: str) -> NodeMesh:
    ip, cidr = DEMO[name]
    peer_ip, peer_cidr = DEMO[peer]
    return NodeMesh(
        node=LocalNode(name=name, role=Role.EDGE, address=ip, endpoint=ip, pod_cidr=cidr),
        local_subnets=(cidr,), mesh_cidrs=tuple(sorted(c for _, c in DEMO.values())),
        peers=(Peer(name=peer, role=Role.EDGE, identity=peer, endpoint=peer_ip, subnets=(peer_cidr,),
                    local_subnets=(cidr,), initiate=name < peer),),
        caCert=ca_pem, tunnel=TunnelSettings(backend=Backend.LIBIPSEC))


def _up(args: argparse.Namespace) -> int:
    directory: Path = args.dir
    if LabState.load(directory):
        print(f"a lab is already up in {directory}; run 'fabmesh lab down' first", file=sys.stderr)
        return 1
    directory.mkdir(parents=True, exist_ok=True)
    state = LabState(prefix=unique_prefix("fmlab"), directory=str(directory))
    state.save()
    net = Network(prefix=state.prefix, directory=directory / "hosts").create()
    now = datetime.datetime.now(datetime.UTC)
    ca = new_ca(now=now)
    for name, (ip, cidr) in DEMO.items():
        host = net.add_host(name, ip)
        pod_ip = str(next(iter(__import__("ipaddress").ip_network(cidr).hosts())) + 1)
        host.add_pod("pod", f"{pod_ip}/{cidr.split('/')[1]}")
        charon = host.start_charon(install_routes=True)
        state.pids[f"charon-{name}"] = charon.pid
        state.save()
    for _ in range(2):  # the second pass initiates what the first could not (peer not loaded yet)
        _sync_all(directory, net, ca, now)
    report = _check(state)
    state.report = report
    state.save()
    _print(report, args.json)
    return 0 if all(p["ok"] for p in report["pairs"]) else 1


def _sync_all(directory: Path, net: Network, ca: KeyPair, now: datetime.datetime) -> None:
    for name in DEMO:
        peer = next(p for p in DEMO if p != name)
        mesh = _mesh(name, peer, ca.cert_pem)
        leaf = issue_leaf(ca, name=name, addresses=[DEMO[name][0]], now=now)
        socket_path = net.hosts[name].charon.vici_socket  # type: ignore[union-attr]
        sync = TunnelSync(lambda p=socket_path: Charon(p), directory / "hosts" / name / "tunnels.json", name)
        sync.apply(desired_connections(mesh, leaf.cert_pem), Credentials(leaf.key_pem, ca.cert_pem),
                   initiators={p.name for p in mesh.peers if p.initiate})


def _check(state: LabState) -> dict[str, Any]:
    pods = [{"name": f"pod-{n}", "node": n, "ip": str(__import__("ipaddress").ip_network(c)[2]),
             "netns": f"{state.prefix}-{n}-pod"} for n, (_, c) in DEMO.items()]
    pairs = []
    for src in pods:
        for dst in pods:
            if src is dst:
                continue
            try:
                ok = bool(wait_for(lambda s=src, d=dst: sh("ping", "-c1", "-W1", d["ip"], ns=s["netns"],
                                                            check=False).returncode == 0,
                                   timeout=15, what="ping"))
            except TimeoutError:
                ok = False
            pairs.append({"src": src["name"], "dst": dst["name"], "ok": ok, "path": "direct"})
    return {"prefix": state.prefix, "pods": [{k: p[k] for k in ("name", "node", "ip")} for p in pods],
            "pairs": pairs}


def _print(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(report))
        return
    names = [p["name"] for p in report["pods"]]
    width = max(len(n) for n in names) + 2
    print("reachability (ping, pod to pod; path)".ljust(width))
    print(" " * width + "".join(n.ljust(width + 8) for n in names))
    cells = {(p["src"], p["dst"]): p for p in report["pairs"]}
    for src in names:
        row = []
        for dst in names:
            pair = cells.get((src, dst))
            row.append("-".ljust(width + 8) if pair is None else
                       (("ok " if pair["ok"] else "FAIL ") + pair["path"]).ljust(width + 8))
        print(src.ljust(width) + "".join(row))
    ok = all(p["ok"] for p in report["pairs"])
    print(f"{'every pod reaches every pod' if ok else 'SOME PAIRS FAIL'}")


def _status(args: argparse.Namespace) -> int:
    state = LabState.load(args.dir)
    if not state:
        print(f"no lab in {args.dir}; run 'fabmesh lab up'", file=sys.stderr)
        return 1
    report = _check(state)
    _print(report, args.json)
    return 0 if all(p["ok"] for p in report["pairs"]) else 1


def _down(args: argparse.Namespace) -> int:
    state = LabState.load(args.dir)
    if not state:
        print(f"no lab in {args.dir}; nothing to do")
        return 0
    for pid in state.pids.values():
        stop_pid(pid)
    for netns in owned_namespaces(state.prefix):
        sh("ip", "netns", "del", netns, check=False)
    shutil.rmtree(args.dir, ignore_errors=True)
    print(f"lab {state.prefix} removed")
    return 0
