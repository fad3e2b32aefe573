"""What ``fabmesh doctor`` concludes from the cluster's objects (pure).

Nothing here reads the clock, the network or the API (the time is passed in
as ``now``), so every check is tested with tables of objects. Each check
returns :class:`Check` records: one PASS when all is well, else one WARN or
FAIL per problem, each with a one-line fix.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from itertools import combinations

from fabmesh.kubectl import cluster
from fabmesh.kubectl.cluster import Obj, name_of, role_of
from fabmesh.mesh.model import MeshConfigError, Role
from fabmesh.mesh.names import (
    FLANNEL_COPY_ANNOTATION,
    FLANNEL_FINALIZER,
    FLANNEL_KEYS,
    FLANNEL_LEASE_MARKER,
    FLANNEL_PREFIX,
    INVALID_NODE_REASON,
    POD_CIDR_ANNOTATION,
    STATUS_ANNOTATION,
)
from fabmesh.mesh.timestamps import format_time, parse_time
from fabmesh.mesh.tunnelstatus import TunnelState
from fabmesh.operator import objects as o
from fabmesh.operator.settings import OperatorSettings
from fabmesh.pki.authority import PKIError

EXPIRY_WARNING = timedelta(days=30)
CLOCK_SKEW_WARNING = timedelta(seconds=30)
# A node clock this far off breaks IKE: certificates look not yet valid or expired to its peers.
CLOCK_SKEW_FAILURE = timedelta(minutes=5)
# kubelet projects a changed ConfigMap within its sync period plus its cache TTL (about a minute each).
GENERATION_GRACE = timedelta(minutes=3)
# The operator releases a deleting edge within two passes (seconds); a deletion held longer waits for it.
RELEASE_STUCK = timedelta(minutes=1)


class Status(StrEnum):
    PASS = "PASS"
    WARN = "WARN"
    FAIL = "FAIL"


class CheckName(StrEnum):
    POD_CIDRS = "pod-cidrs"
    CERTIFICATES = "certificates"
    EDGE_CONFIGMAPS = "edge-configmaps"
    AGENT_PODS = "agent-pods"
    AGENTS_RUNNING = "agents-running"
    FLANNEL = "flannel-annotations"
    FLANNEL_RELEASE = "flannel-release"
    CONNECTOR = "connector"
    LEADER = "operator-leader"
    CLOCK = "clock-skew"
    INVALID_NODES = "invalid-node-events"
    TUNNEL_STATUS = "tunnel-status"
    GENERATION = "config-generation"
    TUNNELS_UP = "tunnels-up"
    NODE_CLOCK = "node-clock-skew"
    NAT_KEEPALIVE = "nat-keepalive"
    RELAYED = "relayed-pairs"


@dataclass(frozen=True)
class Check:
    name: CheckName
    status: Status
    message: str
    hint: str = ""


def check_pod_cidr_overlap(nodes: Sequence[Obj]) -> list[Check]:
    """Any two Nodes whose recorded pod CIDRs overlap: a sweep over sorted intervals, not all pairs."""
    spans: list[tuple[int, int, int, str, str]] = []
    for node in nodes:
        for text in cluster.pod_cidrs_of(node):
            try:
                net = ipaddress.ip_network(text, strict=False)
            except ValueError:
                continue  # malformed: the operator reports it on the node (invalid-node-events)
            spans.append((net.version, int(net.network_address), int(net.broadcast_address),
                          name_of(node), str(net)))
    spans.sort()
    pairs: set[tuple[tuple[str, str], tuple[str, str]]] = set()
    open_spans: list[tuple[int, int, int, str, str]] = []
    for span in spans:
        open_spans = [s for s in open_spans if s[0] == span[0] and s[2] >= span[1]]
        for other in open_spans:
            if other[3] != span[3]:
                first, second = sorted([(other[3], other[4]), (span[3], span[4])])
                pairs.add((first, second))
        open_spans.append(span)
    if not pairs:
        return [Check(CheckName.POD_CIDRS, Status.PASS,
                      f"no overlap among {len(spans)} pod CIDR(s) on {len(nodes)} node(s)")]
    created = {name_of(n): (n.get("metadata") or {}).get("creationTimestamp") or "" for n in nodes}

    def newer(a: str, b: str) -> str:  # the one the operator's IPAM refuses: ties go by name, as there
        return max((created.get(a, ""), a), (created.get(b, ""), b))[1]

    return [Check(CheckName.POD_CIDRS, Status.FAIL, f"{a} {ca} overlaps {b} {cb}",
                  f"spec.podCIDR is immutable: re-create {newer(a, b)} without spec.podCIDR "
                  f"(the operator allocates one), or correct its {POD_CIDR_ANNOTATION} annotation")
            for (a, ca), (b, cb) in sorted(pairs)]


def _expiry_check(what: str, not_after: datetime, now: datetime, hint: str) -> Check | None:
    if not_after <= now:
        return Check(CheckName.CERTIFICATES, Status.FAIL, f"{what} expired at {format_time(not_after)}", hint)
    if not_after - now < EXPIRY_WARNING:
        days = (not_after - now).days
        return Check(CheckName.CERTIFICATES, Status.WARN,
                     f"{what} expires in {days} day(s), at {format_time(not_after)}", hint)
    return None


def check_certificates(nodes: Sequence[Obj], secrets: Sequence[Obj] | None, now: datetime,
                       settings: OperatorSettings) -> list[Check]:
    """Every edge's and connector's leaf and the CA: missing or expired FAIL, < 30 days WARN."""
    renew = "the operator renews leaves at 2/3 of their lifetime: is it running (see operator-leader)?"
    targets = [(name_of(n), secret) for n in sorted(nodes, key=name_of)
               if (secret := cluster.cert_secret_name(n, settings))]
    problems: list[Check] = []
    checked = 0
    if secrets is None:
        for node in sorted(nodes, key=name_of):
            if role_of(node, settings) is not Role.EDGE:
                continue
            moment = cluster.annotated_cert_expiry(node)
            if moment is None:
                problems.append(Check(CheckName.CERTIFICATES, Status.FAIL,
                                      f"{name_of(node)}: no cert-expires in its {STATUS_ANNOTATION} annotation",
                                      "the operator records it once the node's certificate is issued"))
                continue
            checked += 1
            if found := _expiry_check(f"{name_of(node)}: certificate", moment, now, renew):
                problems.append(found)
        problems.append(Check(CheckName.CERTIFICATES, Status.WARN,
                              "cannot read Secrets: edge expiry taken from node annotations, "
                              "the connectors' and the CA's not checked",
                              "run doctor with a user allowed to get secrets in the namespace"))
        return problems
    secs = cluster.by_name(secrets)
    for node, secret_name in [*targets, ("CA", o.CA_SECRET)]:
        secret = secs.get(secret_name)
        if secret is None:
            problems.append(Check(CheckName.CERTIFICATES, Status.FAIL, f"{node}: no Secret {secret_name}",
                                  "the operator issues it once the node is valid: see invalid-node-events "
                                  "and the operator's log"))
            continue
        try:
            not_after = cluster.cert_not_after(secret)
        except (ValueError, PKIError) as exc:
            problems.append(Check(CheckName.CERTIFICATES, Status.FAIL,
                                  f"{node}: Secret {secret_name} holds no readable certificate ({exc})",
                                  f"delete Secret {secret_name}: the operator issues a new one"))
            continue
        checked += 1
        hint = ("the operator rolls the CA when leaves would be cut short; to roll it now, annotate Secret "
                "fabmesh-ca with fabmesh.io/rotate-ca (see docs/operator.md, Certificates and revocation)"
                if secret_name == o.CA_SECRET else renew)
        if found := _expiry_check(f"{node}: certificate in {secret_name}", not_after, now, hint):
            problems.append(found)
    if problems:
        return problems
    return [Check(CheckName.CERTIFICATES, Status.PASS,
                  f"{checked} certificate(s) valid for more than {EXPIRY_WARNING.days} days")]


def check_edge_configmaps(nodes: Sequence[Obj], configmaps: Sequence[Obj],
                          settings: OperatorSettings) -> list[Check]:
    cms = cluster.by_name(configmaps)
    edges = [n for n in sorted(nodes, key=name_of) if role_of(n, settings) is Role.EDGE]
    problems = []
    for node in edges:
        name = name_of(node)
        cm_name = o.agent_configmap_name(name)
        mesh = cluster.read_mesh(cms.get(cm_name))
        if mesh is None:
            problems.append(Check(CheckName.EDGE_CONFIGMAPS, Status.FAIL, f"{name}: no ConfigMap {cm_name}",
                                  f"the operator writes it once the node is valid: kubectl describe node {name} "
                                  "(FabmeshInvalidNode events) and the operator's log"))
        elif isinstance(mesh, MeshConfigError):
            problems.append(Check(CheckName.EDGE_CONFIGMAPS, Status.FAIL, f"{name}: {mesh}",
                                  f"delete ConfigMap {cm_name}: the operator rewrites it on its next pass"))
    return problems or [Check(CheckName.EDGE_CONFIGMAPS, Status.PASS,
                              f"all {len(edges)} edge node(s) have a readable ConfigMap")]


def check_agent_pods(nodes: Sequence[Obj], pods: Sequence[Obj], settings: OperatorSettings) -> list[Check]:
    agents = cluster.agent_pods_by_node(pods)
    edges = [name_of(n) for n in sorted(nodes, key=name_of) if role_of(n, settings) is Role.EDGE]
    problems = [Check(CheckName.AGENT_PODS, Status.FAIL, f"{name}: no agent Pod {o.agent_pod_name(name)}",
                      "the operator creates it when agent_pods.enabled is true; "
                      "if agents run outside Pods, pass --no-agent-pods")
                for name in edges if name not in agents]
    return problems or [Check(CheckName.AGENT_PODS, Status.PASS, f"all {len(edges)} edge node(s) have an agent Pod")]


def check_agents_running(pods: Sequence[Obj]) -> list[Check]:
    agents = cluster.agent_pods_by_node(pods)
    problems = []
    for node, pod in sorted(agents.items()):
        phase = cluster.pod_phase(pod)
        if phase != "Running":
            namespace = (pod.get("metadata") or {}).get("namespace", "")
            problems.append(Check(CheckName.AGENTS_RUNNING, Status.WARN,
                                  f"{node}: agent Pod {name_of(pod)} is {phase}",
                                  f"kubectl -n {namespace} describe pod {name_of(pod)} "
                                  "(is the node's kubelet up, can it pull the image?)"))
    return problems or [Check(CheckName.AGENTS_RUNNING, Status.PASS, f"all {len(agents)} agent Pod(s) Running")]


def check_flannel(nodes: Sequence[Obj], settings: OperatorSettings) -> list[Check]:
    """Edges must carry the connector's three flannel annotations and flanneld's lease marker: cloud nodes'
    flanneld routes edge CIDRs with them."""
    connector = cluster.active_connector(nodes, settings)
    if connector is None:
        return [Check(CheckName.FLANNEL, Status.WARN, "no connector node to compare edge annotations with",
                      "see the connector check")]
    wanted = {FLANNEL_PREFIX + k: cluster.annotations_of(connector).get(FLANNEL_PREFIX + k) for k in FLANNEL_KEYS}
    missing = [k for k, v in wanted.items() if v is None]
    if missing:
        return [Check(CheckName.FLANNEL, Status.FAIL,
                      f"connector {name_of(connector)} has no {', '.join(missing)}",
                      f"is flanneld running on {name_of(connector)}? it writes these annotations")]
    # flanneld ignores a Node without its kube-subnet-manager marker, whatever else it carries.
    wanted |= {FLANNEL_PREFIX + k: v for k, v in FLANNEL_LEASE_MARKER.items()}
    problems = []
    # A deleting edge has its flannel keys taken off on purpose (flannel-release reports a stuck one).
    edges = [n for n in sorted(nodes, key=name_of) if role_of(n, settings) is Role.EDGE
             and not (n.get("metadata") or {}).get("deletionTimestamp")]
    for node in edges:
        have = cluster.annotations_of(node)
        absent = [k.removeprefix(FLANNEL_PREFIX) for k in wanted if k not in have]
        stale = [k.removeprefix(FLANNEL_PREFIX) for k, v in wanted.items() if k in have and have[k] != v]
        hint = (f"the operator copies them from {name_of(connector)} on its next pass: is it running "
                f"(operator-leader), is {name_of(node)} valid (invalid-node-events)?")
        if absent:
            problems.append(Check(CheckName.FLANNEL, Status.FAIL,
                                  f"{name_of(node)}: missing flannel annotations {', '.join(absent)}", hint))
        if stale:
            problems.append(Check(CheckName.FLANNEL, Status.FAIL,
                                  f"{name_of(node)}: stale flannel annotations {', '.join(stale)} "
                                  f"(differ from {name_of(connector)})", hint))
    return problems or [Check(CheckName.FLANNEL, Status.PASS,
                              f"all {len(edges)} edge node(s) carry {name_of(connector)}'s flannel annotations")]


def check_flannel_release(nodes: Sequence[Obj], now: datetime, settings: OperatorSettings) -> list[Check]:
    """Nodes whose deletion waits for the operator's flannel finalizer, and non-edges it has not let go of.

    The finalizer holds a deleting edge until the operator has taken the flannel marker off
    (fabmesh/operator/flannel.py): with no operator running, such a Node stays Terminating.
    """
    problems = []
    hint = ("is the operator running (operator-leader)? after an uninstall, run "
            "`fabmesh operator --release` (docs/operator.md, Flannel on cloud nodes)")
    for node in sorted(nodes, key=name_of):
        meta = node.get("metadata") or {}
        if FLANNEL_FINALIZER not in (meta.get("finalizers") or ()):
            continue
        deleting = meta.get("deletionTimestamp")
        if deleting:
            try:
                since = datetime.fromisoformat(deleting.replace("Z", "+00:00"))
            except ValueError:
                since = now - RELEASE_STUCK
            if now - since >= RELEASE_STUCK:
                problems.append(Check(CheckName.FLANNEL_RELEASE, Status.FAIL,
                                      f"{name_of(node)}: deletion waits for finalizer {FLANNEL_FINALIZER} "
                                      f"since {deleting}", hint))
        elif role_of(node, settings) is not Role.EDGE:
            problems.append(Check(CheckName.FLANNEL_RELEASE, Status.WARN,
                                  f"{name_of(node)}: not an edge but still holds finalizer {FLANNEL_FINALIZER}"
                                  + (f" and {FLANNEL_COPY_ANNOTATION}" if FLANNEL_COPY_ANNOTATION in
                                     (meta.get("annotations") or {}) else ""), hint))
    return problems or [Check(CheckName.FLANNEL_RELEASE, Status.PASS,
                              "no Node waits for the operator to release its flannel annotations")]


def check_connector(nodes: Sequence[Obj], settings: OperatorSettings) -> list[Check]:
    active = cluster.active_connector(nodes, settings)
    if active is None:
        return [Check(CheckName.CONNECTOR, Status.FAIL, "no connector node: edges reach only their community peers",
                      f"label the cloud node that runs the connector: kubectl label node NAME "
                      f"{settings.connector_label}=")]
    standby = sorted(name_of(n) for n in nodes if role_of(n, settings) is Role.CONNECTOR and n is not active)
    suffix = f" (standby: {', '.join(standby)})" if standby else ""
    return [Check(CheckName.CONNECTOR, Status.PASS, f"{name_of(active)} is the active connector{suffix}")]


def check_operator_leader(lease: Obj | None, now: datetime, namespace: str, lease_name: str) -> list[Check]:
    """A leader whose Lease was not renewed within twice its duration is gone (or hung)."""
    hint = f"kubectl -n {namespace} get pods,lease: is the operator Deployment running, what does its log say?"
    if lease is None:
        return [Check(CheckName.LEADER, Status.FAIL, f"no Lease {namespace}/{lease_name}: no operator has led",
                      hint)]
    spec = lease.get("spec") or {}
    holder = spec.get("holderIdentity")
    renewed = parse_time(spec.get("renewTime"))
    duration = timedelta(seconds=int(spec.get("leaseDurationSeconds") or 0))
    if not holder or renewed is None:
        return [Check(CheckName.LEADER, Status.FAIL, f"Lease {namespace}/{lease_name} has no holder", hint)]
    age = now - renewed
    if age > 2 * duration:
        return [Check(CheckName.LEADER, Status.FAIL,
                      f"leader {holder} last renewed {int(age.total_seconds())}s ago "
                      f"(lease duration {int(duration.total_seconds())}s)", hint)]
    return [Check(CheckName.LEADER, Status.PASS,
                  f"leader {holder}, renewed {max(0, int(age.total_seconds()))}s ago")]


def check_clock_skew(server_date: datetime | None, now: datetime) -> list[Check]:
    """Compares the API server's ``Date`` header (1 s resolution) with this machine's clock."""
    if server_date is None:
        return [Check(CheckName.CLOCK, Status.WARN, "the API server sent no Date header: skew not checked",
                      "compare `date -u` here with the API server host's clock by hand")]
    skew = abs(now - server_date)
    if skew > CLOCK_SKEW_WARNING:
        return [Check(CheckName.CLOCK, Status.WARN,
                      f"this machine's clock and the API server's differ by {int(skew.total_seconds())}s",
                      "sync clocks with NTP (chrony): IKE rejects certificates not yet valid or expired")]
    return [Check(CheckName.CLOCK, Status.PASS, f"clock within {int(CLOCK_SKEW_WARNING.total_seconds())}s "
                                                "of the API server's")]


def check_invalid_node_events(events: Sequence[Obj] | None, nodes: Sequence[Obj]) -> list[Check]:
    """The operator's Warning Events about Nodes that still exist (not about an older Node of the same name)."""
    if events is None:
        return [Check(CheckName.INVALID_NODES, Status.WARN, "cannot list Events in the default namespace",
                      "run doctor with a user allowed to list events in default")]
    current = cluster.by_name(nodes)
    never = datetime.min.replace(tzinfo=UTC)
    latest: dict[tuple[str, str], datetime] = {}
    for event in events:
        involved = event.get("involvedObject") or {}
        if event.get("reason") != INVALID_NODE_REASON or event.get("type") != "Warning" or \
                involved.get("kind") != "Node":
            continue
        node = current.get(involved.get("name", ""))
        if node is None:
            continue
        meta = node.get("metadata") or {}
        if involved.get("uid") and involved["uid"] != meta.get("uid"):
            continue
        when = parse_time(event.get("lastTimestamp") or event.get("eventTime")
                           or (event.get("metadata") or {}).get("creationTimestamp"))
        created = parse_time(meta.get("creationTimestamp"))
        if when and created and when < created:
            continue
        key = (involved["name"], event.get("message", ""))
        latest[key] = max(latest.get(key, never), when or never)
    if not latest:
        return [Check(CheckName.INVALID_NODES, Status.PASS, f"no {INVALID_NODE_REASON} events on current nodes")]
    return [Check(CheckName.INVALID_NODES, Status.WARN,
                  f"{node}: {message}" + (f" (last {format_time(when)})" if when > never else ""),
                  f"fix the field named on the Node; kubectl describe node {node}")
            for (node, message), when in sorted(latest.items())]


