"""Two hosts, two real charons, one IKEv2 tunnel authenticated by X.509: prove the parts are real.

The tunnels use fabmesh's default proposals (``TunnelSettings``), so these tests also prove the installed
charon (libipsec backend, our plugin list) negotiates them, and that the ESP proposal's DH group is used
when a CHILD_SA is rekeyed (perfect forward secrecy).
"""

from __future__ import annotations

import datetime

import pytest

from fabmesh.mesh.model import TunnelSettings
from fabmesh.pki.authority import KeyPair, issue_leaf, new_ca
from fabmesh.strongswan.driver import Charon
from fabmesh.testenv.hosts import Host, Network, wait_for

pytestmark = pytest.mark.dataplane

NOW = datetime.datetime.now(datetime.UTC)
TUNNEL = TunnelSettings()


def _conn(host: Host, peer: Host, leaf: KeyPair, ca: KeyPair, local_ts: str, remote_ts: str) -> dict:
    return {
        "version": "2",
        "local_addrs": [host.wan_ip], "remote_addrs": [peer.wan_ip],
        "proposals": list(TUNNEL.ike_proposals), "encap": "yes", "dpd_delay": "5s",
        "local": {"auth": "pubkey", "certs": [leaf.cert_pem], "id": host.name},
        "remote": {"auth": "pubkey", "id": peer.name, "cacerts": [ca.cert_pem]},
        "children": {peer.name: {"local_ts": [local_ts], "remote_ts": [remote_ts],
                                 "esp_proposals": list(TUNNEL.esp_proposals), "start_action": "none"}},
    }


def _load(host: Host, peer: Host, ca: KeyPair, signer: KeyPair, local_ts: str, remote_ts: str) -> None:
    leaf = issue_leaf(signer, name=host.name, addresses=[host.wan_ip], now=NOW)
    assert host.charon
    with Charon(host.charon.vici_socket) as charon:
        charon.load_key(leaf.key_pem)
        charon.load_cert(ca.cert_pem, ca=True)
        charon.load_conn(peer.name, _conn(host, peer, leaf, ca, local_ts, remote_ts))


def test_pods_behind_two_hosts_ping_through_an_x509_ikev2_tunnel(wan: Network) -> None:
    ca = new_ca(now=NOW)
    a, b = wan.add_host("a"), wan.add_host("b")
    pod_a, pod_b = a.add_pod("p", "10.10.1.2/24"), b.add_pod("p", "10.10.2.2/24")
    for host in (a, b):
        host.start_charon(install_routes=True)
    _load(a, b, ca, ca, "10.10.1.0/24", "10.10.2.0/24")
    _load(b, a, ca, ca, "10.10.2.0/24", "10.10.1.0/24")

    assert not pod_a.ping(pod_b.ip), "no tunnel yet, so no route: the ping must fail"
    assert a.charon
    with Charon(a.charon.vici_socket) as charon:
        charon.initiate("b", "b", timeout_ms=15000)
        sas = charon.sas()
    assert sas["b"]["state"] == "ESTABLISHED"
    assert sas["b"]["remote-id"] == "b"
    child = next(iter(sas["b"]["child-sas"].values()))
    assert child["local-ts"] == ["10.10.1.0/24"] and child["remote-ts"] == ["10.10.2.0/24"]

    assert wait_for(lambda: pod_a.ping(pod_b.ip), timeout=10, what="ping through the tunnel")
    with Charon(a.charon.vici_socket) as charon:
        child = next(iter(charon.sas()["b"]["child-sas"].values()))
    assert int(child["packets-out"]) >= 1 and int(child["packets-in"]) >= 1


def test_certificate_from_a_foreign_ca_gets_no_tunnel(wan: Network) -> None:
    ca, rogue = new_ca(now=NOW), new_ca("rogue-ca", now=NOW)
    a, b = wan.add_host("a"), wan.add_host("b")
    for host in (a, b):
        host.start_charon()
    _load(a, b, ca, rogue, "10.10.1.0/24", "10.10.2.0/24")  # a presents a rogue-signed cert
    _load(b, a, ca, ca, "10.10.2.0/24", "10.10.1.0/24")
    assert a.charon and b.charon
    with Charon(a.charon.vici_socket) as charon, pytest.raises(Exception, match="failed"):
        charon.initiate("b", "b", timeout_ms=15000)
    with Charon(b.charon.vici_socket) as charon:
        assert charon.sas() == {}


def _child(charon: Charon, conn: str) -> dict | None:
    """The one installed CHILD_SA of ``conn``, once there is exactly one (a rekey briefly shows two)."""
    children = [c for c in charon.sas().get(conn, {}).get("child-sas", {}).values() if c["state"] == "INSTALLED"]
    return children[0] if len(children) == 1 else None


def test_child_sa_rekey_uses_the_esp_dh_group_and_traffic_flows_over_the_new_sa(wan: Network) -> None:
    ca = new_ca(now=NOW)
    a, b = wan.add_host("a"), wan.add_host("b")
    pod_a, pod_b = a.add_pod("p", "10.10.1.2/24"), b.add_pod("p", "10.10.2.2/24")
    for host in (a, b):
        host.start_charon(install_routes=True)  # libipsec: userspace ESP
    _load(a, b, ca, ca, "10.10.1.0/24", "10.10.2.0/24")
    _load(b, a, ca, ca, "10.10.2.0/24", "10.10.1.0/24")
    assert a.charon
    with Charon(a.charon.vici_socket) as charon:
        charon.initiate("b", "b", timeout_ms=15000)
        first = _child(charon, "b")
        ike_group = charon.sas()["b"]["dh-group"]
    assert first is not None
    # The CHILD_SA made with IKE_AUTH has no DH exchange of its own (RFC 7296 1.2): PFS starts at the rekey.
    assert "dh-group" not in first, first
    assert wait_for(lambda: pod_a.ping(pod_b.ip), timeout=10, what="ping through the first CHILD_SA")

    with Charon(a.charon.vici_socket) as charon:
        assert charon.rekey_child("b") == 1

    def rekeyed() -> dict | None:
        with Charon(a.charon.vici_socket) as charon:  # type: ignore[union-attr]
            child = _child(charon, "b")
        return child if child and child["uniqueid"] != first["uniqueid"] else None

    assert wait_for(rekeyed, timeout=15, what="the rekeyed CHILD_SA")
    second = rekeyed()
    assert second is not None
    assert second["dh-group"] == ike_group == "ECP_256", second  # the first ESP proposal's group, agreed
    assert second["encr-alg"] == "AES_GCM_16" and second["encr-keysize"] == "256"
    assert second["spi-in"] != first["spi-in"] and second["spi-out"] != first["spi-out"]
    assert wait_for(lambda: pod_a.ping(pod_b.ip), timeout=10, what="ping through the rekeyed CHILD_SA")
    with Charon(a.charon.vici_socket) as charon:
        child = _child(charon, "b")
    assert child is not None and child["uniqueid"] == second["uniqueid"]
    assert int(child["packets-out"]) >= 1 and int(child["packets-in"]) >= 1
