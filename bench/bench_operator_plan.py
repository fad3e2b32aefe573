"""How long the operator takes to plan a large cluster, how big its ConfigMaps get, and what one join rewrites.

The operator replans the whole cluster on every event and every resync, so
``plan()`` must stay well under a second at 10,000 nodes (target: <= 1 s CPU),
every per-node object must stay far below the API server's 1 MiB object limit
(target: < 100 KiB), and the connector's peers must fit 1 MiB per object once
sharded. A join must rewrite only what it concerns: the new node's ConfigMap,
the members of its communities and one connector shard.

The cluster is synthetic but shaped like the real one: Node objects as the API
server returns them (plain dicts), read with :func:`read_node` exactly as the
operator does. Two settings are planned: ``cloud_node_cidrs`` set to a couple
of /16s, and the default (empty), with which the planner of commit bbd574e puts
every cloud node as a /32 in every edge's connector tunnel (the report says
whether the planner under test does). Times are CPU time (``time.process_time``);
the floor is one ``json.dumps`` of the same Node list, measured in the same run,
so the ratio survives a change of machine.

    python -m bench.bench_operator_plan [--nodes 10000 --edges 5000 --communities 100] [--json]
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import gc
import io
import ipaddress
import json
import os
import platform
import pstats
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from fabmesh.mesh import model as mesh_model
from fabmesh.mesh.model import PeerShard, Role, dump_yaml
from fabmesh.operator import objects as o
from fabmesh.operator.inventory import FLANNEL_PREFIX, InvalidNode, NodeInfo, read_node
from fabmesh.operator.plan import MeshPlan, plan, shard_of
from fabmesh.operator.settings import OperatorSettings
from fabmesh.pki.authority import issue_leaf, new_ca, public_key_b64

T = TypeVar("T")

PLAN_TARGET_S = 1.0
NODE_OBJECT_TARGET = 100 * 1024
API_OBJECT_LIMIT = 1024 * 1024
# The default pool (a /16 of /24s) holds 256 edges; 5,000 need a bigger one. A /10 holds 16,384 and
# overlaps neither the default cloud pod CIDR nor the Service CIDR.
EDGE_POD_POOL = "10.128.0.0/10"
# Cloud nodes carry a flannel /24 each in spec.podCIDR (IPAM must step around them): 8,192 of them here.
CLOUD_POD_CIDR = ipaddress.IPv4Network("10.64.0.0/11")
BASE_SETTINGS: dict[str, Any] = {"edge_pod_pool": EDGE_POD_POOL, "cloud_pod_cidrs": (str(CLOUD_POD_CIDR),)}
CLOUD_BASE = ipaddress.IPv4Address("100.64.0.0")  # connector and cloud nodes: 100.64.0.1 upwards
EDGE_BASE = ipaddress.IPv4Address("100.96.0.0")  # edges: 100.96.0.1 upwards
CLOUD_NODE_CIDRS = ("100.64.0.0/16", "100.65.0.0/16")
CONNECTOR = "connector-0"
EPOCH = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)


# -- the synthetic cluster -----------------------------------------------------------------------


def node_dict(name: str, ip: str, created: int, labels: dict[str, str] | None = None,
              annotations: dict[str, str] | None = None, pod_cidr: str | None = None) -> dict[str, Any]:
    """A Node as the API server lists it (only the fields the operator reads, plus a uid)."""
    stamp = (EPOCH + datetime.timedelta(seconds=created)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"metadata": {"name": name, "uid": f"uid-{name}", "resourceVersion": "1", "creationTimestamp": stamp,
                         "labels": labels or {}, "annotations": annotations or {}},
            "spec": {"podCIDR": pod_cidr} if pod_cidr else {},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}


def edge_dict(settings: OperatorSettings, index: int, communities: Sequence[str], created: int,
              name: str | None = None) -> dict[str, Any]:
    labels = {settings.edge_label: "", **{settings.community_label_prefix + c: "" for c in communities}}
    return node_dict(name or f"edge-{index:05d}", str(EDGE_BASE + index + 1), created, labels)


def cloud_dict(index: int, created: int, name: str | None = None) -> dict[str, Any]:
    return node_dict(name or f"cloud-{index:05d}", str(CLOUD_BASE + index + 2), created,
                     pod_cidr=cloud_pod_cidr(index + 1))


def cloud_pod_cidr(index: int) -> str:
    """The flannel /24 of the index-th cloud node (the connector is 0)."""
    return f"{CLOUD_POD_CIDR.network_address + 256 * index}/24"


def build_nodes(settings: OperatorSettings, nodes: int, edges: int, communities: int,
                seed: int) -> list[dict[str, Any]]:
    """1 connector, ``nodes - edges - 1`` cloud nodes, ``edges`` edges each in 1 to 3 communities."""
    if edges > nodes - 1:
        raise SystemExit(f"--edges {edges} leaves no room for the connector among --nodes {nodes}")
    if nodes - edges > CLOUD_POD_CIDR.num_addresses // 256:
        raise SystemExit(f"more than {CLOUD_POD_CIDR.num_addresses // 256} cloud nodes do not fit {CLOUD_POD_CIDR}")
    rng = random.Random(seed)
    names = [community_name(i) for i in range(communities)]
    ip = str(CLOUD_BASE + 1)
    flannel = {FLANNEL_PREFIX + "backend-type": "vxlan",
               FLANNEL_PREFIX + "backend-data": '{"VNI":1,"VtepMAC":"0a:58:0a:f4:00:01"}',
               FLANNEL_PREFIX + "public-ip": ip}
    result = [node_dict(CONNECTOR, ip, 0, {settings.connector_label: ""}, flannel, cloud_pod_cidr(0))]
    result += [cloud_dict(i, 1 + i) for i in range(nodes - edges - 1)]
    result += [edge_dict(settings, i, sorted(rng.sample(names, rng.randint(1, min(3, communities)))), nodes + i)
               for i in range(edges)]
    return result


def community_name(index: int) -> str:
    return f"c{index:03d}"


def read_all(objs: Sequence[dict[str, Any]], settings: OperatorSettings) -> list[NodeInfo]:
    infos = []
    for obj in objs:
        info = read_node(obj, settings)
        if isinstance(info, InvalidNode):
            raise SystemExit(f"synthetic node is invalid: {info}")
        infos.append(info)
    return infos


def apply_patches(objs: Sequence[dict[str, Any]], mesh: MeshPlan) -> list[dict[str, Any]]:
    """The Nodes as the operator leaves them: its annotations and spec.podCIDR written back."""
    result = []
    for obj in objs:
        patch = mesh.node_patches.get(obj["metadata"]["name"])
        if patch is None:
            result.append(obj)
            continue
        meta = {**obj["metadata"], "annotations": {**obj["metadata"]["annotations"], **patch.annotations}}
        spec = {**obj["spec"], **({"podCIDR": patch.spec_pod_cidr} if patch.spec_pod_cidr else {})}
        result.append({**obj, "metadata": meta, "spec": spec})
    return result


def render(mesh: MeshPlan) -> dict[str, str]:
    """Every ConfigMap payload the reconciler would write for ``mesh``, by object name."""
    payloads = {o.agent_configmap_name(name): node_mesh.to_yaml() for name, node_mesh in mesh.edges.items()}
    return payloads | render_connector(mesh)


def render_connector(mesh: MeshPlan) -> dict[str, str]:
    """The connector's header (``mesh.yaml``) and its peer shards (``peers.yaml``), as reconcile writes them."""
    if mesh.connector is None:
        return {}
    payloads = {o.CONNECTOR_CONFIGMAP: mesh.connector.to_yaml()}
    for shard, peers in sorted(mesh.connector_shards.items()):
        payloads[o.connector_shard_name(shard)] = dump_yaml(PeerShard(shard=shard, peers=peers))
    return payloads


