"""How many edge tunnels one connector charon holds, and how fast it sets up IKE_SAs.

Target (DESIGN.md): one connector charon holds >= 2,000 edge tunnels; publish
its IKE_SA setup rate.

Debian's strongSwan has no ``load-tester`` plugin, so the edges are played by
ONE second charon in another namespace: every edge has its own identity and
ECDSA P-256 certificate (``fabmesh.pki``), its own private key loaded over
VICI, its own source address (a /32 on the edges host's ``wan0``) and one
connection towards the connector, built by fabmesh's own builder
(``fabmesh.node.tunnels.connection``) from the edge's point of view. The
connector loads one connection per edge peer (role edge, endpoint ``None``:
``remote_addrs = %any``), again from ``connection``, through fabmesh's
``TunnelSync`` as the connector does. Both charons use the libipsec backend
(the kernel here has no ESP), so every tunnel is a real IKE_SA plus an
installed CHILD_SA.

Addressing (all inside namespaces this benchmark makes): the WAN is
198.18.0.0/24 (connector .1, edges host .2); the edges' own addresses come from
198.19.0.0/16 and the connector routes that /16 via the edges host, so it keeps
one ARP neighbour instead of thousands (neighbour-table limits are global,
not per namespace). libipsec refuses a CHILD_SA when no local address lies in
its local traffic selector, so each side gets "anchor" addresses on ``lo``, as
fabmesh's applier does.

Initiation runs through a window: the edges charon is asked (``initiate``,
timeout -1, so it returns at once) for new tunnels in batches while fewer than
``--window`` of its IKE_SAs are half-open. Both charons' ``stats``, CPU time
and RSS are sampled until the connector's established count stops growing;
edges whose one try failed (``keyingtries = 1``, as fabmesh sets it) are
initiated once more, as the agent's next pass would. The edges charon shares
the machine's CPUs with the connector, so the rate is a lower bound for a
connector with the machine to itself; the report gives the connector's CPU
seconds per tunnel, from which the rate on N free cores follows.

The charons run fabmesh's strongswan.conf (``render_strongswan_conf``) plus the
``counters`` plugin (retransmit and exchange counts over VICI); ``--knob
key=value`` adds ``charon.key = value`` to the benchmark's own copy, to try
strongswan.conf tuning without changing fabmesh's defaults.

    python -m bench.bench_connector_scale [--edges 2000] [--window 64] [--knob threads=32 ...] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import ipaddress
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import vici

from bench.machine import machine
from fabmesh.mesh.model import Backend, LocalNode, NodeMesh, Peer, Role, TunnelSettings
from fabmesh.node.tunnel_sync import Credentials, TunnelSync
from fabmesh.node.tunnels import connection
from fabmesh.pki.authority import KeyPair, issue_leaf, new_ca
from fabmesh.strongswan.conf import render_strongswan_conf
from fabmesh.strongswan.driver import Charon as Vici
from fabmesh.testenv.hosts import CHARON, Charon, Host, Network, network, vici_ready, wait_for

TUNNELS_TARGET = 2000
NOW = datetime.datetime.now(datetime.UTC)
WAN_CIDR = "198.18.0.0/24"
EDGE_WAN = ipaddress.IPv4Network("198.19.0.0/16")
EDGE_POOL = ipaddress.IPv4Network("10.128.0.0/10")
EDGE_IPS = ipaddress.IPv4Address("100.96.0.0")
CLOUD_POD, SERVICE = "10.64.0.0/11", "10.96.0.0/12"
TO_CONNECTOR = (CLOUD_POD, SERVICE, str(EDGE_POOL))
CONNECTOR = "connector-0"
SAMPLE_S = 0.5
STALL_S = 20.0  # the established count has not grown for this long: done
HOLD_S = 20.0  # after set-up, how long to watch the idle cost of the tunnels (DPD)
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- identities ---------------------------------------------------------------------------------------------------


def edge_name(i: int) -> str:
    return f"edge-{i:05d}"


def edge_wan(i: int) -> str:
    return str(EDGE_WAN.network_address + 1 + i)


def edge_internal(i: int) -> str:
    return str(EDGE_IPS + 1 + i)


def edge_pod(i: int) -> str:
    return str(ipaddress.IPv4Network((int(EDGE_POOL.network_address) + i * 256, 24)))


def _issue(args: tuple[KeyPair, int]) -> KeyPair:
    ca, i = args
    return issue_leaf(ca, name=edge_name(i), addresses=[edge_wan(i), edge_internal(i)], now=NOW)


def issue_edges(ca: KeyPair, count: int) -> list[KeyPair]:
    with ProcessPoolExecutor() as pool:
        return list(pool.map(_issue, [(ca, i) for i in range(count)], chunksize=64))


def tunnel_settings(dpd_delay_s: int | None) -> TunnelSettings:
    """fabmesh's cluster-wide tunnel settings on the libipsec backend (``None``: fabmesh's DPD delay)."""
    if dpd_delay_s is None:
        return TunnelSettings(backend=Backend.LIBIPSEC)
    return TunnelSettings(backend=Backend.LIBIPSEC, dpd_delay_s=dpd_delay_s)


def connector_mesh(count: int, address: str, ca_pem: str, tunnel: TunnelSettings) -> NodeMesh:
    """The connector as the operator plans it: every edge a responder-only peer (endpoint None)."""
    peers = tuple(Peer(name=edge_name(i), role=Role.EDGE, subnets=(edge_pod(i), f"{edge_internal(i)}/32"))
                  for i in range(count))
    node = LocalNode(name=CONNECTOR, role=Role.CONNECTOR, address=address, endpoint=address, pod_cidr="10.64.0.0/24")
    return NodeMesh(node=node, local_subnets=TO_CONNECTOR, mesh_cidrs=TO_CONNECTOR, peers=peers, caCert=ca_pem,
                    tunnel=tunnel)


def edge_connection(i: int, connector_ip: str, leaf: KeyPair, ca_pem: str, tunnel: TunnelSettings) -> dict[str, Any]:
    """Edge ``i``'s connection to the connector, from fabmesh's builder, as that edge's agent would load it."""
    peer = Peer(name=CONNECTOR, role=Role.CONNECTOR, endpoint=connector_ip, subnets=TO_CONNECTOR, initiate=True)
    node = LocalNode(name=edge_name(i), role=Role.EDGE, address=edge_internal(i), endpoint=edge_wan(i),
                     pod_cidr=edge_pod(i))
    mesh = NodeMesh(node=node, local_subnets=(edge_pod(i), f"{edge_internal(i)}/32"), mesh_cidrs=TO_CONNECTOR,
                    peers=(peer,), caCert=ca_pem, tunnel=tunnel)
    conn = connection(mesh, peer, leaf.cert_pem)
    # fabmesh binds %any locally (the kernel picks the source, as on a real edge host); one charon
    # playing every edge must pin each edge's own source address, as separate hosts would have.
    conn["local_addrs"] = [edge_wan(i)]
    return conn


