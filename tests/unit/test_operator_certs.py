"""The operator's pure decisions after plan(): certificate actions and the status annotation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fabmesh.mesh.model import LocalNode, NodeMesh, Role
from fabmesh.mesh.names import STATUS_ANNOTATION
from fabmesh.operator import objects as o
from fabmesh.operator.certs import CertChange, ca_from_secret, issue, plan_certificates
from fabmesh.operator.inventory import NodeInfo
from fabmesh.operator.plan import MeshPlan, NodePatch
from fabmesh.operator.status import node_writes, status_text
from fabmesh.pki.authority import KeyPair, RenewReason, describe, issue_leaf, new_ca

pytestmark = pytest.mark.unit

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
CA = new_ca(now=NOW - timedelta(days=1))
OTHER_CA = new_ca(now=NOW - timedelta(days=1))
ADDRESSES = ("192.0.2.1",)
LEAF = issue_leaf(CA, name="e1", addresses=ADDRESSES, now=NOW - timedelta(days=1))


def secret(leaf: KeyPair, ca: KeyPair = CA) -> dict[str, Any]:
    return o.tls_secret(o.tls_secret_name("e1"), "ns", "tls", leaf.cert_pem, leaf.key_pem, ca.cert_pem, "e1")


CASES = {
    # name: (stored Secret, addresses wanted, now) -> (change or None, reason)
    "nothing-stored-issues": (None, ADDRESSES, NOW, CertChange.ISSUE, RenewReason.MISSING),
    "good-leaf-stays": (secret(LEAF), ADDRESSES, NOW, None, None),
    "stale-ca-bundle-rewrites-the-same-leaf": (secret(LEAF, OTHER_CA), ADDRESSES, NOW, CertChange.REBUNDLE, None),
    "moved-node-gets-a-new-leaf": (secret(LEAF), ("192.0.2.9",), NOW, CertChange.ISSUE,
                                   RenewReason.ADDRESSES_CHANGED),
    "two-thirds-of-life-renews": (secret(LEAF), ADDRESSES, NOW + timedelta(days=300), CertChange.ISSUE,
                                  RenewReason.EXPIRING),
}


@pytest.mark.parametrize(("stored", "addresses", "now", "change", "reason"), CASES.values(), ids=CASES.keys())
def test_plan_certificates_decides_from_what_the_secret_holds(stored: dict[str, Any] | None,
                                                              addresses: tuple[str, ...], now: datetime,
                                                              change: CertChange | None,
                                                              reason: RenewReason | None) -> None:
    secrets = {o.tls_secret_name("e1"): stored} if stored else {}
    result = plan_certificates(secrets, {"e1": addresses}, {"e1"}, CA, now)
    assert result.errors == []
    if change is None:
        assert result.actions == [] and result.expiry == {"e1": describe(LEAF.cert_pem).not_after.isoformat()}
        return
    [action] = result.actions
    assert (action.node, action.secret_name, action.change, action.reason) == \
        ("e1", o.tls_secret_name("e1"), change, reason)
    assert result.expiry == {}
    leaf = issue(action, CA, now, timedelta(days=365))
    assert (leaf == LEAF) is (change is CertChange.REBUNDLE)
    assert "PRIVATE" not in repr(action)


def test_each_connector_uses_its_own_secret_and_a_bad_name_is_an_error_naming_the_field() -> None:
    result = plan_certificates({}, {"conn": ("198.51.100.1",), "conn-2": ("198.51.100.2",),
                                    "Bad_Name": ADDRESSES}, {"Bad_Name"}, CA, NOW)
    assert [(a.node, a.secret_name) for a in result.actions] == [
        ("conn", "fabmesh-connector-tls-conn"), ("conn-2", "fabmesh-connector-tls-conn-2")]
    assert [(e.node, e.field) for e in result.errors] == [("Bad_Name", "certificate.name")]


def test_ca_from_secret_none_means_create_one() -> None:
    assert ca_from_secret(None) is None
    stored = {"data": {"tls.crt": o.b64(CA.cert_pem), "tls.key": o.b64(CA.key_pem)}}
    assert ca_from_secret(stored) == CA


def _info(name: str, annotations: dict[str, str]) -> NodeInfo:
    return NodeInfo(name=name, role=Role.EDGE, internal_ip="192.0.2.1", external_ip=None, communities=("a",),
                    spec_pod_cidr="10.233.0.0/24", pod_cidr_annotation=None, created="", uid="u", resource_version="1",
                    annotations=annotations)


def test_status_is_patched_only_where_it_differs_and_joins_the_plans_patch() -> None:
    local = LocalNode(name="e1", role=Role.EDGE, address="192.0.2.1", endpoint="192.0.2.1", pod_cidr="10.233.0.0/24",
                      communities=("a",))
    edge = NodeMesh(node=local, local_subnets=("10.233.0.0/24",), mesh_cidrs=(), caCert="CA")
    mesh = MeshPlan(edges={"e1": edge, "e2": edge.model_copy(update={"node": local.model_copy(update={"name": "e2"})})},
                    node_patches={"e2": NodePatch(annotations={"fabmesh.io/pod-cidr": "10.233.0.0/24"})})
    current = status_text(local, "2031-01-01T00:00:00+00:00")
    assert current == "cidr=10.233.0.0/24 communities=a cert-expires=2031-01-01T00:00:00+00:00"
    nodes = {"e1": _info("e1", {STATUS_ANNOTATION: current}), "e2": _info("e2", {STATUS_ANNOTATION: current})}
    same = node_writes(mesh, nodes, {"e1": "2031-01-01T00:00:00+00:00", "e2": "2031-01-01T00:00:00+00:00"})
    assert same == {"e2": NodePatch(annotations={"fabmesh.io/pod-cidr": "10.233.0.0/24"})}
    renewed = node_writes(mesh, nodes, {"e2": "2031-01-01T00:00:00+00:00"})
    assert renewed["e1"].annotations == {STATUS_ANNOTATION: "cidr=10.233.0.0/24 communities=a cert-expires=none"}
