"""``fabmesh lab up|status|down|exec|cut|heal``: a hybrid cluster's mesh on one machine, in network namespaces.

``up`` builds what is missing, starts the real control plane, operator,
charons, connector and agents (see :mod:`fabmesh.lab.bringup`), adds pods with the
real CNI plugins, and prints a reachability matrix; it exits 0 only when every
pod reaches every pod. The lab keeps running until ``lab down``. ``exec``
runs a command in a pod's namespace; ``cut``/``heal`` take a host off the WAN
(or block the path between two hosts) and restore it (:mod:`fabmesh.lab.faults`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from fabmesh.lab.state import DEFAULT_DIR, LabState
from fabmesh.lab.topology import TopologyError, load_topology
from fabmesh.mesh.model import Backend
from fabmesh.testenv.assets import KUBERNETES_VERSION, cache_root


def register(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    parser = sub.add_parser(name, help=help_text, description=f"{help_text}. Needs root.")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR,
                        help=f"lab state directory (default: {DEFAULT_DIR}, or $FABMESH_LAB_DIR)")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    up = verbs.add_parser("up", help="create the lab and print the reachability matrix")
    up.add_argument("--topology", type=Path, help="topology YAML (default: 2 cloud nodes incl. the connector, "
                    "3 edges in 2 communities, one edge in none; see examples/lab-topology.yaml)")
    up.add_argument("--json", action="store_true", help="print the result as one JSON object")
    up.add_argument("--backend", choices=[b.value for b in Backend], default=Backend.LIBIPSEC.value,
                    help="the operator's tunnel.backend and every charon's: libipsec (userspace ESP, the default: "
                    "works on any kernel) or kernel (xfrm ESP, production's default; needs esp4 in the kernel)")
    up.add_argument("--timeout", type=float, default=120, help="seconds to wait for a full matrix (default 120)")
    up.add_argument("--api-host", metavar="HOST", default=None,
                    help="run etcd and kube-apiserver inside this cloud host's namespace (not the connector): the "
                    "API server then reaches edge kubelets through the mesh, as on a real cloud node; the "
                    "kubeconfig still works from the box (a loopback relay). Default: on the box's loopback")
    up.add_argument("--nodes", choices=("process", "real"), default="process",
                    help="process (default): the operator, agents and connector as processes, Nodes registered by "
                    "the lab; real: every host a real node (kubelet + containerd, kube-proxy), fabmesh installed "
                    "by 'helm install charts/fabmesh' with the image built here, the matrix pods real Pods; the "
                    "API server runs in --api-host (default: the first cloud host that is not the connector). "
                    "Heavier: see docs/real-nodes.md")
    up.set_defaults(func=_up)
    status = verbs.add_parser("status", help="re-check and print the matrix of the running lab")
    status.add_argument("--json", action="store_true", help="print the result as one JSON object")
    status.add_argument("--wait", type=float, default=0, help="retry failing pairs for up to this many seconds")
    status.set_defaults(func=_status)
    down = verbs.add_parser("down", help="remove everything the lab created (safe to run twice)")
    down.set_defaults(func=_down)
    run = verbs.add_parser("exec", help="run a command in a lab pod's network namespace (exit status passed on)",
                           description="Run CMD in the network namespace of POD: a pod name (pod-edge-1), the "
                           "node it runs on (edge-1), or host/NODE for the host itself. "
                           "Example: fabmesh lab exec edge-1 -- ping -c 3 10.233.2.2")
    run.add_argument("pod", metavar="POD")
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD...")
    run.set_defaults(func=_exec)
    cut = verbs.add_parser("cut", help="drop every packet on a host's WAN uplink, or only those to/from --from")
    cut.add_argument("host", metavar="HOST")
    cut.add_argument("--from", dest="other", metavar="HOST", help="block only the path between HOST and this host")
    cut.set_defaults(func=_cut)
    heal = verbs.add_parser("heal", help="undo every cut made on HOST")
    heal.add_argument("host", metavar="HOST")
    heal.set_defaults(func=_heal)


def _progress(message: str) -> None:
    print(f"==> {message}", file=sys.stderr, flush=True)


def _up(args: argparse.Namespace) -> int:
    from fabmesh.lab import bringup, probe

    try:
        topology = load_topology(args.topology)
    except TopologyError as exc:
        print(f"fabmesh lab: bad topology: {exc}", file=sys.stderr)
        return 2
    if LabState.load(args.dir):
        print(f"fabmesh lab: a lab is already up in {args.dir}; run 'fabmesh lab down' first", file=sys.stderr)
        return 1
    started = time.monotonic()
    try:
        if args.nodes == "real":
            from fabmesh.lab import realnodes

            if args.backend != Backend.LIBIPSEC.value:
                print("fabmesh lab: --nodes real runs libipsec only (the chart's value is set by the lab)",
                      file=sys.stderr)
                return 2
            state = realnodes.up(topology, args.dir, progress=_progress, timeout=max(args.timeout, 300),
                                 api_host=args.api_host)
        else:
            state = bringup.up(topology, args.dir, progress=_progress, timeout=args.timeout,
                               backend=Backend(args.backend), api_host=args.api_host)
    except Exception as exc:
        print(f"fabmesh lab: bring-up failed: {exc}\nlogs: {args.dir / 'logs'}; clean up with "
              "'fabmesh lab down'", file=sys.stderr)
        return 1
    _progress("checking every pod against every pod")
    report = probe.check(state, wait=args.timeout)
    report["seconds_to_full_matrix"] = round(time.monotonic() - started, 1)
    _print(report, args.json)
    return 0 if all(p["ok"] for p in report["pairs"]) else 1


def _print(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(report))
        return
    print(f"KUBECONFIG={report['kubeconfig']}")
    kubectl_dir = os.environ.get("KUBEBUILDER_ASSETS") or str(cache_root() / f"k8s-{KUBERNETES_VERSION}")
    venv_bin = os.path.dirname(sys.executable)
    print(f"  try: export KUBECONFIG={report['kubeconfig']} PATH={kubectl_dir}:{venv_bin}:$PATH\n"
          "       kubectl get nodes -L community.fabmesh.io/a -L community.fabmesh.io/b\n"
          "       kubectl label node edge-3 community.fabmesh.io/a=   # then: fabmesh lab status\n"
          "       kubectl fabmesh status --namespace fabmesh-system")
    names = [p["name"] for p in report["pods"]]
    ips = {p["name"]: p["ip"] for p in report["pods"]}
    width = max(len(n) for n in names) + 2
    cell = 14
    print("\nreachability: ping from row pod to column pod, and the path the SA counters saw it take "
          "('!' = not the path the labels call for; --json has the evidence)")
    print(" " * (width + 16) + "".join(n[:cell - 1].ljust(cell) for n in names))
    cells = {(p["src"], p["dst"]): p for p in report["pairs"]}
    for src in names:
        row = []
        for dst in names:
            pair = cells.get((src, dst))
            row.append("-".ljust(cell) if pair is None else
                       (("ok " if pair["ok"] else "FAIL ") + pair["path"] + ("!" if "intended" in pair else ""))
                       .ljust(cell))
        print(src.ljust(width) + ips[src].ljust(16) + "".join(row))
    ok = all(p["ok"] for p in report["pairs"])
    print("\npaths: direct = edge-to-edge tunnel (shared community); relayed = through the connector; "
          "cloud = via the connector and flannel; none = no tunnel counted the probe")
    for pair in report["pairs"]:
        if "intended" in pair:
            print(f"  {pair['src']} -> {pair['dst']}: went {pair['path']}, intended {pair['intended']}")
    print("every pod reaches every pod" if ok else "SOME PAIRS FAIL: see the logs in the lab directory")


def _status(args: argparse.Namespace) -> int:
    from fabmesh.lab import probe

    state = _loaded(args)
    if not state:
        return 1
    report = probe.check(state, wait=args.wait)
    _print(report, args.json)
    return 0 if all(p["ok"] for p in report["pairs"]) else 1


def _loaded(args: argparse.Namespace) -> LabState | None:
    state = LabState.load(args.dir)
    if not state:
        print(f"fabmesh lab: no lab in {args.dir}; run 'fabmesh lab up'", file=sys.stderr)
    return state


def _exec(args: argparse.Namespace) -> int:
    from fabmesh.lab import faults

    state = _loaded(args)
    if not state:
        return 1
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("fabmesh lab exec: no command given (fabmesh lab exec POD -- CMD...)", file=sys.stderr)
        return 2
    try:
        argv = faults.exec_argv(state, args.pod, command)
    except (KeyError, StopIteration):
        known = ", ".join(p.name for p in state.pods)
        print(f"fabmesh lab exec: no pod or host {args.pod!r} (pods: {known}; hosts: host/NODE)", file=sys.stderr)
        return 2
    sys.stdout.flush()
    os.execvp(argv[0], argv)


def _host_known(state: LabState, name: str) -> bool:
    if any(h.name == name for h in state.hosts):
        return True
    print(f"fabmesh lab: no host {name!r} (hosts: {', '.join(h.name for h in state.hosts)})", file=sys.stderr)
    return False


def _cut(args: argparse.Namespace) -> int:
    from fabmesh.lab import faults

    state = _loaded(args)
    if not state or not _host_known(state, args.host) or (args.other and not _host_known(state, args.other)):
        return 1
    rules = faults.cut(state, args.host, args.other)
    what = f"between {args.host} and {args.other}" if args.other else f"on {args.host}'s uplink"
    print(f"cut {what}: {len(rules)} drop rules in {faults.CHAIN}; undo with 'fabmesh lab heal {args.host}'")
    return 0


def _heal(args: argparse.Namespace) -> int:
    from fabmesh.lab import faults

    state = _loaded(args)
    if not state or not _host_known(state, args.host):
        return 1
    print(f"healed {args.host}" if faults.heal(state, args.host) else f"{args.host} had no cut: nothing to do")
    return 0


def _down(args: argparse.Namespace) -> int:
    from fabmesh.lab import teardown
    from fabmesh.lab.processes import Outcome

    started = time.monotonic()
    removed = teardown.down(args.dir)
    if removed is None:
        print(f"no lab in {args.dir}: nothing running, nothing to do")
        return 0
    for p in removed.processes:
        how = {Outcome.TERMINATED: f"stopped ({p.seconds:.1f}s)", Outcome.KILLED: f"killed after {p.seconds:.1f}s",
               Outcome.GONE: "was not running",
               Outcome.NOT_OURS: "left alone: the PID now belongs to another process"}
        print(f"process {p.name} pid {p.pid}: {how[p.outcome]}")
    for ns in removed.namespaces:
        print(f"namespace {ns}: deleted")
    print(f"directory {removed.directory}: removed")
    print(f"lab {removed.prefix} removed in {time.monotonic() - started:.1f}s")
    return 0