# -- charon with the benchmark's own strongswan.conf -------------------------------------------------------------


def bench_conf(log_file: Path, knobs: dict[str, str], backend: Backend = Backend.LIBIPSEC) -> str:
    """fabmesh's strongswan.conf, plus the counters plugin and any ``charon.<knob>`` overrides."""
    text = render_strongswan_conf(backend=backend, vici_socket=Path("/run/charon.vici"),
                                  log_file=log_file)
    lines = text.splitlines()
    out: list[str] = []
    for line in lines:
        if line.strip().startswith("load = ") and "counters" not in line:
            line += " counters"
        out.append(line)
        if line.strip() == "charon {":
            out += [f"  {k} = {v}" for k, v in knobs.items()]
    return "\n".join(out) + "\n"


def start_charon(host: Host, knobs: dict[str, str], backend: Backend = Backend.LIBIPSEC) -> Charon:
    """As ``Host.start_charon`` (private /run by bind mount, own STRONGSWAN_CONF), with the benchmark's conf."""
    rundir = host.directory / "run"
    rundir.mkdir(parents=True, exist_ok=True)
    conf, log = host.directory / "strongswan.conf", host.directory / "charon.log"
    vici_socket = rundir / "charon.vici"
    conf.write_text(bench_conf(log, knobs, backend))
    env = dict(os.environ, STRONGSWAN_CONF=str(conf))
    with open(host.directory / "charon.stderr", "ab") as stderr:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", host.netns, "sh", "-c", f'mount --bind "{rundir}" /run && exec {CHARON}'],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    host.charon = Charon(host=host, process=proc, vici_socket=vici_socket, log_file=log)
    wait_for(lambda: vici_ready(vici_socket) or proc.poll() is not None, timeout=20, what=f"charon on {host.name}")
    if proc.poll() is not None:
        raise RuntimeError(f"charon on {host.name} exited with {proc.returncode}; see {log}")
    return host.charon