def _loop_nodes(nodes: Sequence[Obj], settings: OperatorSettings) -> list[Obj]:
    """The nodes that run the node loop and so publish a TunnelStatus: edges and the active connector."""
    connector = cluster.active_connector(nodes, settings)
    return [n for n in sorted(nodes, key=name_of) if role_of(n, settings) is Role.EDGE or n is connector]


def check_tunnel_status(nodes: Sequence[Obj], observed: Mapping[str, cluster.Observed] | None,
                        server_date: datetime | None, settings: OperatorSettings) -> list[Check]:
    """Every node that runs the loop has a status, written within two heartbeats (API server's clock)."""
    if observed is None:
        return [Check(CheckName.TUNNEL_STATUS, Status.WARN, "cannot list TunnelStatus objects: live state not checked",
                      "install the chart's CRD, and run doctor with a user bound to fabmesh-status-viewer")]
    limit = timedelta(seconds=2 * settings.node.status_heartbeat_s + settings.node.status_min_interval_s)
    problems = []
    loop_nodes = _loop_nodes(nodes, settings)
    for node in loop_nodes:
        name = name_of(node)
        seen = observed.get(name)
        if seen is None:
            problems.append(Check(CheckName.TUNNEL_STATUS, Status.WARN, f"{name}: has published no tunnel status",
                                  f"is its agent running, and can it reach the API server? (its log says "
                                  f"action=write-status); kubectl -n {settings.namespace} get tunnelstatus {name}"))
        elif server_date is not None and seen.server_time is not None and server_date - seen.server_time > limit:
            age = int((server_date - seen.server_time).total_seconds())
            problems.append(Check(CheckName.TUNNEL_STATUS, Status.WARN,
                                  f"{name}: tunnel status last written {age}s ago (heartbeat every "
                                  f"{settings.node.status_heartbeat_s}s): what it shows may be stale",
                                  "the agent stopped or cannot reach the API server: check its Pod and log"))
    return problems or [Check(CheckName.TUNNEL_STATUS, Status.PASS,
                              f"all {len(loop_nodes)} node(s) publish a current tunnel status")]