# -- measuring -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    min_s: float
    median_s: float


def measure(step: str, fn: Callable[[], T], repeat: int,
            setup: Callable[[], object] | None = None) -> tuple[Timing, T]:
    """CPU time of ``fn`` over ``repeat`` runs (``setup`` and a garbage collection before each, untimed).

    Each run is also logged to stderr as it ends: a long run that is cut short keeps its figures.
    """
    times = []
    result: T
    for _ in range(repeat):
        if setup is not None:
            setup()
        gc.collect()
        start = time.process_time()
        result = fn()
        times.append(time.process_time() - start)
        progress(f"step={step} run={len(times)} cpu_s={times[-1]:.3f}")
    return Timing(min(times), statistics.median(times)), result


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def forget_rendered_peers() -> bool:
    """Empty the renderer's per-Peer cache, if it has one, so that a run measures the operator's first pass.

    The cache is keyed by object identity and each plan() builds new Peer objects, so within one
    pass every shared Peer renders once; "warm" (same plan rendered twice) is reported for contrast.
    """
    cache = getattr(mesh_model, "_PEER_CACHE", None)
    if cache is not None:
        cache.clear()
    return cache is not None


@dataclass(frozen=True)
class Sizes:
    edge_max_bytes: int
    edge_max_node: str
    edge_mean_bytes: float
    edge_max_object_bytes: int  # the whole ConfigMap (metadata included), as JSON
    edge_peers_max: int
    edge_peers_mean: float
    connector_header_bytes: int
    shard_max_bytes: int
    connector_total_bytes: int  # every shard
    connector_bytes_per_edge: float
    shard_max_projected_10k_edges: int  # the largest shard, scaled linearly to 10,000 edges