@contextlib.contextmanager
def open_session(charon: Charon) -> Iterator[vici.Session]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(300)
    sock.connect(str(charon.vici_socket))
    try:
        yield vici.Session(sock)
    finally:
        sock.close()


# -- observing a charon ------------------------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "Threads"):
            fields[key] = int(value.split()[0])
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    fields["cpu_ticks"] = int(stat[11]) + int(stat[12])  # utime + stime, all threads
    return fields


def _int(value: Any) -> int:
    return int(value.decode() if isinstance(value, bytes) else value)


def ike_stats(session: vici.Session) -> dict[str, int]:
    s = session.stats()
    workers, queues = s["workers"], s["queues"]
    return {"total": _int(s["ikesas"]["total"]), "half_open": _int(s["ikesas"]["half-open"]),
            "workers_total": _int(workers["total"]), "workers_idle": _int(workers["idle"]),
            "queued": sum(_int(v) for v in queues.values()), "scheduled": _int(s["scheduled"])}


def counters(session: vici.Session) -> dict[str, int]:
    """Global exchange counters (the ``counters`` plugin), the non-zero ones."""
    reply = session.get_counters({"all": "no"})["counters"]
    return {k: _int(v) for k, v in reply[next(iter(reply))].items() if _int(v)}


def established_children(session: vici.Session) -> tuple[int, int, set[str]]:
    """(IKE_SAs ESTABLISHED, of which with an INSTALLED CHILD_SA, names of connections with any IKE_SA)."""
    ike = children = 0
    names: set[str] = set()
    for item in session.list_sas():
        for name, sa in item.items():
            names.add(name.decode() if isinstance(name, bytes) else name)
            if sa.get("state") == b"ESTABLISHED":
                ike += 1
                if any(c.get("state") == b"INSTALLED" for c in sa.get("child-sas", {}).values()):
                    children += 1
    return ike, children, names


@dataclass
class Sample:
    t: float
    established: int
    half_open: int
    edges_half_open: int
    connector_cpu_s: float
    edges_cpu_s: float
    connector_rss_kib: int
    queued: int
    workers_idle: int


# -- the run -----------------------------------------------------------------------------------------------------


def build(net: Network, count: int) -> tuple[Host, Host]:
    connector = net.add_host("connector")
    edges = net.add_host("edges")
    batch = net.directory / "edges.batch"
    lines = [f"addr add {edge_wan(i)}/32 dev wan0" for i in range(count)]
    # libipsec anchors: an address inside every local traffic selector (fabmesh's applier adds the network address)
    lines += [f"addr add {a}/32 dev lo" for i in range(count)
              for a in (edge_internal(i), ipaddress.ip_network(edge_pod(i)).network_address)]
    batch.write_text("\n".join(lines) + "\n")
    edges.run("ip", "-batch", str(batch))
    connector.run("ip", "route", "add", str(EDGE_WAN), "via", edges.wan_ip)
    for subnet in TO_CONNECTOR:
        connector.run("ip", "addr", "add", f"{ipaddress.ip_network(subnet).network_address}/32", "dev", "lo")
    return connector, edges