def check_generation(nodes: Sequence[Obj], configmaps: Sequence[Obj], observed: Mapping[str, cluster.Observed],
                     server_date: datetime | None, settings: OperatorSettings) -> list[Check]:
    """A node that runs another config than its ConfigMaps hold, longer than kubelet takes to project it."""
    cms = cluster.by_name(configmaps)
    connector = cluster.active_connector(nodes, settings)
    problems, checked = [], 0
    for node in _loop_nodes(nodes, settings):
        seen = observed.get(name_of(node))
        wanted, written = cluster.wanted_generation(node, settings, cms, node is connector)
        if seen is None or wanted is None:
            continue
        checked += 1
        applied = seen.report.config_generation
        if applied == wanted:
            continue
        if server_date is not None and written is not None and server_date - written < GENERATION_GRACE:
            continue  # still being projected
        since = f" since {format_time(written)}" if written else ""
        problems.append(Check(CheckName.GENERATION, Status.FAIL,
                              f"{name_of(node)}: runs config {applied or 'none'}, its ConfigMaps hold {wanted}{since}",
                              f"the agent cannot use what it is given (see the node's lastError: kubectl fabmesh "
                              f"tunnels {name_of(node)}) or its volume is not updated (kubelet on the node)"))
    return problems or [Check(CheckName.GENERATION, Status.PASS,
                              f"{checked} node(s) run the config generation their ConfigMaps hold")]


