"""``kubectl fabmesh ping``'s pure side: references, ends, whose counters to read, the metric, the verdict."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import generate_latest

from fabmesh.kubectl import ping
from fabmesh.kubectl.ping import End, Kind, Ref, RefError
from fabmesh.mesh.names import KIND_LABEL, POD_CIDR_ANNOTATION
from fabmesh.mesh.probepath import Counted, Observed, counted, counters
from fabmesh.mesh.topology import Path
from fabmesh.node.metrics import Metrics
from fabmesh.operator.settings import OperatorSettings

pytestmark = pytest.mark.unit
SETTINGS = OperatorSettings()


def node(name: str, ip: str, labels: dict[str, str] | None = None, pod_cidr: str | None = None,
         annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels or {}, "annotations": annotations or {},
                         "creationTimestamp": "2030-01-01T00:00:00Z"},
            "spec": {"podCIDR": pod_cidr} if pod_cidr else {},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}


def edge(name: str, ip: str, cidr: str, *communities: str) -> dict[str, Any]:
    labels = {SETTINGS.edge_label: "", **{SETTINGS.community_label_prefix + c: "" for c in communities}}
    return node(name, ip, labels, annotations={POD_CIDR_ANNOTATION: cidr})


NODES = [
    node("connector-1", "198.51.100.1", {SETTINGS.connector_label: ""}, "10.244.0.0/24"),
    node("cloud-2", "198.51.100.2", pod_cidr="10.244.1.0/24"),
    edge("edge-1", "192.168.1.10", "10.233.1.0/24", "a"),
    edge("edge-2", "192.168.2.10", "10.233.2.0/24", "a"),
    edge("edge-3", "192.168.3.10", "10.233.3.0/24", "b"),
]
MESH = ping.mesh_of(NODES, SETTINGS)


def pod(name: str, node_name: str, ip: str | None, phase: str = "Running", host_network: bool = False,
        labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "default", "labels": labels or {}},
            "spec": {"nodeName": node_name, "hostNetwork": host_network, "containers": [{"name": "main"}]},
            "status": {"phase": phase, **({"podIP": ip} if ip else {})}}


REFS = {
    "bare-name": ("web", Ref(None, "web", "default")),
    "namespaced-pod": ("prod/web", Ref(Kind.POD, "web", "prod")),
    "pod-prefix": ("pod/web", Ref(Kind.POD, "web", "default")),
    "pod-prefix-namespaced": ("pod/prod/web", Ref(Kind.POD, "web", "prod")),
    "node": ("node/edge-1", Ref(Kind.NODE, "edge-1", "")),
    "ipv4": ("10.233.2.5", Ref(Kind.IP, "10.233.2.5", "")),
    "ipv6": ("fd00::5", Ref(Kind.IP, "fd00::5", "")),
}


@pytest.mark.parametrize("text,expected", REFS.values(), ids=REFS.keys())
def test_parse_ref(text: str, expected: Ref) -> None:
    assert ping.parse_ref(text, "default") == expected


@pytest.mark.parametrize("text", ["", "a/b/c", "node/ns/edge-1", "node/", "/web", "pod/"])
def test_parse_ref_rejects_what_names_nothing(text: str) -> None:
    with pytest.raises(RefError):
        ping.parse_ref(text, "default")


IPS = {
    "edge-node-address": ("192.168.2.10", "edge-2"),
    "edge-pod-cidr-annotation": ("10.233.3.7", "edge-3"),
    "cloud-pod-cidr": ("10.244.1.9", "cloud-2"),
    "connector-address": ("198.51.100.1", "connector-1"),
    "nowhere": ("203.0.113.5", None),
}


@pytest.mark.parametrize("ip,expected", IPS.values(), ids=IPS.keys())
def test_node_of_ip(ip: str, expected: str | None) -> None:
    assert ping.node_of_ip(ip, NODES) == expected


def test_pod_end_needs_a_running_pod_with_an_address() -> None:
    assert ping.pod_end(pod("web", "edge-1", "10.233.1.5")) == End(Kind.POD, "web", "10.233.1.5", "edge-1",
                                                                   "default")
    with pytest.raises(RefError, match="Pending"):
        ping.pod_end(pod("web", "edge-1", None, phase="Pending"))
    with pytest.raises(RefError, match="podIP"):
        ping.pod_end(pod("web", "edge-1", None))


def test_a_node_source_probes_from_its_agent_pod_first() -> None:
    pods = [pod("a-exporter", "edge-1", "192.168.1.10", host_network=True),
            pod("fabmesh-agent-x", "edge-1", "192.168.1.10", host_network=True, labels={KIND_LABEL: "agent"}),
            pod("web", "edge-1", "10.233.1.5"),
            pod("agent-elsewhere", "edge-2", "192.168.2.10", host_network=True, labels={KIND_LABEL: "agent"})]
    assert ping.exec_pod_on("edge-1", pods)["metadata"]["name"] == "fabmesh-agent-x"  # type: ignore[index]
    assert ping.exec_pod_on("edge-3", pods) is None
    assert ping.exec_pod_on("edge-1", [pods[2]]) is None  # not on the host network: not the node


HOSTS = {
    "edge-to-edge": ("edge-1", "edge-2", ["edge-2", "edge-1", "connector-1"]),
    "edge-to-cloud": ("edge-1", "cloud-2", ["edge-1", "connector-1"]),
    "cloud-to-edge": ("cloud-2", "edge-3", ["edge-3", "connector-1"]),
    "edge-to-connector": ("edge-1", "connector-1", ["edge-1", "connector-1"]),
    "cloud-to-cloud": ("cloud-2", "connector-1", []),
    "same-edge": ("edge-1", "edge-1", ["edge-1", "connector-1"]),
    "unknown-destination": ("edge-1", None, ["edge-1", "connector-1"]),
}


@pytest.mark.parametrize("src,dst,expected", HOSTS.values(), ids=HOSTS.keys())
def test_tunnel_hosts_are_the_edges_then_the_connector(src: str, dst: str | None, expected: list[str]) -> None:
    assert ping.tunnel_hosts(src, dst, MESH) == expected


def _ike_sas(packets: dict[str, tuple[int, int]], uniqueid: str = "7") -> list[tuple[str, dict]]:
    return [(peer, {"state": "ESTABLISHED", "child-sas": {f"{peer}-{uniqueid}": {
        "uniqueid": uniqueid, "spi-in": "c0ffee01", "packets-in": str(i), "packets-out": str(o)}}})
            for peer, (i, o) in packets.items()]


def test_the_metric_an_agent_serves_reads_back_as_the_labs_vici_counters() -> None:
    sas = _ike_sas({"edge-2": (4, 5), "connector-1": (100, 90)})
    text = generate_latest(Metrics(lambda: sas).registry).decode()
    assert 'fabmesh_sa_packets_total{child="edge-2-7/7/c0ffee01",direction="out",peer="edge-2"} 5.0' in text
    assert ping.counters_from_metrics("edge-1", text) == counters("edge-1", sas)


def test_the_metric_is_read_at_scrape_time_and_a_rekey_is_a_new_series() -> None:
    live = {"sas": _ike_sas({"edge-2": (1, 1)})}
    registry = Metrics(lambda: live["sas"]).registry
    before = ping.counters_from_metrics("edge-1", generate_latest(registry).decode())
    live["sas"] = _ike_sas({"edge-2": (2, 4)}, uniqueid="8")  # rekeyed: the new CHILD_SA counts from zero
    after = ping.counters_from_metrics("edge-1", generate_latest(registry).decode())
    assert counted(before, after) == [Counted("edge-1", "edge-2", 2, 4)]


def test_no_sa_is_not_an_agent_without_the_metric_and_text_that_is_not_prometheus_is_refused() -> None:
    assert ping.counters_from_metrics("edge-1", generate_latest(Metrics(lambda: []).registry).decode()) == {}
    older = generate_latest(Metrics().registry).decode()  # the node loop before the metric existed
    assert "fabmesh_tunnel_up" in older and ping.counters_from_metrics("edge-1", older) is None
    with pytest.raises(ValueError):
        ping.counters_from_metrics("edge-1", "<html>not metrics</html>\n{")


@pytest.mark.parametrize("output,expected", [
    ("3 packets transmitted, 3 packets received, 0% packet loss", (3, 3)),  # busybox
    ("3 packets transmitted, 2 received, 33.3333% packet loss, time 2003ms", (3, 2)),  # iputils
    ("4 packets transmitted, 0 received, +4 errors, 100% packet loss", (4, 0)),
    ("sh: ping: not found", None),
], ids=["busybox", "iputils", "unreachable", "no-ping"])
def test_parse_ping(output: str, expected: tuple[int, int] | None) -> None:
    assert ping.parse_ping(output) == expected


SRC = End(Kind.POD, "web", "10.233.1.5", "edge-1", "default")


def _c(host: str, peer: str, out: int = 3, inn: int = 3) -> Counted:
    return Counted(host, peer, inn, out)


EXEC_NOISE = _c("edge-1", "connector-1", out=40, inn=30)  # the exec stream and scrapes of edge-1
VERDICTS = {
    "direct": (End(Kind.IP, "10.233.2.5", "10.233.2.5", "edge-2"), (3, 3),
               [EXEC_NOISE, _c("edge-1", "edge-2"), _c("edge-2", "edge-1")], True, Observed.DIRECT, Path.DIRECT),
    "relayed-instead-of-direct": (End(Kind.IP, "10.233.2.5", "10.233.2.5", "edge-2"), (3, 3),
                                  [EXEC_NOISE, _c("connector-1", "edge-2")], True, Observed.RELAYED, Path.DIRECT),
    "relayed": (End(Kind.NODE, "edge-3", "192.168.3.10", "edge-3"), (3, 3),
                [EXEC_NOISE, _c("connector-1", "edge-3")], True, Observed.RELAYED, Path.RELAYED),
    "cloud": (End(Kind.IP, "10.244.1.9", "10.244.1.9", "cloud-2"), (3, 3), [EXEC_NOISE], True,
              Observed.CLOUD, Path.CLOUD),
    # the tunnel is cut: the exec stream still moved edge-1's SA with the connector, but no reply came
    "no-reply-is-a-failure-not-a-path": (End(Kind.IP, "10.244.1.9", "10.244.1.9", "cloud-2"), (3, 0),
                                         [EXEC_NOISE], False, Observed.NONE, Path.CLOUD),
    "no-reply-although-the-relay-moved": (End(Kind.IP, "10.233.2.5", "10.233.2.5", "edge-2"), (3, 0),
                                          [EXEC_NOISE, _c("connector-1", "edge-2", inn=0)], False, Observed.NONE,
                                          Path.DIRECT),
    "replies-but-nothing-counted": (End(Kind.IP, "10.233.3.5", "10.233.3.5", "edge-3"), (3, 3), [EXEC_NOISE],
                                    False, Observed.NONE, Path.RELAYED),
    "no-ping-binary": (End(Kind.IP, "10.233.2.5", "10.233.2.5", "edge-2"), None, [], False, Observed.NONE,
                       Path.DIRECT),
    "address-on-no-node": (End(Kind.IP, "203.0.113.5", "203.0.113.5", None), (3, 3), [EXEC_NOISE], False,
                           Observed.NONE, None),
}


@pytest.mark.parametrize("dst,replies,evidence,ok,path,intended", VERDICTS.values(), ids=VERDICTS.keys())
def test_verdict(dst: End, replies: tuple[int, int] | None, evidence: list[Counted], ok: bool, path: Observed,
                 intended: Path | None) -> None:
    v = ping.verdict(SRC, dst, MESH, replies, evidence)
    assert (v.ok, v.path, v.intended) == (ok, path, intended)
    assert bool(v.reason) is not ok  # a failure always says why; a success says nothing more


def test_the_json_output_follows_the_documented_schema() -> None:
    dst = End(Kind.POD, "db", "10.233.2.5", "edge-2", "default")
    v = ping.verdict(SRC, dst, MESH, (3, 3), [_c("edge-1", "edge-2")], unread=["connector-1 (503 x)"])
    assert v.as_json() == {
        "version": 1,
        "source": {"kind": "pod", "name": "web", "namespace": "default", "ip": "10.233.1.5", "node": "edge-1"},
        "destination": {"kind": "pod", "name": "db", "namespace": "default", "ip": "10.233.2.5", "node": "edge-2"},
        "ok": True, "transmitted": 3, "received": 3, "path": "direct", "intended": "direct",
        "connector": "connector-1",
        "evidence": [{"host": "edge-1", "sa": "edge-2", "packets_in": 3, "packets_out": 3}],
        "unread": ["connector-1 (503 x)"], "reason": ""}