@dataclass(frozen=True)
class Options:
    window: int
    batch: int
    knobs: dict[str, str]
    dpd_delay_s: int | None
    connector_backend: Backend
    budget_s: float


def run(count: int, opts: Options, work: Path) -> dict[str, Any]:
    window, batch_size, knobs, budget_s = opts.window, opts.batch, opts.knobs, opts.budget_s
    connector_backend = opts.connector_backend
    tunnel = tunnel_settings(opts.dpd_delay_s)
    result: dict[str, Any] = {"edges": count, "window": window, "batch": batch_size, "knobs": knobs,
                              "dpd_delay_s": tunnel.dpd_delay_s, "connector_backend": connector_backend.value}
    started = time.monotonic()
    ca = new_ca(now=NOW)
    leaves = issue_edges(ca, count)
    result["issue_certs_s"] = time.monotonic() - started
    with network(work / "net", tag="fmbs", wan_cidr=WAN_CIDR) as net:
        connector_host, edges_host = build(net, count)
        connector_leaf = issue_leaf(ca, name=CONNECTOR, addresses=[connector_host.wan_ip], now=NOW)
        connector = start_charon(connector_host, knobs, connector_backend)
        edges = start_charon(edges_host, knobs)
        result["rss_empty_kib"] = proc_status(connector.pid)["VmRSS"]

        # The connector loads every edge peer as fabmesh's connector does (TunnelSync over VICI).
        mesh = connector_mesh(count, connector_host.wan_ip, ca.cert_pem, tunnel)
        desired = {p.name: connection(mesh, p, connector_leaf.cert_pem) for p in mesh.peers}
        sync = TunnelSync(lambda: Vici(connector.vici_socket, timeout=120), work / "connector-tunnels.json")
        t = time.monotonic()
        changes = sync.apply(desired, Credentials(key_pem=connector_leaf.key_pem, ca_pem=ca.cert_pem), set())
        result["connector_load_s"] = time.monotonic() - t
        result["connector_loaded"] = len(changes.loaded)

        t = time.monotonic()
        with Vici(edges.vici_socket, timeout=120) as v:
            v.load_cert(ca.cert_pem, ca=True)
            for i, leaf in enumerate(leaves):
                v.load_key(leaf.key_pem)
                v.load_conn(edge_name(i), edge_connection(i, connector_host.wan_ip, leaf, ca.cert_pem, tunnel))
        result["edges_load_s"] = time.monotonic() - t
        result["rss_loaded_kib"] = proc_status(connector.pid)["VmRSS"]
        result["edges_rss_loaded_kib"] = proc_status(edges.pid)["VmRSS"]

        samples, failed_once = initiate_and_watch(connector, edges, count, window, batch_size, budget_s)
        result.update(summarise(samples, count))
        result["initiated_twice"] = failed_once
        result["hold"] = watch_idle(connector, edges, HOLD_S)
        # What fabmesh's own loops pay to observe a connector this size (node/loop.py gives list-sas 5 s).
        with Vici(connector.vici_socket, timeout=300) as v:
            t = time.monotonic()
            v.sas()
            result["fabmesh_list_sas_s"] = time.monotonic() - t
            t = time.monotonic()
            v.conns()
            result["fabmesh_list_conns_s"] = time.monotonic() - t
        with open_session(connector) as s:
            result["connector_ike_established"], result["connector_child_installed"], _ = established_children(s)
            result["connector_counters"] = counters(s)
        with open_session(edges) as s:
            result["edges_ike_established"], result["edges_child_installed"], _ = established_children(s)
            result["edges_counters"] = counters(s)
        after = proc_status(connector.pid)
        result["rss_after_kib"], result["threads"] = after["VmRSS"], after["Threads"]
        result["edges_rss_after_kib"] = proc_status(edges.pid)["VmRSS"]
        result["log"] = {"connector": log_counts(connector.log_file), "edges": log_counts(edges.log_file)}
    return result