def sizes(mesh: MeshPlan, payloads: dict[str, str], namespace: str) -> Sizes:
    edge_bytes = {name: len(payloads[o.agent_configmap_name(name)].encode()) for name in mesh.edges}
    largest = max(edge_bytes, key=lambda n: (edge_bytes[n], n))
    body = o.configmap(o.agent_configmap_name(largest), namespace, "agent-config",
                       {"mesh.yaml": payloads[o.agent_configmap_name(largest)]}, largest, f"uid-{largest}")
    shard_bytes = [len(payloads[o.connector_shard_name(i)].encode()) for i in mesh.connector_shards]
    peers = [len(m.peers) for m in mesh.edges.values()]
    total = sum(shard_bytes)
    return Sizes(
        edge_max_bytes=edge_bytes[largest], edge_max_node=largest,
        edge_mean_bytes=statistics.fmean(edge_bytes.values()),
        edge_max_object_bytes=len(json.dumps(body, separators=(",", ":")).encode()),
        edge_peers_max=max(peers), edge_peers_mean=statistics.fmean(peers),
        connector_header_bytes=len(payloads[o.CONNECTOR_CONFIGMAP].encode()),
        shard_max_bytes=max(shard_bytes), connector_total_bytes=total,
        connector_bytes_per_edge=total / len(mesh.edges),
        shard_max_projected_10k_edges=round(max(shard_bytes) * 10_000 / len(mesh.edges)),
    )


@dataclass(frozen=True)
class Join:
    scenario: str
    changed: list[str]
    patched: list[str]
    expected_changed: list[str]
    expected_patched: list[str]
    plan_s: float

    @property
    def as_expected(self) -> bool:
        return self.changed == self.expected_changed and self.patched == self.expected_patched


def changed_objects(before: MeshPlan, before_payloads: dict[str, str], after: MeshPlan) -> list[str]:
    """Names of the ConfigMaps whose payload differs between two plans (created or deleted included).

    ``to_yaml`` is a function of the model, so an edge whose ``NodeMesh`` is equal renders equal
    bytes; only edges whose model differs are rendered again and compared byte for byte.
    """
    changed = set()
    for name in before.edges.keys() | after.edges.keys():
        old, new = before.edges.get(name), after.edges.get(name)
        if old != new and (new is None or before_payloads.get(o.agent_configmap_name(name)) != new.to_yaml()):
            changed.add(o.agent_configmap_name(name))
    old_connector, new_connector = render_connector(before), render_connector(after)
    changed |= {n for n in old_connector.keys() | new_connector.keys() if old_connector.get(n) != new_connector.get(n)}
    return sorted(changed)


def expected_writes(newcomer: NodeInfo, cluster: Sequence[NodeInfo], settings: OperatorSettings,
                    cloud_hosts_listed: bool) -> tuple[set[str], set[str]]:
    """What a join should rewrite and patch, derived from the Nodes (not from the plan's output)."""
    if newcomer.role is Role.EDGE:
        mates = {n.name for n in cluster if n.role is Role.EDGE and set(n.communities) & set(newcomer.communities)}
        changed = {o.agent_configmap_name(n) for n in {newcomer.name, *mates}}
        changed.add(o.connector_shard_name(shard_of(newcomer.name, settings.connector_shards)))
        return changed, {newcomer.name}
    if not cloud_hosts_listed:
        return set(), set()
    # Without cloud_node_cidrs the new cloud /32 joins every connector tunnel: every edge and the header.
    edges = {o.agent_configmap_name(n.name) for n in cluster if n.role is Role.EDGE}
    return {o.CONNECTOR_CONFIGMAP, *edges}, set()


_LEAF: dict[str, str] = {}