def check_tunnels_up(observed: Mapping[str, cluster.Observed]) -> list[Check]:
    """Every tunnel a node is configured with and reports not up; and the node's last error."""
    problems = []
    for name, seen in sorted(observed.items()):
        for tunnel in seen.report.tunnels:
            if tunnel.state is TunnelState.UP:
                continue
            problems.append(Check(CheckName.TUNNELS_UP, Status.FAIL,
                                  f"{name}: tunnel to {tunnel.peer} is {tunnel.state.value}"
                                  + (f" since {tunnel.since}" if tunnel.since else ""),
                                  f"kubectl fabmesh tunnels {name}; is {tunnel.peer} reachable on UDP 500/4500 "
                                  f"from {name} (firewall, NAT)? charon's log on both sides names the cause"))
        if seen.report.last_error:
            problems.append(Check(CheckName.TUNNELS_UP, Status.FAIL, f"{name}: {seen.report.last_error}",
                                  f"the agent's log on {name} has the details"))
    total = sum(r.report.tunnels_expected for r in observed.values())
    return problems or [Check(CheckName.TUNNELS_UP, Status.PASS,
                              f"all {total} tunnel(s) of {len(observed)} node(s) are up")]


def check_node_clocks(observed: Mapping[str, cluster.Observed]) -> list[Check]:
    """Each node's clock (its writtenAt) against the API server's (the write's managedFields time)."""
    problems = []
    for name, seen in sorted(observed.items()):
        written = parse_time(seen.report.written_at)
        if written is None or seen.server_time is None:
            continue
        skew = written - seen.server_time
        size = abs(skew)
        if size > CLOCK_SKEW_WARNING:
            status = Status.FAIL if size > CLOCK_SKEW_FAILURE else Status.WARN
            direction = "ahead of" if skew > timedelta(0) else "behind"
            problems.append(Check(CheckName.NODE_CLOCK, status,
                                  f"{name}: its clock is {int(size.total_seconds())}s {direction} the API server's",
                                  f"sync {name}'s clock with NTP (chrony): IKE rejects certificates that are not "
                                  "yet valid or expired"))
    return problems or [Check(CheckName.NODE_CLOCK, Status.PASS,
                              f"{len(observed)} node clock(s) within {int(CLOCK_SKEW_WARNING.total_seconds())}s "
                              "of the API server's")]


