"""How long an edge agent takes to converge 1,000 peers from empty, against swanctl + ip -batch; what a resync writes.

Target (DESIGN.md): converge 1,000 peers from empty within 2 x the time of
loading the same connections with ``swanctl --load-all`` plus the same routes
with ``ip -batch``; a resync with no change does zero writes.

Each repetition builds a throwaway WAN (``fabmesh.testenv.hosts``) with two
hosts, each a fresh network namespace with a fresh charon (libipsec backend,
fabmesh's own strongswan.conf):

* ``fm``: a child process started with ``ip netns exec`` (this module with
  ``--child fabmesh``) holds one ``NodeApplier`` for its life, as the agent
  does, and applies the edge's ``mesh.yaml`` twice. It times, inside itself
  (Python start-up excluded), parsing the file + ``desired_state`` + the apply
  ("converge"), and the apply alone, per step. The second apply is the resync:
  its writes per resource (target 0) and its time.
* ``base``: the same connections written as a swanctl.conf (same settings,
  rendered from the very dictionaries fabmesh sends over VICI; certificate
  and key as files under a swanctl dir) and the same rule and routes as an
  ``ip -batch`` file; a child process (``--child baseline``) times
  ``swanctl --load-all --file ... --uri unix://...`` and ``ip -batch``
  together, process start-up of both tools included (that is what they cost).

Initiation is in both, so the comparison is fair: fabmesh initiates every peer
it is the initiator for (the connector and the community edges with a larger
name) explicitly over VICI; the baseline gives exactly those children
``start_action = start``, with which charon initiates them as they are loaded.
Peer endpoints are in 198.18.0.0/15, routed towards the WAN bridge's namespace,
which does not forward: nobody answers, so the IKE_SAs stay CONNECTING.

What the baseline does not do, and fabmesh does within its time: the bridge,
the CNI config, the ipset, the iptables chains, the libipsec anchor addresses
and the forwarding sysctl. The baseline's host gets the bridge (with the
gateway address the routes use as source) before its clock starts.

    python -m bench.bench_agent_converge [--peers 1000] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import ipaddress
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from bench.machine import machine
from fabmesh.mesh.model import Backend, LocalNode, NodeMesh, Peer, Role, TunnelSettings
from fabmesh.node.desired import RULE_PRIORITY, NodeState, desired_state
from fabmesh.pki.authority import KeyPair, issue_leaf, new_ca
from fabmesh.strongswan.driver import Charon
from fabmesh.testenv.hosts import Host, Network, network, stop_pid

RATIO_TARGET = 2.0
REPO = Path(__file__).resolve().parents[1]
NOW = datetime.datetime.now(datetime.UTC)
WAN_CIDR = "198.51.100.0/24"
SINK = "198.51.100.254"  # the WAN bridge's own address: it receives, does not forward, never answers IKE
UNANSWERED = ipaddress.IPv4Network("198.18.0.0/15")  # every peer endpoint; routed to SINK
EDGE_POOL = ipaddress.IPv4Network("10.128.0.0/10")  # 16,384 /24s
CLOUD_POD = "10.64.0.0/11"
SERVICE = "10.96.0.0/12"
MESH_CIDRS = (CLOUD_POD, SERVICE, str(EDGE_POOL))
EDGE_IPS = ipaddress.IPv4Address("100.96.0.0")  # edges' InternalIPs: 100.96.0.1 upwards
REPLY_TIMEOUT_S = 600.0


# -- the mesh ---------------------------------------------------------------------------------------------------


def edge_name(i: int) -> str:
    return f"edge-{i:04d}"


def edge_pod_cidr(i: int) -> str:
    return str(ipaddress.IPv4Network((int(EDGE_POOL.network_address) + i * 256, 24)))


def build_mesh(peers: int, wan_ip: str, ca_pem: str) -> NodeMesh:
    """An edge in the middle of one big community: the connector plus ``peers - 1`` community edges.

    Shaped as the operator plans it (``fabmesh/operator/plan.py``): each community peer carries its
    pod /24 and its InternalIP /32; the smaller name initiates, so about half the edges and the
    connector are initiated from here.
    """
    me = (peers - 1) // 2
    edges = [i for i in range(peers) if i != me]
    connector = Peer(name="connector-0", role=Role.CONNECTOR, endpoint=str(UNANSWERED.network_address + 1),
                     subnets=MESH_CIDRS, initiate=True)
    community = [
        Peer(name=edge_name(i), role=Role.EDGE, endpoint=str(UNANSWERED.network_address + 2 + i),
             subnets=tuple(sorted({edge_pod_cidr(i), f"{EDGE_IPS + 1 + i}/32"})),
             initiate=edge_name(me) < edge_name(i))
        for i in edges
    ]
    node = LocalNode(name=edge_name(me), role=Role.EDGE, address=str(EDGE_IPS + 1 + me), endpoint=wan_ip,
                     pod_cidr=edge_pod_cidr(me), communities=("bench",))
    return NodeMesh(node=node, local_subnets=tuple(sorted({edge_pod_cidr(me), f"{EDGE_IPS + 1 + me}/32"})),
                    mesh_cidrs=MESH_CIDRS, peers=(connector, *sorted(community, key=lambda p: p.name)),
                    caCert=ca_pem, tunnel=TunnelSettings(backend=Backend.LIBIPSEC))


# -- the baseline: swanctl.conf and an ip -batch file with the same content --------------------------------------


def _swanctl_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    return str(value)


def _swanctl_section(name: str, body: Mapping[str, Any], indent: int) -> list[str]:
    pad = "  " * indent
    lines = [f"{pad}{name} {{"]
    for key, value in body.items():
        if isinstance(value, Mapping):
            lines += _swanctl_section(key, value, indent + 1)
        else:
            lines.append(f"{pad}  {key} = {_swanctl_value(value)}")
    lines.append(f"{pad}}}")
    return lines


def swanctl_conf(state: NodeState, cert_file: str, ca_file: str) -> str:
    """fabmesh's load-conn bodies as swanctl.conf; certificates by file name, initiators ``start_action = start``."""
    lines = ["connections {"]
    for name, conn in sorted(state.connections.items()):
        conn = json.loads(json.dumps(conn))
        conn["local"]["certs"] = [cert_file]
        conn["remote"]["cacerts"] = [ca_file]
        for child in conn["children"].values():
            child["start_action"] = "start" if name in state.initiators else "none"
        lines += _swanctl_section(name, conn, 1)
    lines.append("}")
    return "\n".join(lines) + "\n"


