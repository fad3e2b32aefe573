"""Edges behind NAT: nothing on the WAN gets in, edges reach out over NAT-T, the connector never dials them.

Runs on the e2e lab (every edge behind a NAT router: edge-1 and edge-2 on one
endpoint-independent site, edge-3 behind a symmetric NAT, edge-4 alone behind another
endpoint-independent one; edge-5 on the WAN with a public address), shared with the other e2e
modules through the ``running_lab`` fixture.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fabmesh.kube.client import Kube, load_api_client
from fabmesh.lab import faults, probe
from fabmesh.lab.state import LabState
from fabmesh.testenv.hosts import NatRouter, Network, sh, wait_for
from tests.e2e.helpers import ask_peer, echo_peer_server, established, observed_path, ping_ok, pod, vici

pytestmark = pytest.mark.e2e
EDGES = ("edge-1", "edge-2", "edge-3")


def test_every_edge_sits_behind_a_nat_router_that_owns_the_wan_address(running_lab: LabState) -> None:
    for name in EDGES:
        edge = running_lab.host(name)
        assert edge.nat is not None
        router = running_lab.nat(edge.nat)
        assert edge.public_ip(running_lab) == router.wan_ip != edge.wan_ip
        addresses = sh("ip", "-j", "-4", "addr", "show", ns=edge.netns).stdout
        assert router.wan_ip not in addresses  # the edge never sees the address the WAN sees
    assert running_lab.host("edge-1").nat == running_lab.host("edge-2").nat  # one site
    types = {running_lab.host(n).nat: running_lab.nat(running_lab.host(n).nat).type for n in EDGES}
    assert sorted(set(types.values())) == ["masquerade", "symmetric"]


def test_nothing_on_the_wan_reaches_an_edge_without_a_tunnel(running_lab: LabState, tmp_path: Path) -> None:
    """A stranger on the WAN, with routes to every LAN and pod CIDR through the NAT routers, gets nowhere."""
    net = Network(prefix=running_lab.prefix, directory=tmp_path, wan_cidr=running_lab.wan_cidr)
    stranger = net.add_host("stranger", "198.51.100.250")
    try:
        for name in EDGES:
            edge = running_lab.host(name)
            router = running_lab.nat(edge.nat or "")
            stranger.run("ip", "route", "replace", router.lan_cidr, "via", router.wan_ip)
            stranger.run("ip", "route", "replace", pod(running_lab, name).ip, "via", router.wan_ip)
        connector = running_lab.host("connector-1")
        with echo_peer_server(connector.netns, 10250):  # control: the stranger does reach the WAN
            assert ask_peer(stranger.netns, connector.wan_ip, 10250) == "198.51.100.250"
        for name in EDGES:
            edge, edge_pod = running_lab.host(name), pod(running_lab, name)
            router_ip = edge.public_ip(running_lab)
            assert stranger.run("ping", "-c", "1", "-W", "1", router_ip, check=False).returncode == 0
            with echo_peer_server(edge.netns, 10250), echo_peer_server(edge_pod.netns, 8080):
                for target, port in ((router_ip, 10250), (edge.wan_ip, 10250), (edge_pod.ip, 8080)):
                    assert ask_peer(stranger.netns, target, port) == "", f"{name}: {target}:{port} answered"
                for target in (edge.wan_ip, edge_pod.ip):
                    assert stranger.run("ping", "-c", "1", "-W", "1", target, check=False).returncode != 0
                cloud = pod(running_lab, "cloud-2")  # the mesh itself does reach the same server
                assert ask_peer(cloud.netns, edge_pod.ip, 8080) == cloud.ip
    finally:
        sh("ip", "netns", "del", stranger.netns, check=False)


def test_edges_initiate_over_nat_t_and_the_connector_never_initiates(running_lab: LabState) -> None:
    with vici(running_lab, "connector-1") as charon:
        on_connector = dict(charon.ike_sas())
    for name in EDGES:
        sa = on_connector[name]
        edge = running_lab.host(name)
        assert sa.get("initiator") != "yes", f"the connector initiated to {name}"
        assert sa["remote-host"] == edge.public_ip(running_lab)  # the NAT router's address, not the edge's
        assert sa["nat-remote"] == "yes" and sa["local-port"] == "4500"
        with vici(running_lab, name) as charon:
            mine = dict(charon.ike_sas())["connector-1"]
        assert mine["initiator"] == "yes" and mine["local-port"] == "4500"
        assert mine["local-host"] == edge.wan_ip
    # Two edges behind one endpoint-independent NAT: the router keeps the first edge's port 4500 and
    # gives the second another; the symmetric NAT picks a random port.
    ports = {n: on_connector[n]["remote-port"] for n in EDGES}
    assert ports["edge-1"] != ports["edge-2"]
    assert ports["edge-3"] != "4500"


def test_edges_on_one_site_tunnel_directly_over_their_lan_addresses(running_lab: LabState) -> None:
    with vici(running_lab, "edge-1") as charon:
        sa = dict(charon.ike_sas())["edge-2"]
    assert sa["state"] == "ESTABLISHED" and sa["initiator"] == "yes"
    assert (sa["local-host"], sa["remote-host"]) == (running_lab.host("edge-1").wan_ip,
                                                      running_lab.host("edge-2").wan_ip)


def test_edges_on_one_site_punch_through_over_their_lan_addresses(running_lab: LabState) -> None:
    """edge-1 and edge-2 are both behind NAT, so their pair is mediated; the check that wins is the
    one between their LAN addresses (the router does not hairpin), never one through the relay."""
    with vici(running_lab, "edge-1") as charon:
        conns = charon.conns()
        sas = dict(charon.ike_sas())
    assert "mediation@connector-1" in conns and not sas["mediation@connector-1"].get("child-sas")
    assert sas["mediation@connector-1"]["state"] == "ESTABLISHED"
    assert sas["edge-2"]["remote-host"] == running_lab.host("edge-2").wan_ip


def test_a_cone_nat_pair_on_two_sites_becomes_direct_by_mediation(running_lab: LabState) -> None:
    """edge-4 (site-3) joins edge-1's community (site-1): neither can be dialled, the connector mediates,
    and the direct IKE_SA runs between the two routers' WAN addresses. ``lab status`` (``probe.check``)
    sees the probes counted by that SA, with no relay on the way."""
    kube = Kube(load_api_client(running_lab.kubeconfig))
    assert "edge-4" not in established(running_lab, "edge-1")
    kube.merge_patch("nodes", "edge-4", {"metadata": {"labels": {"community.fabmesh.io/a": ""}}})
    try:
        wait_for(lambda: "edge-4" in established(running_lab, "edge-1"), timeout=60, interval=0.5,
                 what="edge-1's direct tunnel with edge-4")
        with vici(running_lab, "edge-1") as charon:
            sa = dict(charon.ike_sas())["edge-4"]
        assert sa["remote-host"] == running_lab.host("edge-4").public_ip(running_lab)  # site-3's router
        assert sa["initiator"] == "yes" and sa["nat-local"] == "yes" and sa["nat-remote"] == "yes", sa
        pairs = {(p["src"], p["dst"]): p for p in probe.check(running_lab, wait=10)["pairs"]}
        for src, dst in (("edge-1", "edge-4"), ("edge-4", "edge-1")):
            pair = pairs[(f"pod-{src}", f"pod-{dst}")]
            assert pair["ok"] and pair["path"] == "direct" and "intended" not in pair, pair
            sent = {(e["host"], e["sa"]) for e in pair["evidence"] if e["packets_out"]}
            assert (src, dst) in sent and ("connector-1", dst) not in sent, pair
    finally:
        kube.merge_patch("nodes", "edge-4", {"metadata": {"labels": {"community.fabmesh.io/a": None}}})
        wait_for(lambda: "edge-4" not in established(running_lab, "edge-1"), timeout=60, interval=0.5,
                 what="edge-1 to drop edge-4 again")


def _status(state: LabState, src: str, dst: str) -> dict:
    """The pair as ``fabmesh lab status --json`` reports it."""
    pairs = {(p["src"], p["dst"]): p for p in probe.check(state, wait=10)["pairs"]}
    return pairs[(pod(state, src).name, pod(state, dst).name)]


def test_a_direct_pair_whose_udp_is_blocked_is_relayed_within_seconds_and_direct_again_after_heal(
        running_lab: LabState) -> None:
    """edge-1 and edge-2 (one site) tunnel directly; ``lab cut edge-1 --from edge-2`` blocks everything
    between them, so their direct CHILD_SAs stop passing packets while both still reach the connector.
    Both agents must drop the dead tunnel within seconds (not after charon's ~90 s of DPD retransmits),
    so the pair is relayed; once healed, the initiator's next attempt makes it direct again."""
    pairs = (("edge-1", "edge-2"), ("edge-2", "edge-1"))
    for src, dst in pairs:
        assert observed_path(running_lab, src, dst) == (True, "direct")
    faults.cut(running_lab, "edge-1", "edge-2")
    try:
        # Bounded well under charon's own give-up (DPD + 83 s of retransmits); the time is measured in bench_nat.
        wait_for(lambda: all(observed_path(running_lab, s, d) == (True, "relayed") for s, d in pairs),
                 timeout=30, interval=0.5, what="edge-1 <-> edge-2 to be relayed through the connector")
        assert "edge-2" not in established(running_lab, "edge-1")
        assert "edge-1" not in established(running_lab, "edge-2")
        for src, dst in pairs:
            status = _status(running_lab, src, dst)
            assert status["ok"] and status["path"] == "relayed" and status["intended"] == "direct", status
            sent = {(e["host"], e["sa"]) for e in status["evidence"] if e["packets_out"]}
            assert {(src, "connector-1"), ("connector-1", dst)} <= sent and (src, dst) not in sent, status
            assert ping_ok(pod(running_lab, src).netns, pod(running_lab, dst).ip, count=5)
    finally:
        faults.heal(running_lab, "edge-1")
    wait_for(lambda: all(observed_path(running_lab, s, d) == (True, "direct") for s, d in pairs),
             timeout=120, interval=1, what="edge-1 <-> edge-2 to be direct again after the heal")
    status = _status(running_lab, "edge-1", "edge-2")
    assert status["ok"] and status["path"] == "direct" and "intended" not in status, status


def test_edges_come_back_without_intervention_when_their_nat_router_changes_its_wan_address(
        running_lab: LabState) -> None:
    """site-1's router (edge-1 and edge-2 behind it) reconnects with another WAN address, as a 4G router
    does: every NAT mapping is gone and the connector keeps sending to the old address. Nothing is done
    by hand: each edge's next DPD leaves by a new mapping and the connector moves its IKE_SA there."""
    nat = running_lab.nat("site-1")
    router = NatRouter(name=nat.name, netns=nat.netns, wan_ip=nat.wan_ip, lan_cidr=nat.lan_cidr,
                       symmetric=nat.type == "symmetric")
    old = router.wan_ip
    with vici(running_lab, "connector-1") as charon:
        before = dict(charon.ike_sas())
    assert {before[e]["remote-host"] for e in ("edge-1", "edge-2")} == {old}
    router.set_wan_ip("198.51.100.202", 24)
    nat.wan_ip = router.wan_ip
    running_lab.save()

    def moved() -> bool:
        with vici(running_lab, "connector-1") as charon:
            sas = dict(charon.ike_sas())
        return all(sas.get(e, {}).get("remote-host") == "198.51.100.202" for e in ("edge-1", "edge-2"))

    wait_for(moved, timeout=120, interval=0.5, what="the connector to follow edge-1 and edge-2 to the new address")
    for edge in ("edge-1", "edge-2"):
        assert ping_ok(pod(running_lab, edge).netns, pod(running_lab, "cloud-2").ip, count=3)
        assert ping_ok(pod(running_lab, "cloud-2").netns, pod(running_lab, edge).ip, count=3)
        assert ping_ok(pod(running_lab, edge).netns, pod(running_lab, "edge-3").ip, count=3)  # relayed
    assert observed_path(running_lab, "edge-1", "edge-2") == (True, "direct")  # their LAN tunnel never moved


def test_a_public_edge_has_no_nat_and_punches_through_to_a_natted_community_peer(running_lab: LabState) -> None:
    """edge-5 has its own address on the WAN: the connector sees that address, and with edge-2 (behind
    site-1's cone NAT, community b) it gets a mediated direct tunnel whose far end is site-1's router."""
    public = running_lab.host("edge-5")
    assert public.nat is None and public.public_ip(running_lab) == public.wan_ip
    with vici(running_lab, "connector-1") as charon:
        sa = dict(charon.ike_sas())["edge-5"]
    assert sa["remote-host"] == public.wan_ip and sa.get("initiator") != "yes", sa
    wait_for(lambda: "edge-5" in established(running_lab, "edge-2"), timeout=60, interval=0.5,
             what="edge-2's direct tunnel with edge-5")
    with vici(running_lab, "edge-5") as charon:
        direct = dict(charon.ike_sas())["edge-2"]
    assert direct["remote-host"] == running_lab.host("edge-2").public_ip(running_lab), direct  # site-1's router
    for src, dst in (("edge-2", "edge-5"), ("edge-5", "edge-2")):
        assert observed_path(running_lab, src, dst) == (True, "direct")