def check_nat_keepalive(observed: Mapping[str, cluster.Observed]) -> list[Check]:
    """A node behind NAT (charon detected it) whose charon sends no NAT-T keepalives loses its mappings."""
    problems, natted = [], 0
    for name, seen in sorted(observed.items()):
        behind = sorted(t.peer for t in seen.report.tunnels if t.nat_local)
        if not behind:
            continue
        natted += 1
        if seen.report.nat_keepalive_s == 0:
            problems.append(Check(CheckName.NAT_KEEPALIVE, Status.FAIL,
                                  f"{name}: behind NAT (tunnels to {', '.join(behind)}) and charon sends no "
                                  "keepalives: the router forgets the mapping and the peer cannot reach it",
                                  "set charon's keep_alive (fabmesh charon's strongswan.conf) below the NAT's "
                                  "UDP timeout, e.g. 20s"))
    return problems or [Check(CheckName.NAT_KEEPALIVE, Status.PASS,
                              f"{natted} node(s) behind NAT, each with keepalives (where reported)")]


def check_relayed_pairs(nodes: Sequence[Obj], observed: Mapping[str, cluster.Observed],
                        settings: OperatorSettings) -> list[Check]:
    """Edges that share a community and yet have no direct tunnel up between them: they are relayed.

    Either neither lists the other (no direct tunnel was planned), or it is listed and one end reports it
    not up (the agents drop a dead direct tunnel and relay the pair; while it is ``unresponsive`` packets
    between them are lost until they do).
    """
    edges = {name_of(n): cluster.communities_of(n, settings) for n in nodes if role_of(n, settings) is Role.EDGE}
    peers = {name: {t.peer: t.state for t in seen.report.tunnels} for name, seen in observed.items()
             if not seen.report.truncated}
    problems, pairs = [], 0
    for a, b in combinations(sorted(edges), 2):
        shared = sorted(set(edges[a]) & set(edges[b]))
        if not shared or a not in peers or b not in peers:
            continue
        pairs += 1
        if b not in peers[a] and a not in peers[b]:
            problems.append(Check(CheckName.RELAYED, Status.WARN,
                                  f"{a} and {b} share community {shared[0]} but neither has a tunnel to the other: "
                                  "their traffic is relayed through the connector",
                                  f"kubectl describe node {a} {b} (FabmeshInvalidNode events: no usable endpoint?); "
                                  "behind NAT on both sides, hole punching may have failed"))
            continue
        states = [s for s in (peers[a].get(b), peers[b].get(a)) if s is not None]
        worst = next((s for s in states if s is not TunnelState.UP), None)
        if worst is not None:
            problems.append(Check(CheckName.RELAYED, Status.WARN,
                                  f"{a} and {b} share community {shared[0]} but their direct tunnel is "
                                  f"{worst.value}: their traffic is relayed through the connector"
                                  + (" once the agents drop it" if worst is TunnelState.UNRESPONSIVE else ""),
                                  f"kubectl fabmesh ping a pod on {a} to one on {b} shows the path; kubectl fabmesh "
                                  f"tunnels {a}: can they reach each other on UDP 500/4500 (NAT, firewall)? hole "
                                  "punching may have failed"))
    return problems or [Check(CheckName.RELAYED, Status.PASS,
                              f"{pairs} community pair(s) with a direct tunnel")]