def planned(infos: Sequence[NodeInfo], settings: OperatorSettings, ca: str,
            recorded: dict[str, str] | None = None) -> MeshPlan:
    """What the operator writes: plan() with every peer pinned to its node's public key.

    One real P-256 key stands for every node's: the sizes are what matters here, and issuing
    10,000 keys would measure the key generator, not the planner.
    """
    return plan(infos, settings, ca, recorded, keys=dict.fromkeys((n.name for n in infos), _LEAF["key"]))


def join(scenario: str, steady_infos: list[NodeInfo], steady: MeshPlan, steady_payloads: dict[str, str],
         newcomer: dict[str, Any], settings: OperatorSettings, ca: str, cloud_hosts_listed: bool) -> Join:
    """Plan once more with ``newcomer`` added to the steady cluster, and list what would be written."""
    new = read_all([newcomer], settings)[0]
    start = time.process_time()
    after = planned([*steady_infos, new], settings, ca, steady.ipam_record)
    elapsed = time.process_time() - start
    expected_changed, expected_patched = expected_writes(new, steady_infos, settings, cloud_hosts_listed)
    result = Join(scenario=scenario, changed=changed_objects(steady, steady_payloads, after),
                  patched=sorted(after.node_patches), expected_changed=sorted(expected_changed),
                  expected_patched=sorted(expected_patched), plan_s=elapsed)
    progress(f"step=join scenario={scenario!r} cpu_s={elapsed:.3f} changed={len(result.changed)} "
             f"as_expected={result.as_expected}")
    return result


@dataclass
class Variant:
    name: str
    cloud_node_cidrs: list[str]
    read_nodes: Timing
    plan_scratch: Timing
    plan_resync: Timing
    render_cold: Timing  # first pass: the renderer's per-Peer cache (if any) emptied before each run
    render_warm: Timing  # later passes in the same process
    plan_errors: int
    cloud_hosts_listed: bool  # each cloud node's /32 is in every connector tunnel
    resync_changed_objects: int
    resync_patched_nodes: int
    sizes: Sizes
    joins: list[Join] = field(default_factory=list)


def run_variant(name: str, settings: OperatorSettings, objs: list[dict[str, Any]], ca: str, repeat: int,
                newcomers: Sequence[tuple[str, dict[str, Any]]]) -> Variant:
    read_t, infos = measure(f"{name}/read_node", lambda: read_all(objs, settings), repeat)
    scratch_t, fresh = measure(f"{name}/plan-scratch", lambda: planned(infos, settings, ca), repeat)
    cold_t, payloads = measure(f"{name}/render-cold", lambda: render(fresh), repeat, setup=forget_rendered_peers)
    warm_t, _ = measure(f"{name}/render-warm", lambda: render(fresh), repeat)
    # Steady state, as after the first pass: the Nodes carry the annotations and spec.podCIDR the
    # operator wrote, and the IPAM record is the one it stored.
    steady_infos = read_all(apply_patches(objs, fresh), settings)
    resync_t, steady = measure(f"{name}/plan-resync", lambda: planned(steady_infos, settings, ca, fresh.ipam_record),
                               repeat)
    # Whether plan() lists every cloud node as a /32 (it did when cloud_node_cidrs was empty) decides
    # what a cloud node's join must rewrite: ask the connector's own address.
    connector = next(n for n in infos if n.role is Role.CONNECTOR)
    listed = fresh.connector is not None and f"{connector.internal_ip}/32" in fresh.connector.local_subnets
    return Variant(
        name=name, cloud_node_cidrs=list(settings.cloud_node_cidrs), read_nodes=read_t, plan_scratch=scratch_t,
        plan_resync=resync_t, render_cold=cold_t, render_warm=warm_t, plan_errors=len(fresh.errors),
        cloud_hosts_listed=listed, resync_changed_objects=len(changed_objects(fresh, payloads, steady)),
        resync_patched_nodes=len(steady.node_patches), sizes=sizes(fresh, payloads, settings.namespace),
        joins=[join(scenario, steady_infos, steady, payloads, newcomer, settings, ca, listed)
               for scenario, newcomer in newcomers])


def newcomers(settings: OperatorSettings, objs: Sequence[dict[str, Any]], communities: int,
              seed: int) -> list[tuple[str, dict[str, Any]]]:
    """One node at a time joining the cluster: an edge in two communities, a lonely edge, a cloud node."""
    edges = sum(1 for obj in objs if settings.edge_label in obj["metadata"]["labels"])
    last = len(objs)
    two = sorted(random.Random(seed + 1).sample([community_name(i) for i in range(communities)],
                                                min(2, communities)))
    return [
        (f"edge joins, communities {','.join(two)}", edge_dict(settings, edges, two, last, "edge-joined")),
        ("edge joins, no community", edge_dict(settings, edges + 1, (), last + 1, "edge-lonely")),
        ("cloud node joins", cloud_dict(last - edges - 1, last + 2, "cloud-joined")),
    ]