def ip_batch(state: NodeState) -> str:
    """The rule and routes fabmesh writes, as ``ip -batch`` lines (same table, protocol, scope and source)."""
    lines = [f"rule add priority {RULE_PRIORITY} table {state.route_table} protocol 250"]
    for r in state.routes:
        src = f" src {r.src}" if r.src else ""
        lines.append(f"route add {r.dst} dev {r.dev} table {r.table} proto 250 scope link{src}")
    return "\n".join(lines) + "\n"


# -- children (run inside a host's namespace) --------------------------------------------------------------------


def child_fabmesh(config_path: Path) -> None:
    """One NodeApplier for the life of the process; one apply per mesh file named on stdin; one JSON line each."""
    import logging

    from fabmesh.mesh.model import parse_node_mesh
    from fabmesh.node.apply import ApplyReport, NodeApplier
    from fabmesh.node.cni import render_conflist
    from fabmesh.node.tunnel_sync import Credentials

    logging.basicConfig(stream=sys.stderr, level=logging.INFO)
    config = json.loads(config_path.read_text())
    creds = Credentials(key_pem=config["key_pem"], ca_pem=config["ca_pem"])
    applier = NodeApplier(config["node"], Path(config["vici_socket"]), Path(config["state_dir"]),
                          Path(config["cni_conf_path"]))
    steps: dict[str, float] = {}
    step = applier._step

    def timed_step(report: ApplyReport, what: str, fn: Any) -> None:
        started = time.perf_counter()
        step(report, what, fn)
        steps[what] = time.perf_counter() - started

    applier._step = timed_step  # type: ignore[method-assign]
    for line in sys.stdin:
        steps.clear()
        before = dict(applier.writes())
        started = time.perf_counter()
        mesh = parse_node_mesh(Path(line.strip()).read_text())
        state = desired_state(mesh, config["cert_pem"], conflist=render_conflist(mesh))
        planned = time.perf_counter()
        report = applier.apply(state, creds)
        done = time.perf_counter()
        writes = {k: v - before.get(k, 0) for k, v in applier.writes().items()}
        print(json.dumps({"converge_s": done - started, "plan_s": planned - started, "apply_s": done - planned,
                          "steps_s": dict(steps), "writes": writes, "errors": report.errors,
                          "changes": Counter(c.split()[0] for c in report.changes)}), flush=True)