def _initiate(session: vici.Session, i: int) -> None:
    # timeout -1: charon queues the job and answers at once; the window, not charon, limits what is in flight.
    list(session.initiate({"child": CONNECTOR, "ike": edge_name(i), "timeout": "-1", "init-limits": "no"}))


def _sample(t: float, c: dict[str, int], e: dict[str, int], connector: Charon, edges: Charon) -> Sample:
    cs, es = proc_status(connector.pid), proc_status(edges.pid)
    return Sample(t=t, established=c["total"] - c["half_open"], half_open=c["half_open"],
                  edges_half_open=e["half_open"], connector_cpu_s=cs["cpu_ticks"] / CLK_TCK,
                  edges_cpu_s=es["cpu_ticks"] / CLK_TCK, connector_rss_kib=cs["VmRSS"], queued=c["queued"],
                  workers_idle=c["workers_idle"])


def initiate_and_watch(connector: Charon, edges: Charon, count: int, window: int, batch: int,
                       budget_s: float) -> tuple[list[Sample], int]:
    """Initiate every edge through the window; sample until the established count stops growing.

    Returns the samples (``t`` from the first initiate) and how many edges needed a second initiate.
    """
    samples: list[Sample] = []
    pending = list(range(count))
    retried = -1
    with open_session(connector) as cs, open_session(edges) as es:
        t0 = time.monotonic()
        best, last_growth, last_sample = -1, t0, -SAMPLE_S
        while True:
            now = time.monotonic() - t0
            e = ike_stats(es)
            if pending:
                n = min(batch, window - e["half_open"], len(pending))
                for i in pending[:max(n, 0)]:
                    _initiate(es, i)
                pending = pending[max(n, 0):]
            if now - last_sample >= SAMPLE_S or not pending:
                c = ike_stats(cs)
                sample = _sample(now, c, e, connector, edges)
                samples.append(sample)
                last_sample = now
                if sample.established > best:
                    best, last_growth = sample.established, now
                if sample.established >= count or now > budget_s:
                    break
                if not pending and now - last_growth > STALL_S:
                    if retried >= 0:
                        break
                    # keyingtries = 1 (fabmesh's setting): a failed try is final until the agent's next pass.
                    _, _, with_sa = established_children(es)
                    pending = [i for i in range(count) if edge_name(i) not in with_sa]
                    retried = len(pending)
                    last_growth = now
                    if not pending:
                        break
            time.sleep(0.02 if pending else SAMPLE_S)
    return samples, max(retried, 0)