@dataclass(frozen=True)
class ClusterState:
    """Everything doctor looks at, as fetched; ``secrets``/``events`` None when they could not be read."""

    nodes: list[Obj]
    configmaps: list[Obj]
    secrets: list[Obj] | None
    pods: list[Obj]
    lease: Obj | None
    events: list[Obj] | None
    now: datetime
    server_date: datetime | None
    namespace: str
    settings: OperatorSettings
    statuses: list[Obj] | None = None  # TunnelStatus objects; None: they could not be listed


def run_checks(state: ClusterState, agent_pods: bool = True) -> list[Check]:
    """All of doctor's checks in a fixed order; ``agent_pods`` False skips "every edge has an agent Pod"."""
    s = state
    checks = [
        *check_connector(s.nodes, s.settings),
        *check_operator_leader(s.lease, s.now, s.namespace, s.settings.leader_election.lease_name),
        *check_pod_cidr_overlap(s.nodes),
        *check_certificates(s.nodes, s.secrets, s.now, s.settings),
        *check_edge_configmaps(s.nodes, s.configmaps, s.settings),
        *(check_agent_pods(s.nodes, s.pods, s.settings) if agent_pods else []),
        *check_agents_running(s.pods),
        *check_flannel(s.nodes, s.settings),
        *check_flannel_release(s.nodes, s.now, s.settings),
        *check_clock_skew(s.server_date, s.now),
        *check_invalid_node_events(s.events, s.nodes),
    ]
    observed = cluster.observed_by_node(s.statuses) if s.statuses is not None else None
    checks += check_tunnel_status(s.nodes, observed, s.server_date, s.settings)
    if observed is not None:
        checks += [*check_generation(s.nodes, s.configmaps, observed, s.server_date, s.settings),
                   *check_tunnels_up(observed), *check_node_clocks(observed), *check_nat_keepalive(observed),
                   *check_relayed_pairs(s.nodes, observed, s.settings)]
    return checks


def exit_code(checks: Sequence[Check]) -> int:
    return 1 if any(c.status is Status.FAIL for c in checks) else 0
