"""What a compromised node may write about itself, and what the operator makes of it (issue: threat model).

Each test speaks to the API server as a kubelet does (``system:node:<name>``, limited by the
Node authorizer and the NodeRestriction admission plugin) and checks the operator's output.
"""

from __future__ import annotations

import pytest

from fabmesh.kube.client import ApiError, Kube, load_api_client
from fabmesh.operator import objects as o
from fabmesh.testenv.controlplane import ControlPlane
from tests.api.conftest import OperatorEnv
from tests.api.operator_helpers import (
    CONNECTOR,
    EDGE,
    FLANNEL,
    cloud_nodes,
    configmaps,
    create_nodes,
    edge,
    mesh_of,
    node,
    wait_converged,
    wait_matches_plan,
)

pytestmark = pytest.mark.api


def _as_kubelet(control_plane: ControlPlane, name: str) -> Kube:
    return Kube(load_api_client(str(control_plane.kubeconfig_for_node(name))))


def test_a_kubelet_cannot_make_its_node_the_connector(operator_env: OperatorEnv, control_plane: ControlPlane) -> None:
    env = operator_env
    create_nodes(env.kube, [*cloud_nodes(), edge("e1", "192.0.2.1"), edge("e2", "192.0.2.2")])
    env.start()
    wait_converged(env, {"e1", "e2"})

    # A compromised worker registers itself with a name that sorts first, the flannel annotations of
    # a healthy node and the connector labels a kubelet can write: the old label and a look-alike.
    kubelet = _as_kubelet(control_plane, "a-rogue")
    kubelet.create("nodes", node("a-rogue", "198.51.100.66",
                                 {"fabmesh.io/connector": "", "fabmesh.io/fabmesh-connector": ""}, dict(FLANNEL)))
    for label in (CONNECTOR, EDGE):  # the labels that do confer a role, it may not set
        with pytest.raises(ApiError) as refused:
            kubelet.merge_patch("nodes", "a-rogue", {"metadata": {"labels": {label: ""}}})
        assert refused.value.status == 403, refused.value

    # Once the operator has seen it: the connector stays, and no edge is told to peer with the rogue.
    wait_matches_plan(env)
    cms = configmaps(env)
    assert mesh_of(cms[o.CONNECTOR_CONFIGMAP]).node.name == "connector-1"
    for name in ("e1", "e2"):
        assert "a-rogue" not in {p.name for p in mesh_of(cms[o.agent_configmap_name(name)]).peers}


def test_a_newer_connector_never_takes_over_from_the_active_one(operator_env: OperatorEnv) -> None:
    env = operator_env
    create_nodes(env.kube, [*cloud_nodes(), edge("e1", "192.0.2.1")])
    env.start()
    wait_converged(env, {"e1"})
    # Labelled by an admin, named to sort first, created later: a standby, not the new active connector.
    env.kube.create("nodes", node("a-standby", "198.51.100.7", {CONNECTOR: ""}, dict(FLANNEL)))
    wait_matches_plan(env)
    assert mesh_of(configmaps(env)[o.CONNECTOR_CONFIGMAP]).node.name == "connector-1"
    assert "connector-1" in {p.name for p in mesh_of(configmaps(env)[o.agent_configmap_name("e1")]).peers}
