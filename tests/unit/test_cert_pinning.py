"""Pinned peers, key-keeping renewals, in-place credential reloads and the CA roll: the pure decisions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fabmesh.mesh.model import LocalNode, NodeMesh, Peer, Role
from fabmesh.node.tunnel_sync import session_digest
from fabmesh.node.tunnels import desired_connections
from fabmesh.operator import ca_roll
from fabmesh.operator import objects as o
from fabmesh.operator.certs import CertChange, current_keys, issue, plan_certificates
from fabmesh.operator.inventory import read_node
from fabmesh.operator.plan import plan
from fabmesh.pki.authority import RenewReason, issue_leaf, issued_by, new_ca, public_key_b64, public_key_sha256

pytestmark = pytest.mark.unit

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
CA = new_ca(now=NOW - timedelta(days=1))
NEXT_CA = new_ca("fabmesh-ca-2", now=NOW - timedelta(days=1))
ADDRESSES = ("192.0.2.1",)
LEAF = issue_leaf(CA, name="e1", addresses=ADDRESSES, now=NOW - timedelta(days=1))
REISSUED = issue_leaf(CA, name="e1", addresses=ADDRESSES, now=NOW)  # a new key
RENEWED = issue_leaf(CA, name="e1", addresses=ADDRESSES, now=NOW, key_pem=LEAF.key_pem)  # the same key
KEY = public_key_b64(LEAF.cert_pem)


def _secret(uid: str = "uid-1") -> dict[str, Any]:
    return o.tls_secret(o.tls_secret_name("e1"), "ns", "tls", LEAF.cert_pem, LEAF.key_pem, CA.cert_pem, "e1", uid)


KEY_CASES = {
    # name: (signer, now, uid of the Node now) -> (reason, key kept)
    "renewal-keeps-the-key": (CA, NOW + timedelta(days=300), "uid-1", RenewReason.EXPIRING, True),
    "ca-roll-keeps-the-key": (NEXT_CA, NOW, "uid-1", RenewReason.WRONG_CA, True),
    "recreated-node-gets-a-new-key": (CA, NOW, "uid-2", RenewReason.NODE_RECREATED, False),
}


@pytest.mark.parametrize(("signer", "now", "uid", "reason", "kept"), KEY_CASES.values(), ids=KEY_CASES.keys())
def test_a_renewal_certifies_the_same_key_and_a_recreated_node_gets_a_new_one(signer, now, uid, reason,
                                                                               kept) -> None:
    result = plan_certificates({o.tls_secret_name("e1"): _secret()}, {"e1": ADDRESSES}, {"e1"}, signer, now,
                               uids={"e1": uid})
    [action] = result.actions
    assert (action.change, action.reason) == (CertChange.ISSUE, reason)
    leaf = issue(action, signer, now, timedelta(days=365))
    assert (public_key_sha256(leaf.cert_pem) == public_key_sha256(LEAF.cert_pem)) is kept
    assert leaf.cert_pem != LEAF.cert_pem and issued_by(signer.cert_pem, leaf.cert_pem)


def test_a_stale_bundle_rewrites_the_secret_and_the_same_node_keeps_its_leaf() -> None:
    bundle = CA.cert_pem + NEXT_CA.cert_pem
    result = plan_certificates({o.tls_secret_name("e1"): _secret()}, {"e1": ADDRESSES}, {"e1"}, CA, NOW,
                               uids={"e1": "uid-1"}, bundle=bundle)
    [action] = result.actions
    assert action.change is CertChange.REBUNDLE and issue(action, CA, NOW, timedelta(days=1)) == LEAF


def _mesh(*peers: Peer) -> NodeMesh:
    return NodeMesh(node=LocalNode(name="connector-1", role=Role.CONNECTOR, address="198.51.100.1",
                                   endpoint="198.51.100.1"),
                    local_subnets=("10.244.0.0/16",), mesh_cidrs=("10.244.0.0/16",), peers=peers,
                    caCert=CA.cert_pem + NEXT_CA.cert_pem)


def test_pins_go_into_every_peer_and_a_peer_without_a_leaf_is_left_out() -> None:
    from tests.unit.test_plan import CONNECTOR, SETTINGS, edge

    infos = [read_node(n, SETTINGS) for n in (CONNECTOR, edge("e1", "192.0.2.1", "a"), edge("e2", "192.0.2.2", "a"),
                                               edge("e3", "192.0.2.3", "a"))]
    keys = {"conn": KEY, "e1": KEY, "e2": KEY}  # e3 has no leaf yet
    pinned = plan(infos, SETTINGS, "CA", keys=keys)  # type: ignore[arg-type]
    assert [(p.name, p.pubkey) for p in pinned.edges["e1"].peers] == [("conn", KEY), ("e2", KEY)]
    assert [p.name for p in pinned.edges["e3"].peers] == ["conn", "e1", "e2"]  # e3's own config still pins them
    assert sorted(p.name for shard in pinned.connector_shards.values() for p in shard) == ["e1", "e2"]
    assert pinned.edges["e2"].peers[0] is pinned.edges["e3"].peers[0], "one pinned Peer object per node and flag"
    unpinned = plan(infos, SETTINGS, "CA")  # type: ignore[arg-type]
    assert all(p.pubkey == "" for p in unpinned.edges["e1"].peers) and len(unpinned.edges["e1"].peers) == 3
    secrets = {o.tls_secret_name("e1"): _secret()}
    assert current_keys(secrets, ["e1", "e2"], {"e1", "e2"}) == {"e1": KEY}


def test_a_renewed_or_re_signed_leaf_has_the_same_pin_and_a_reissued_one_does_not() -> None:
    rolled = issue_leaf(NEXT_CA, name="e1", addresses=ADDRESSES, now=NOW, key_pem=LEAF.key_pem)
    assert public_key_b64(RENEWED.cert_pem) == public_key_b64(rolled.cert_pem) == KEY
    assert public_key_b64(REISSUED.cert_pem) != KEY
    assert len(KEY) == 124, "a P-256 SubjectPublicKeyInfo: 91 bytes, 124 base64 characters"


def test_a_pinned_connection_names_the_key_alone_and_an_unpinned_one_the_ca_bundle() -> None:
    pinned = desired_connections(_mesh(Peer(name="e1", role=Role.EDGE, subnets=("10.233.1.0/24",),
                                            pubkey=KEY)), "OWN")["e1"]
    [pem] = pinned["remote"].pop("pubkeys")
    assert pinned["remote"] == {"auth": "pubkey", "id": "e1"}
    assert pem.startswith("-----BEGIN PUBLIC KEY-----\n") and "".join(pem.splitlines()[1:-1]) == KEY
    assert all(len(line) <= 64 for line in pem.splitlines())
    unpinned = desired_connections(_mesh(Peer(name="e1", role=Role.EDGE, subnets=("10.233.1.0/24",))), "OWN")["e1"]
    assert unpinned["remote"] == {"auth": "pubkey", "id": "e1", "cacerts": [CA.cert_pem, NEXT_CA.cert_pem]}


def _conn(pin: str, own: str = "OWN", ts: str = "10.233.1.0/24") -> dict[str, Any]:
    mesh = _mesh(Peer(name="e1", role=Role.EDGE, subnets=(ts,), pubkey=public_key_b64(pin)))
    return desired_connections(mesh, own)["e1"]


SESSION_CASES = {
    # name: changed connection -> whether its established IKE_SA must end
    "own-certificate-renewed": (_conn(LEAF.cert_pem, own="OWN-2"), False),
    "peer-key-replaced": (_conn(REISSUED.cert_pem), True),
    "traffic-selectors-changed": (_conn(LEAF.cert_pem, ts="10.233.9.0/24"), True),
    # The connector's entry of an edge that becomes a mediation client: unique=no, for new IKE_SAs only.
    "became-a-mediation-client": ({**_conn(LEAF.cert_pem), "unique": "no"}, False),
}


def test_a_peer_renewed_with_the_same_key_leaves_the_connection_as_it_was() -> None:
    assert _conn(RENEWED.cert_pem) == _conn(LEAF.cert_pem)


@pytest.mark.parametrize(("changed", "ends"), SESSION_CASES.values(), ids=SESSION_CASES.keys())
def test_only_a_new_peer_key_or_new_selectors_end_an_ike_sa(changed: dict[str, Any], ends: bool) -> None:
    before = _conn(LEAF.cert_pem)
    assert changed != before
    assert (session_digest(changed) != session_digest(before)) is ends


T0 = NOW
SETTLE = timedelta(minutes=10)
STABLE = ca_roll.CAState(ca_roll.Phase.STABLE, CA)
TRUSTING = ca_roll.CAState(ca_roll.Phase.TRUST_NEXT, CA, NEXT_CA, T0)
SIGNING = ca_roll.CAState(ca_roll.Phase.SIGN_NEXT, NEXT_CA, CA, T0)
ROLL = {
    # name: (state, now, requested, due, old leaves left) -> step
    "stable-stays": (STABLE, T0, False, False, False, ca_roll.Step.NONE),
    "requested-starts": (STABLE, T0, True, False, False, ca_roll.Step.START),
    "ca-expiring-starts": (STABLE, T0, False, True, False, ca_roll.Step.START),
    "trust-waits-to-settle": (TRUSTING, T0 + SETTLE / 2, False, False, False, ca_roll.Step.NONE),
    "trust-then-signs-with-the-next": (TRUSTING, T0 + SETTLE, False, False, False, ca_roll.Step.SIGN_NEXT),
    "signing-waits-to-settle": (SIGNING, T0 + SETTLE / 2, False, False, False, ca_roll.Step.NONE),
    "old-leaves-hold-the-old-ca": (SIGNING, T0 + SETTLE * 3, False, False, True, ca_roll.Step.NONE),
    "then-the-old-ca-goes": (SIGNING, T0 + SETTLE, False, False, False, ca_roll.Step.FINISH),
}


@pytest.mark.parametrize(("state", "now", "requested", "due", "left", "step"), ROLL.values(), ids=ROLL.keys())
def test_ca_roll_steps(state, now, requested, due, left, step) -> None:
    assert ca_roll.decide(state, now, requested=requested, due=due, settle=SETTLE, old_leaves_left=left) is step


def test_ca_roll_walks_through_its_phases_and_the_bundle_keeps_its_text_while_both_are_trusted() -> None:
    trusting = ca_roll.advance(STABLE, ca_roll.Step.START, T0, NEXT_CA)
    signing = ca_roll.advance(trusting, ca_roll.Step.SIGN_NEXT, T0 + SETTLE)
    done = ca_roll.advance(signing, ca_roll.Step.FINISH, T0 + 2 * SETTLE)
    assert [s.signer for s in (STABLE, trusting, signing, done)] == [CA, CA, NEXT_CA, NEXT_CA]
    assert STABLE.bundle() == CA.cert_pem and done.bundle() == NEXT_CA.cert_pem
    assert trusting.bundle() == signing.bundle() == CA.cert_pem + NEXT_CA.cert_pem
    for state in (trusting, signing, done):
        data, annotations = ca_roll.secret_data(state)
        stored = {"data": data, "metadata": {"annotations": {k: v for k, v in annotations.items() if v}}}
        back = ca_roll.state_from_secret(stored)
        assert (back.phase, back.signer, back.other, back.since) == (state.phase, state.signer, state.other,
                                                                     state.since)
