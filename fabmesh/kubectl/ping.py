"""What ``kubectl fabmesh ping SRC DST`` decides (pure): who the ends are, whose counters to read, the verdict.

The command runs ``ping`` in the source Pod (the pods/exec API) and brackets it
with two readings of the tunnel hosts' CHILD_SA packet counters, the
``fabmesh_sa_packets_total`` series each agent and connector serves on its
metrics port, fetched through the API server's node proxy
(``/api/v1/nodes/NODE:10120/proxy/metrics``). The path is named by
:mod:`fabmesh.mesh.probepath`, the rule the lab uses too, from the SAs whose
counters moved: it is observed, not inferred from labels.

Other traffic moves the same counters, and one of its sources is the command
itself: the exec stream and the scrapes of edge nodes travel API server ->
connector -> edge tunnel. That traffic only ever crosses the tunnels between
the connector and the edges it reads, so the order of the readings keeps it
out of the one the verdict hangs on:

* before the probe, the edges first and the connector last (a scrape of an
  edge crosses the connector's SA with it before the connector's reading);
* after it, the connector first (the later scrapes of edges come after it).

The source edge's SA with the connector still counts the exec stream, so
``cloud`` from an edge source is only as good as "the probe got replies";
``direct`` (an SA between two edges, which carries nothing of ours) and the
connector's SA with the destination edge are clean. A probe without a reply is
reported as failed whatever moved: a failure never reads as a path.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from fabmesh.kubectl.cluster import (
    Obj,
    active_connector,
    communities_of,
    internal_ip,
    labels_of,
    name_of,
    pod_cidrs_of,
    role_of,
)
from fabmesh.mesh import topology
from fabmesh.mesh.model import Role
from fabmesh.mesh.names import KIND_LABEL
from fabmesh.mesh.probepath import Counted, Counters, Observed, observed_path
from fabmesh.operator.settings import OperatorSettings

SA_PACKETS_FAMILY = "fabmesh_sa_packets"
SA_PACKETS_SAMPLE = f"{SA_PACKETS_FAMILY}_total"
SCHEMA_VERSION = 1
_SUMMARY = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received")


class Kind(StrEnum):
    POD = "pod"
    NODE = "node"
    IP = "ip"


@dataclass(frozen=True)
class Ref:
    """What the user typed: ``[pod/|node/][NAMESPACE/]NAME`` or an IP address (a destination only)."""

    kind: Kind | None  # None: a Pod if one has the name, else a Node
    name: str
    namespace: str


class RefError(ValueError):
    """A SRC or DST that names nothing usable; the message says which and why."""


def parse_ref(text: str, default_namespace: str) -> Ref:
    try:
        ipaddress.ip_address(text)
        return Ref(Kind.IP, text, "")
    except ValueError:
        pass
    kind: Kind | None = None
    rest = text
    for k in (Kind.POD, Kind.NODE):
        if text.startswith(f"{k.value}/"):
            kind, rest = k, text[len(k.value) + 1:]
    parts = rest.split("/")
    if kind is Kind.NODE and len(parts) == 1 and parts[0]:
        return Ref(Kind.NODE, parts[0], "")
    if len(parts) == 1 and parts[0]:
        return Ref(kind, parts[0], default_namespace)
    if len(parts) == 2 and all(parts) and kind is not Kind.NODE:
        return Ref(Kind.POD, parts[1], parts[0])
    raise RefError(f"{text!r}: expected POD, NAMESPACE/POD, pod/NAME, node/NAME or an IP address")


@dataclass(frozen=True)
class End:
    """One end of the probe as resolved: what it is, its address, and the node it is on."""

    kind: Kind
    name: str
    ip: str
    node: str | None  # None: an address no Node's InternalIP or pod CIDR holds
    namespace: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "name": self.name, "namespace": self.namespace or None,
                "ip": self.ip, "node": self.node}


def pod_end(pod: Obj) -> End:
    meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
    where = f"Pod {meta.get('namespace', '')}/{meta.get('name', '')}"
    if status.get("phase") != "Running":
        raise RefError(f"{where} is {status.get('phase') or 'not running'}, not Running")
    if not status.get("podIP"):
        raise RefError(f"{where} has no status.podIP yet")
    return End(Kind.POD, name_of(pod), status["podIP"], spec.get("nodeName"), meta.get("namespace", ""))


def node_end(node: Obj) -> End:
    ip = internal_ip(node)
    if ip is None:
        raise RefError(f"Node {name_of(node)} has no InternalIP in status.addresses")
    return End(Kind.NODE, name_of(node), ip, name_of(node))


def node_of_ip(ip: str, nodes: Sequence[Obj]) -> str | None:
    """The Node whose InternalIP is ``ip`` or whose pod CIDR holds it (the operator's annotation counts)."""
    address = ipaddress.ip_address(ip)
    for node in sorted(nodes, key=name_of):
        if internal_ip(node) == ip:
            return name_of(node)
    for node in sorted(nodes, key=name_of):
        for cidr in pod_cidrs_of(node):
            try:
                if address in ipaddress.ip_network(cidr, strict=False):
                    return name_of(node)
            except ValueError:
                continue
    return None


def ip_end(ip: str, nodes: Sequence[Obj]) -> End:
    return End(Kind.IP, ip, ip, node_of_ip(ip, nodes))


def exec_pod_on(node: str, pods: Sequence[Obj]) -> Obj | None:
    """A Running hostNetwork Pod on ``node`` to probe from for a node source: fabmesh's agent first."""
    candidates = [p for p in pods if (p.get("spec") or {}).get("nodeName") == node
                  and (p.get("spec") or {}).get("hostNetwork") and (p.get("status") or {}).get("phase") == "Running"
                  and not (p.get("metadata") or {}).get("deletionTimestamp")]
    candidates.sort(key=lambda p: (labels_of(p).get(KIND_LABEL) != "agent", name_of(p)))
    return candidates[0] if candidates else None


def ping_argv(ip: str, count: int) -> list[str]:
    """``ping`` as busybox and iputils both take it: ``-w`` bounds the whole probe."""
    return ["ping", "-n", "-c", str(count), "-w", str(count + 2), ip]


def parse_ping(output: str) -> tuple[int, int] | None:
    """(transmitted, received) from ping's summary line; None when there is none."""
    found = _SUMMARY.search(output)
    return (int(found[1]), int(found[2])) if found else None


@dataclass(frozen=True)
class Mesh:
    """Where the probe's nodes stand: edges, the active connector, roles and communities."""

    edges: frozenset[str]
    connector: str | None
    roles: dict[str, Role | None]
    communities: dict[str, tuple[str, ...]]


def mesh_of(nodes: Sequence[Obj], settings: OperatorSettings) -> Mesh:
    roles = {name_of(n): role_of(n, settings) for n in nodes}
    connector = active_connector(nodes, settings)
    return Mesh(edges=frozenset(n for n, r in roles.items() if r is Role.EDGE),
                connector=name_of(connector) if connector is not None else None, roles=roles,
                communities={name_of(n): communities_of(n, settings) for n in nodes})


def tunnel_hosts(src: str | None, dst: str | None, mesh: Mesh) -> list[str]:
    """The nodes whose counters to read before the probe, in that order: the edges, then the connector.

    Read them in the reverse order after it (see the module docstring). Cloud nodes hold no SA.
    """
    edges = [n for n in dict.fromkeys((dst, src)) if n is not None and n in mesh.edges]
    needs_connector = mesh.connector is not None and bool(edges)
    return edges + ([mesh.connector] if needs_connector and mesh.connector not in edges else [])


def counters_from_metrics(host: str, text: str) -> Counters | None:
    """One node's CHILD_SA counters from its Prometheus text; None when it serves no such series (an agent
    older than the metric); ValueError when it is not Prometheus text."""
    rows: dict[tuple[str, str], dict[str, int]] = {}
    served = False
    for family in text_string_to_metric_families(text):
        served = served or family.name == SA_PACKETS_FAMILY
        for sample in family.samples:
            if sample.name != SA_PACKETS_SAMPLE:
                continue
            key = (sample.labels.get("peer", ""), sample.labels.get("child", ""))
            rows.setdefault(key, {})[sample.labels.get("direction", "")] = int(sample.value)
    if not served:
        return None
    return {(host, peer, child): (d.get("in", 0), d.get("out", 0)) for (peer, child), d in rows.items()}


@dataclass(frozen=True)
class Verdict:
    """What ``kubectl fabmesh ping`` reports; :meth:`as_json` is the documented ``--output json``."""

    source: End
    destination: End
    ok: bool
    transmitted: int
    received: int
    path: Observed
    intended: topology.Path | None
    connector: str | None
    evidence: tuple[Counted, ...]
    unread: tuple[str, ...] = ()  # tunnel hosts whose counters could not be read, with why
    reason: str = ""
    probe_output: str = field(default="", compare=False)

    def as_json(self) -> dict[str, Any]:
        return {"version": SCHEMA_VERSION, "source": self.source.as_json(),
                "destination": self.destination.as_json(), "ok": self.ok, "transmitted": self.transmitted,
                "received": self.received, "path": self.path.value,
                "intended": self.intended.value if self.intended else None, "connector": self.connector,
                "evidence": [c.as_json() for c in self.evidence], "unread": list(self.unread),
                "reason": self.reason}


def verdict(source: End, destination: End, mesh: Mesh, replies: tuple[int, int] | None,
            evidence: list[Counted], unread: Sequence[str] = (), probe_output: str = "") -> Verdict:
    """The path from the evidence, or why there is none: no reply is a failure, never a path."""
    transmitted, received = replies or (0, 0)
    src, dst = source.node, destination.node
    intended = (topology.intended_path(src, dst, mesh.roles, mesh.communities)
                if src is not None and dst is not None else None)
    path, reason = Observed.NONE, ""
    if replies is None:
        reason = "the probe printed no ping summary (is there a ping binary in the source's container?)"
    elif received == 0:
        reason = f"no reply to {transmitted} echo requests"
    elif src is None or dst is None:
        reason = f"{destination.ip} is on no Node's InternalIP or pod CIDR: the path cannot be named"
    else:
        path = observed_path(src, dst, set(mesh.edges), mesh.connector, evidence)
        if path is Observed.NONE:
            reason = ("replies came back but no tunnel on the way counted them"
                      + (f" (could not read: {', '.join(unread)})" if unread else ""))
    ok = replies is not None and received > 0 and path is not Observed.NONE
    return Verdict(source, destination, ok, transmitted, received, path, intended, mesh.connector,
                   tuple(evidence), tuple(unread), reason, probe_output)