def summarise(samples: list[Sample], count: int) -> dict[str, Any]:
    final = samples[-1]
    done = next((s for s in samples if s.established >= final.established), final)
    first = samples[0]
    # Steady rate: between 10 % and 90 % of the final count (ramp-up and the tail left out).
    lo = next((s for s in samples if s.established >= 0.1 * final.established), first)
    hi = next((s for s in samples if s.established >= 0.9 * final.established), final)
    steady = (hi.established - lo.established) / (hi.t - lo.t) if hi.t > lo.t else 0.0
    peak = 0.0
    for s in samples:
        earlier = [p for p in samples if s.t - 5.0 <= p.t < s.t]
        if earlier:
            peak = max(peak, (s.established - earlier[0].established) / (s.t - earlier[0].t))
    cpu = done.connector_cpu_s - first.connector_cpu_s
    edges_cpu = done.edges_cpu_s - first.edges_cpu_s
    return {
        "established": final.established,
        "target_met": final.established >= TUNNELS_TARGET,
        "time_to_establish_s": done.t,
        "rate_avg_per_s": done.established / done.t if done.t else 0.0,
        "rate_steady_per_s": steady,
        "rate_peak_5s_per_s": peak,
        "connector_cpu_s": cpu,
        "edges_cpu_s": edges_cpu,
        "connector_cpu_ms_per_tunnel": 1000 * cpu / max(done.established, 1),
        "edges_cpu_ms_per_tunnel": 1000 * edges_cpu / max(done.established, 1),
        "connector_cpu_share": cpu / done.t if done.t else 0.0,
        "edges_cpu_share": edges_cpu / done.t if done.t else 0.0,
        "max_connector_half_open": max(s.half_open for s in samples),
        "max_queued_jobs": max(s.queued for s in samples),
        "min_workers_idle": min(s.workers_idle for s in samples),
        "median_workers_idle": statistics.median(s.workers_idle for s in samples),
        "timeline": [(round(s.t, 1), s.established, s.half_open) for s in samples[:: max(1, len(samples) // 40)]],
    }


def watch_idle(connector: Charon, edges: Charon, seconds: float) -> dict[str, float]:
    """CPU share of each charon while the tunnels only idle (DPD, every ``dpd_delay``), and their exchanges."""
    with open_session(connector) as cs:
        before_c, before = counters(cs), (proc_status(connector.pid), proc_status(edges.pid))
        time.sleep(seconds)
        after_c, after = counters(cs), (proc_status(connector.pid), proc_status(edges.pid))
    informational = sum(after_c.get(k, 0) - before_c.get(k, 0) for k in ("info-in-req", "info-in-resp"))
    return {"seconds": seconds,
            "connector_cpu_share": (after[0]["cpu_ticks"] - before[0]["cpu_ticks"]) / CLK_TCK / seconds,
            "edges_cpu_share": (after[1]["cpu_ticks"] - before[1]["cpu_ticks"]) / CLK_TCK / seconds,
            "connector_informational_in_per_s": informational / seconds}


def log_counts(path: Path) -> dict[str, int]:
    """How often charon logged the events that explain a slow or failed set-up."""
    patterns = {"retransmit": "retransmit ", "gave_up": "giving up after", "cookie": "[ N(COOKIE) ]",
                "init_dropped": "dropping IKE_SA_INIT", "failed": "failed to establish",
                "no_proposal": "NO_PROPOSAL_CHOSEN"}
    found = dict.fromkeys(patterns, 0)
    with contextlib.suppress(FileNotFoundError), open(path, errors="replace") as log:
        for line in log:
            for key, needle in patterns.items():
                if needle in line:
                    found[key] += 1
    return found


# -- report ------------------------------------------------------------------------------------------------------


def print_report(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(f"machine: {m['nproc']} x {m['cpu']}, Linux {m['kernel']}, {m['strongswan']}, Python {m['python']}")
    for r in report["runs"]:
        knobs = " ".join(f"{k}={v}" for k, v in r["knobs"].items()) or "fabmesh defaults"
        verdict = "met" if r["established"] >= TUNNELS_TARGET else "NOT met"
        print(f"\n{r['edges']} edges, window {r['window']}, batch {r['batch']}, DPD every {r['dpd_delay_s']} s, "
              f"connector backend {r['connector_backend']}, charon: {knobs}")
        print(f"  certs issued in {r['issue_certs_s']:.1f} s; connector loaded {r['connector_loaded']} conns in "
              f"{r['connector_load_s']:.1f} s (TunnelSync); edges charon loaded in {r['edges_load_s']:.1f} s")
        print(f"  established {r['established']} (target >= {TUNNELS_TARGET}: {verdict}) in "
              f"{r['time_to_establish_s']:.1f} s; second initiate needed for {r['initiated_twice']}")
        print(f"  IKE_SA set-up rate: {r['rate_avg_per_s']:.0f}/s average, {r['rate_steady_per_s']:.0f}/s steady "
              f"(10-90 %), {r['rate_peak_5s_per_s']:.0f}/s peak over 5 s")
        print(f"  verified: connector {r['connector_ike_established']} IKE_SAs ESTABLISHED, "
              f"{r['connector_child_installed']} with an INSTALLED CHILD_SA; edges {r['edges_ike_established']}/"
              f"{r['edges_child_installed']}")
        print(f"  CPU during set-up: connector {r['connector_cpu_share']:.2f} cores "
              f"({r['connector_cpu_ms_per_tunnel']:.1f} ms/tunnel), edges {r['edges_cpu_share']:.2f} cores "
              f"({r['edges_cpu_ms_per_tunnel']:.1f} ms/tunnel); idle workers min {r['min_workers_idle']} "
              f"(median {r['median_workers_idle']}), jobs queued max {r['max_queued_jobs']}, "
              f"connector half-open max {r['max_connector_half_open']}")
        print(f"  connector RSS: {r['rss_empty_kib'] / 1024:.1f} MiB empty, {r['rss_loaded_kib'] / 1024:.1f} MiB "
              f"with {r['edges']} conns loaded, {r['rss_after_kib'] / 1024:.1f} MiB with the tunnels up "
              f"({(r['rss_after_kib'] - r['rss_loaded_kib']) / max(r['established'], 1):.1f} KiB/tunnel); "
              f"{r['threads']} threads")
        print(f"  fabmesh's VICI driver on this connector: list-sas {r['fabmesh_list_sas_s']:.1f} s, "
              f"list-conns {r['fabmesh_list_conns_s']:.1f} s")
        h = r["hold"]
        print(f"  idle ({h['seconds']:.0f} s, DPD): connector {h['connector_cpu_share']:.2f} cores, edges "
              f"{h['edges_cpu_share']:.2f} cores, {h['connector_informational_in_per_s']:.0f} INFORMATIONAL/s in")
        print(f"  log: connector {r['log']['connector']}, edges {r['log']['edges']}")
        print(f"  counters: connector {r['connector_counters']}")
        print(f"  timeline (s, established, half-open): {r['timeline']}")


def _knob(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key.removeprefix("charon."), value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edges", type=int, nargs="+", default=[2000], help="one run per count (default 2000)")
    parser.add_argument("--window", type=int, default=64, help="most half-open IKE_SAs the edges may have")
    parser.add_argument("--batch", type=int, default=16, help="initiates per step")
    parser.add_argument("--knob", type=_knob, action="append", default=[], metavar="KEY=VALUE",
                        help="charon.KEY = VALUE in the benchmark's strongswan.conf (repeatable)")
    parser.add_argument("--dpd-delay", type=int, default=None,
                        help="the mesh's dpd_delay_s for this run (default: fabmesh's, 10 s)")
    parser.add_argument("--connector-backend", choices=[b.value for b in Backend], default=Backend.LIBIPSEC.value,
                        help="kernel: this kernel has no ESP, so every CHILD_SA fails to install and only the IKE "
                             "side is measured (the cost without libipsec's policy lists)")
    parser.add_argument("--budget", type=float, default=240.0, help="stop initiating/watching after this many s")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (charon logs) and say where")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces, charon)")
    if max(args.edges) > EDGE_WAN.num_addresses - 2:
        parser.error(f"at most {EDGE_WAN.num_addresses - 2} edges fit {EDGE_WAN}")
    opts = Options(window=args.window, batch=args.batch, knobs=dict(args.knob), dpd_delay_s=args.dpd_delay,
                   connector_backend=Backend(args.connector_backend), budget_s=args.budget)
    runs = []
    for count in args.edges:
        work = Path(tempfile.mkdtemp(prefix="fabmesh-bench-connector-"))
        try:
            runs.append(run(count, opts, work))
        finally:
            if args.keep:
                print(f"work directory kept: {work}", file=sys.stderr)
            else:
                shutil.rmtree(work, ignore_errors=True)
    report = {"machine": machine(), "runs": runs}
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