def profile_plan(settings: OperatorSettings, objs: list[dict[str, Any]], ca: str, top: int) -> str:
    infos = read_all(objs, settings)
    profiler = cProfile.Profile()
    profiler.runcall(plan, infos, settings, ca)
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


# -- reporting -----------------------------------------------------------------------------------


def is_agent_configmap(name: str) -> bool:
    return name.startswith(o.agent_configmap_name(""))


def variant_report(v: Variant, floor: Timing, names_shown: int) -> dict[str, Any]:
    """A variant as plain data; long lists of changed objects are cut to ``names_shown`` names.

    The connector's objects (header and shards) are listed apart, never cut.
    """
    joins = [{**asdict(j), "changed_count": len(j.changed), "expected_changed_count": len(j.expected_changed),
              "changed_agent_configmaps": sum(map(is_agent_configmap, j.changed)),
              "changed_connector_objects": [n for n in j.changed if not is_agent_configmap(n)],
              "changed": j.changed[:names_shown], "expected_changed": j.expected_changed[:names_shown],
              "names_cut": len(j.changed) > names_shown, "as_expected": j.as_expected} for j in v.joins]
    return {**asdict(v), "joins": joins,
            "plan_scratch_ratio_to_json_floor": v.plan_scratch.min_s / floor.min_s,
            "plan_resync_ratio_to_json_floor": v.plan_resync.min_s / floor.min_s,
            "targets_met": {
                "plan_scratch_le_1s": v.plan_scratch.min_s <= PLAN_TARGET_S,
                "plan_resync_le_1s": v.plan_resync.min_s <= PLAN_TARGET_S,
                "edge_object_lt_100KiB": v.sizes.edge_max_object_bytes < NODE_OBJECT_TARGET,
                "connector_objects_lt_1MiB_at_10k_edges":
                    max(v.sizes.connector_header_bytes, v.sizes.shard_max_projected_10k_edges) < API_OBJECT_LIMIT,
            }}