def child_baseline(config_path: Path) -> None:
    """``swanctl --load-all`` then ``ip -batch``, timed together (and each), from inside the namespace."""
    config = json.loads(config_path.read_text())
    env = dict(os.environ, SWANCTL_DIR=config["swanctl_dir"], STRONGSWAN_CONF=config["swanctl_strongswan_conf"])
    started = time.perf_counter()
    swanctl = subprocess.run(["swanctl", "--load-all", "--noprompt", "--file", config["swanctl_conf"],
                              "--uri", f"unix://{config['vici_socket']}"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    loaded = time.perf_counter()
    ip = subprocess.run(["ip", "-batch", config["ip_batch"]], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                        text=True)
    done = time.perf_counter()
    errors = [f"{what} exited {p.returncode}: {p.stderr.strip()[-500:]}"
              for what, p in (("swanctl", swanctl), ("ip -batch", ip)) if p.returncode]
    print(json.dumps({"total_s": done - started, "swanctl_s": loaded - started, "ip_batch_s": done - loaded,
                      "errors": errors}), flush=True)


# -- one repetition ----------------------------------------------------------------------------------------------


def _spawn(host: Host, mode: str, config: Path, log: Path) -> subprocess.Popen[str]:
    with open(log, "w") as stderr:
        return subprocess.Popen(
            ["ip", "netns", "exec", host.netns, sys.executable, "-m", "bench.bench_agent_converge", "--child", mode,
             str(config)],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
            start_new_session=True)


def _reply(proc: subprocess.Popen[str], log: Path) -> dict[str, Any]:
    assert proc.stdout
    ready, _, _ = select.select([proc.stdout], [], [], REPLY_TIMEOUT_S)
    line = proc.stdout.readline() if ready else ""
    if not line:
        raise RuntimeError(f"the benchmark child gave no reply; its stderr:\n{log.read_text()[-4000:]}")
    return json.loads(line)


@contextlib.contextmanager
def _child(host: Host, mode: str, config: Path, log: Path) -> Iterator[subprocess.Popen[str]]:
    proc = _spawn(host, mode, config, log)
    try:
        yield proc
    finally:
        if proc.stdin:
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            stop_pid(proc.pid)
        if proc.stdout:
            proc.stdout.close()


def _prepare_host(net: Network, name: str) -> Host:
    host = net.add_host(name)
    host.run("ip", "route", "add", str(UNANSWERED), "via", SINK)
    host.start_charon()
    return host


def _observe(host: Host, table: int) -> dict[str, int]:
    """What the namespace holds afterwards: loaded connections, IKE_SAs, routes in our table."""
    assert host.charon
    with Charon(host.charon.vici_socket, timeout=60) as charon:
        conns, sas = len(charon.conns()), charon.sas()
    routes = host.run("ip", "-4", "route", "show", "table", str(table)).stdout.count("\n")
    return {"connections": conns, "ike_sas": len(sas), "routes": routes}


def run_fabmesh(net: Network, work: Path, mesh: NodeMesh, leaf: KeyPair, ca: KeyPair) -> dict[str, Any]:
    host = _prepare_host(net, "fm")
    assert host.charon
    directory = work / "fm-agent"
    directory.mkdir()
    mesh = mesh.model_copy(update={"node": mesh.node.model_copy(update={"endpoint": host.wan_ip})})
    mesh_file = directory / "mesh.yaml"
    mesh_file.write_text(mesh.to_yaml())
    config = directory / "config.json"
    config.write_text(json.dumps({
        "node": mesh.node.name, "vici_socket": str(host.charon.vici_socket), "state_dir": str(directory / "state"),
        "cni_conf_path": str(directory / "cni" / "10-fabmesh.conflist"), "cert_pem": leaf.cert_pem,
        "key_pem": leaf.key_pem, "ca_pem": ca.cert_pem}))
    log = directory / "agent.stderr"
    with _child(host, "fabmesh", config, log) as proc:
        assert proc.stdin
        replies = []
        for _ in range(2):
            proc.stdin.write(f"{mesh_file}\n")
            proc.stdin.flush()
            replies.append(_reply(proc, log))
    observed = _observe(host, mesh.settings.route_table)
    rss = _rss_kib(host.charon.pid)
    host.charon.stop()
    return {"first": replies[0], "resync": replies[1], "observed": observed, "charon_rss_kib": rss}


def run_baseline(net: Network, work: Path, mesh: NodeMesh, leaf: KeyPair, ca: KeyPair) -> dict[str, Any]:
    host = _prepare_host(net, "base")
    assert host.charon
    directory = work / "base-swanctl"
    for sub in ("x509", "x509ca", "pkcs8"):
        (directory / sub).mkdir(parents=True)
    (directory / "x509" / "edge.pem").write_text(leaf.cert_pem)
    (directory / "x509ca" / "ca.pem").write_text(ca.cert_pem)
    (directory / "pkcs8" / "edge.key").write_text(leaf.key_pem)
    mesh = mesh.model_copy(update={"node": mesh.node.model_copy(update={"endpoint": host.wan_ip})})
    state = desired_state(mesh, leaf.cert_pem, conflist="{}")
    (directory / "swanctl.conf").write_text(swanctl_conf(state, "edge.pem", "ca.pem"))
    (directory / "routes.batch").write_text(ip_batch(state))
    # swanctl itself needs only these plugins to read PEM files; loading Debian's default set costs it time.
    (directory / "strongswan.conf").write_text("swanctl {\n  load = random nonce openssl pem pkcs1 pkcs8 x509\n}\n")
    # Untimed set-up: the routes' source address (the pod gateway) must exist, as fabmesh's bridge gives it.
    assert state.bridge
    bridge, gateway, mtu = state.bridge
    host.run("ip", "link", "add", bridge, "mtu", str(mtu), "type", "bridge")
    host.run("ip", "addr", "add", gateway, "dev", bridge)
    host.run("ip", "link", "set", bridge, "up")
    config = directory / "config.json"
    config.write_text(json.dumps({
        "swanctl_dir": str(directory), "swanctl_conf": str(directory / "swanctl.conf"),
        "swanctl_strongswan_conf": str(directory / "strongswan.conf"), "vici_socket": str(host.charon.vici_socket),
        "ip_batch": str(directory / "routes.batch")}))
    log = directory / "baseline.stderr"
    with _child(host, "baseline", config, log) as proc:
        reply = _reply(proc, log)
    observed = _observe(host, mesh.settings.route_table)
    rss = _rss_kib(host.charon.pid)
    host.charon.stop()
    return {**reply, "observed": observed, "charon_rss_kib": rss, "initiators": len(state.initiators),
            "routes": len(state.routes)}


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def repetition(index: int, work: Path, mesh: NodeMesh, leaf: KeyPair, ca: KeyPair) -> dict[str, Any]:
    """Both sides on fresh namespaces and charons; the order alternates so neither always goes first."""
    rep = work / f"rep{index}"
    with network(rep / "net", tag="fmbc", wan_cidr=WAN_CIDR) as net:
        sh_wan = ["ip", "-n", net.wan_netns]
        subprocess.run([*sh_wan, "addr", "add", f"{SINK}/24", "dev", "br0"], check=True)
        result: dict[str, Any] = {}
        order = ("fabmesh", "baseline") if index % 2 == 0 else ("baseline", "fabmesh")
        for side in order:
            run = run_fabmesh if side == "fabmesh" else run_baseline
            result[side] = run(net, rep, mesh, leaf, ca)
            time.sleep(1.0)  # let the stopped charon's exit and its namespace settle before the other side
    return result


def plan_scaling(peers: int, ca_pem: str) -> dict[int, float]:
    """CPU seconds of ``desired_state`` alone (pure, in this process) at a quarter, half and all the peers."""
    result = {}
    for n in sorted({max(2, peers // 4), max(2, peers // 2), peers}):
        mesh = build_mesh(n, "198.51.100.1", ca_pem)
        started = time.process_time()
        desired_state(mesh, ca_pem, conflist="{}")
        result[n] = time.process_time() - started
    return result


# -- report ------------------------------------------------------------------------------------------------------


def summarise(reps: list[dict[str, Any]], peers: int) -> dict[str, Any]:
    def med(values: list[float]) -> float:
        return statistics.median(values)

    fm = [r["fabmesh"] for r in reps]
    base = [r["baseline"] for r in reps]
    converge = [f["first"]["converge_s"] for f in fm]
    apply = [f["first"]["apply_s"] for f in fm]
    baseline = [b["total_s"] for b in base]
    ratio = [c / b for c, b in zip(converge, baseline, strict=True)]
    ratio_apply = [a / b for a, b in zip(apply, baseline, strict=True)]
    steps = sorted({k for f in fm for k in f["first"]["steps_s"]})
    resync_writes = [f["resync"]["writes"] for f in fm]
    return {
        "peers": peers,
        "initiators": base[0]["initiators"],
        "routes": base[0]["routes"],
        "fabmesh_converge_s": med(converge),
        "fabmesh_plan_s": med([f["first"]["plan_s"] for f in fm]),
        "fabmesh_apply_s": med(apply),
        "fabmesh_steps_s": {k: med([f["first"]["steps_s"].get(k, 0.0) for f in fm]) for k in steps},
        "fabmesh_first_writes": fm[len(fm) // 2]["first"]["writes"],
        "baseline_total_s": med(baseline),
        "baseline_swanctl_s": med([b["swanctl_s"] for b in base]),
        "baseline_ip_batch_s": med([b["ip_batch_s"] for b in base]),
        "ratio_converge": med(ratio),
        "ratio_apply": med(ratio_apply),
        "ratio_target": RATIO_TARGET,
        "ratio_met": med(ratio) <= RATIO_TARGET,
        "resync_s": med([f["resync"]["converge_s"] for f in fm]),
        "resync_apply_s": med([f["resync"]["apply_s"] for f in fm]),
        "resync_writes_max": {k: max(w.get(k, 0) for w in resync_writes) for k in resync_writes[0]},
        "resync_zero_writes": all(sum(w.values()) == 0 for w in resync_writes),
        "observed_fabmesh": fm[0]["observed"],
        "observed_baseline": base[0]["observed"],
        "charon_rss_kib": {"fabmesh": med([f["charon_rss_kib"] for f in fm]),
                           "baseline": med([b["charon_rss_kib"] for b in base])},
        "errors": sorted({e for f in fm for e in f["first"]["errors"] + f["resync"]["errors"]}
                         | {e for b in base for e in b["errors"]}),
        "raw": {"converge_s": converge, "apply_s": apply, "baseline_s": baseline, "ratio": ratio},
    }


def print_report(report: dict[str, Any]) -> None:
    m, s = report["machine"], report["summary"]
    print(f"machine: {m['nproc']} x {m['cpu']}, Linux {m['kernel']}, {m['strongswan']}, Python {m['python']}")
    print(f"edge with {s['peers']} peers ({s['initiators']} initiated from here), {s['routes']} routes, "
          f"libipsec; median of {report['repeat']}")
    print(f"fabmesh converge from empty : {s['fabmesh_converge_s']:.2f} s  (plan {s['fabmesh_plan_s']:.2f} s, "
          f"apply {s['fabmesh_apply_s']:.2f} s)")
    print("  apply steps: " + ", ".join(f"{k} {v:.3f} s" for k, v in s["fabmesh_steps_s"].items()))
    print(f"  writes: {s['fabmesh_first_writes']}")
    print(f"baseline swanctl + ip -batch: {s['baseline_total_s']:.2f} s  (swanctl --load-all "
          f"{s['baseline_swanctl_s']:.2f} s, ip -batch {s['baseline_ip_batch_s']:.3f} s)")
    verdict = "met" if s["ratio_met"] else "NOT met"
    print(f"ratio fabmesh/baseline      : {s['ratio_converge']:.2f}x converge, {s['ratio_apply']:.2f}x apply only "
          f"(target <= {s['ratio_target']:.0f}x: {verdict})")
    zero = "met" if s["resync_zero_writes"] else "NOT met"
    print(f"resync, nothing changed     : {s['resync_s']:.2f} s (apply {s['resync_apply_s']:.2f} s), "
          f"writes {s['resync_writes_max']} (target 0: {zero})")
    print("desired_state CPU by peers  : " + ", ".join(f"{n}: {t:.2f} s" for n, t in report["plan_scaling"].items()))
    print(f"observed fabmesh {s['observed_fabmesh']}, baseline {s['observed_baseline']}; "
          f"charon RSS KiB {s['charon_rss_kib']}")
    print("per repetition: " + json.dumps(s["raw"]))
    if s["errors"]:
        print("errors: " + "; ".join(s["errors"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        mode, config = args.child
        (child_fabmesh if mode == "fabmesh" else child_baseline)(Path(config))
        return 0
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces, charon)")
    ca = new_ca(now=NOW)
    work = Path(tempfile.mkdtemp(prefix="fabmesh-bench-converge-"))
    try:
        mesh = build_mesh(args.peers, "198.51.100.1", ca.cert_pem)
        # Either host may run the fabmesh side, so the certificate names both WAN addresses.
        leaf = issue_leaf(ca, name=mesh.node.name, addresses=["198.51.100.1", "198.51.100.2"], now=NOW)
        reps = [repetition(i, work, mesh, leaf, ca) for i in range(args.repeat)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {"machine": machine(), "repeat": args.repeat, "summary": summarise(reps, args.peers),
              "plan_scaling": plan_scaling(args.peers, ca.cert_pem)}
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