def kib(n: float) -> str:
    return f"{n / 1024:,.1f} KiB"


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def print_report(report: dict[str, Any]) -> None:
    m, p, floor = report["machine"], report["params"], report["baseline_json_dumps"]
    print(f"fabmesh operator plan benchmark: {p['nodes']:,} nodes ({p['edges']:,} edges, "
          f"{p['communities']} communities, seed {p['seed']}), {p['repeat']} runs each, CPU seconds")
    print(f"machine: {m['nproc']} cores, {m['platform']}, Python {m['python']}; peak RSS {m['peak_rss_mib']:,} MiB")
    print(f"floor: json.dumps of the Node list  min {floor['min_s']:.3f}  median {floor['median_s']:.3f}  "
          f"(x floor = ratio to one JSON serialisation of the input, measured in the same run)")
    for v in report["variants"]:
        s, ok = v["sizes"], v["targets_met"]
        cidrs = tuple(v["cloud_node_cidrs"])
        print(f"\n== {v['name']}: cloud_node_cidrs={cidrs}; each cloud node listed as a /32 in the "
              f"connector tunnel: {'yes' if v['cloud_hosts_listed'] else 'no'}")
        print(f"  {'step':<36}{'min s':>9}{'median s':>10}{'x floor':>10}")
        for label, key in (("read_node, all nodes", "read_nodes"), ("plan() from scratch", "plan_scratch"),
                           ("plan() resync (record + annotated)", "plan_resync"),
                           ("render all ConfigMaps, first pass", "render_cold"),
                           ("render all ConfigMaps, warm cache", "render_warm")):
            t = v[key]
            print(f"  {label:<36}{t['min_s']:>9.3f}{t['median_s']:>10.3f}{t['min_s'] / floor['min_s']:>10.0f}")
        print(f"  target plan() <= {PLAN_TARGET_S:.0f} s CPU: scratch {verdict(ok['plan_scratch_le_1s'])}, "
              f"resync {verdict(ok['plan_resync_le_1s'])}")
        print(f"  plan errors {v['plan_errors']}; resync rewrites {v['resync_changed_objects']} objects, "
              f"patches {v['resync_patched_nodes']} nodes")
        print(f"  edge mesh.yaml: max {kib(s['edge_max_bytes'])} ({s['edge_max_node']}, {s['edge_peers_max']} peers), "
              f"mean {kib(s['edge_mean_bytes'])} ({s['edge_peers_mean']:.0f} peers); largest object "
              f"{kib(s['edge_max_object_bytes'])}; target < 100 KiB {verdict(ok['edge_object_lt_100KiB'])}")
        print(f"  connector: header {kib(s['connector_header_bytes'])}, largest shard {kib(s['shard_max_bytes'])}, "
              f"all shards {kib(s['connector_total_bytes'])}, {s['connector_bytes_per_edge']:.0f} B/edge; "
              f"largest shard at 10,000 edges (linear) {kib(s['shard_max_projected_10k_edges'])}; "
              f"target 1 MiB per object {verdict(ok['connector_objects_lt_1MiB_at_10k_edges'])}")
        for j in v["joins"]:
            print(f"  {j['scenario']}: plan {j['plan_s']:.3f} s; {j['changed_count']} objects changed "
                  f"(expected {j['expected_changed_count']}), patches {', '.join(j['patched']) or 'none'} "
                  f"(expected {', '.join(j['expected_patched']) or 'none'}): "
                  f"{'as expected' if j['as_expected'] else 'DIFFERS from expected'}")
            agents = [n for n in j["changed"] if is_agent_configmap(n)][:6]
            more = j["changed_agent_configmaps"] - len(agents)
            header = "CHANGED" if o.CONNECTOR_CONFIGMAP in j["changed_connector_objects"] else "unchanged"
            print(f"    {j['changed_agent_configmaps']} agent ConfigMaps: {', '.join(agents) or 'none'}"
                  f"{f', ... and {more} more' if more else ''}")
            print(f"    connector objects: {', '.join(j['changed_connector_objects']) or 'none'} "
                  f"(header {o.CONNECTOR_CONFIGMAP} {header})")
    for name, text in report.get("profiles", {}).items():
        print(f"\n== cProfile of one plan() from scratch, {name}, by own time\n{text}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--edges", type=int, default=5_000)
    parser.add_argument("--communities", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--profile", type=int, default=0, metavar="TOP",
                        help="also run cProfile once per variant and show the TOP functions by own time")
    parser.add_argument("--variant", default="cloud-16s,default",
                        help="which settings to plan, comma-separated: cloud-16s (cloud_node_cidrs set), default")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)

    authority = new_ca(now=datetime.datetime.now(datetime.UTC))
    ca = authority.cert_pem
    _LEAF["key"] = public_key_b64(issue_leaf(authority, name="edge-01234", addresses=["100.96.19.74", "203.0.113.74"],
                                             now=datetime.datetime.now(datetime.UTC)).cert_pem)
    variants = {
        "cloud-16s": OperatorSettings(**BASE_SETTINGS, cloud_node_cidrs=CLOUD_NODE_CIDRS),
        "default": OperatorSettings(**BASE_SETTINGS),
    }
    chosen = {name: variants[name] for name in args.variant.split(",") if name in variants}
    if not chosen:
        parser.error(f"--variant: choose among {', '.join(variants)}")
    objs = build_nodes(variants["default"], args.nodes, args.edges, args.communities, args.seed)
    joining = newcomers(variants["default"], objs, args.communities, args.seed)
    floor, _ = measure("json.dumps-floor", lambda: json.dumps(objs), args.repeat)
    results = [run_variant(name, s, objs, ca, args.repeat, joining) for name, s in chosen.items()]
    report: dict[str, Any] = {
        "benchmark": "operator_plan",
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024},
        "params": {"nodes": args.nodes, "edges": args.edges, "communities": args.communities,
                   "repeat": args.repeat, "seed": args.seed, "edge_pod_pool": EDGE_POD_POOL},
        "baseline_json_dumps": asdict(floor),
        "baseline_note": "ratio to one JSON serialisation of the input, measured in the same run",
        "targets": {"plan_cpu_s": PLAN_TARGET_S, "node_object_bytes": NODE_OBJECT_TARGET,
                    "connector_object_bytes": API_OBJECT_LIMIT},
        "variants": [variant_report(v, floor, names_shown=50) for v in results],
    }
    if args.profile:
        report["profiles"] = {name: profile_plan(s, objs, ca, args.profile) for name, s in chosen.items()}
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        print()
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
