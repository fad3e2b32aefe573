"""What a compromised node may write about itself, and what the operator makes of it (issue: threat model).

Each test speaks to the API server as a kubelet does (``system:node:<name>``, limited by the
Node authorizer and the NodeRestriction admission plugin) and checks the operator's output.
"""

from __future__ import annotations

import pytest

from fabmesh.kube.client import ApiError, Kube, load_api_client
from fabmesh.operator import objects as o
from fabmesh.pki.authority import describe, key_matches_cert
from fabmesh.testenv.controlplane import ControlPlane
from fabmesh.testenv.hosts import wait_for
from tests.api.conftest import OperatorEnv
from tests.api.operator_helpers import (
    CONNECTOR,
    EDGE,
    FLANNEL,
    cloud_nodes,
    configmaps,
    create_nodes,
    edge,
    events_for,
    mesh_of,
    node,
    pods,
    secret_text,
    secrets,
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


def _mounted(pod: dict) -> tuple[set[str], set[str]]:
    """(Secrets, ConfigMaps) a Pod mounts, through plain and projected volumes."""
    volumes = pod["spec"]["volumes"]
    sources = [v for v in volumes] + [s for v in volumes for s in (v.get("projected") or {}).get("sources", [])]
    return ({v["secret"]["secretName"] for v in sources if "secret" in v},
            {v["configMap"]["name"] for v in sources if "configMap" in v})


def _connector_objects(env: OperatorEnv, names: set[str]) -> tuple[dict, dict]:
    def ready() -> bool:
        secs, pds = secrets(env), pods(env)
        return (all(o.connector_secret_name(n) in secs and o.connector_pod_name(n) in pds for n in names)
                and not {s for s in secs if s.startswith(o.CONNECTOR_SECRET_PREFIX)}
                - {o.connector_secret_name(n) for n in names})
    wait_for(ready, timeout=60, interval=0.5, what=f"a Secret and a Pod for each of {sorted(names)}")
    return secrets(env), pods(env)


def test_each_connector_has_its_own_key_and_its_pod_mounts_only_that_key(
        operator_env: OperatorEnv, control_plane: ControlPlane) -> None:
    env = operator_env
    create_nodes(env.kube, [*cloud_nodes(), edge("e1", "192.0.2.1")])
    env.start()
    wait_converged(env, {"e1"})
    env.kube.create("nodes", node("a-standby", "198.51.100.7", {CONNECTOR: ""}, dict(FLANNEL)))
    secs, pds = _connector_objects(env, {"connector-1", "a-standby"})

    keys = {}
    for name in ("connector-1", "a-standby"):
        secret = secs[o.connector_secret_name(name)]
        assert secret["metadata"]["ownerReferences"][0]["name"] == name
        cert, keys[name] = secret_text(secret, "tls.crt"), secret_text(secret, "tls.key")
        assert describe(cert).common_name == name and key_matches_cert(cert, keys[name])
        pod = pds[o.connector_pod_name(name)]  # as the API server stored it
        spec = pod["spec"]
        assert (spec["nodeName"], spec["hostNetwork"], spec["automountServiceAccountToken"]) == (name, True, False)
        mounted_secrets, mounted_cms = _mounted(pod)
        assert mounted_secrets == {o.connector_secret_name(name)}
        # kube-root-ca.crt: the public CA bundle that verifies the API server, for the status token.
        assert mounted_cms == {o.CONNECTOR_CONFIGMAP, "kube-root-ca.crt",
                               *(o.connector_shard_name(i) for i in range(env.settings.connector_shards))}
        assert spec["serviceAccountName"] == o.node_account_name(name)  # its own identity, no other's
        connector = next(c for c in spec["containers"] if c["name"] == "connector")
        assert connector["args"][connector["args"].index("--node-name") + 1] == name
        for container in spec["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["resources"]["limits"]
    assert keys["connector-1"] != keys["a-standby"]
    # The standby's kubelet may read the Secret its own Pod mounts (Node authorizer), not the active's key.
    kubelet = _as_kubelet(control_plane, "a-standby")
    assert kubelet.get("secrets", o.connector_secret_name("a-standby"), env.namespace) is not None
    with pytest.raises(ApiError) as refused:
        kubelet.get("secrets", o.connector_secret_name("connector-1"), env.namespace)
    assert refused.value.status == 403, refused.value

    # The active connector loses its label: its key and Pod go; the standby takes over with the key and
    # Pod it already had (failover issues nothing and restarts nothing).
    standby_secret_version = secs[o.connector_secret_name("a-standby")]["metadata"]["resourceVersion"]
    standby_pod_uid = pds[o.connector_pod_name("a-standby")]["metadata"]["uid"]
    env.kube.merge_patch("nodes", "connector-1", {"metadata": {"labels": {CONNECTOR: None}}})
    secs, pds = _connector_objects(env, {"a-standby"})
    assert o.connector_pod_name("connector-1") not in pds
    assert secs[o.connector_secret_name("a-standby")]["metadata"]["resourceVersion"] == standby_secret_version
    assert pds[o.connector_pod_name("a-standby")]["metadata"]["uid"] == standby_pod_uid
    wait_for(lambda: mesh_of(configmaps(env)[o.CONNECTOR_CONFIGMAP]).node.name == "a-standby", timeout=30,
             what="the standby to become the active connector")


def test_an_edge_label_added_to_a_connector_by_mistake_is_an_event_and_tears_nothing_down(
        operator_env: OperatorEnv) -> None:
    env = operator_env
    create_nodes(env.kube, [*cloud_nodes(), node("conn-b", "198.51.100.8", {CONNECTOR: ""}, dict(FLANNEL)),
                            edge("e1", "192.0.2.1")])
    env.start()
    wait_converged(env, {"e1"})
    secs, pds = _connector_objects(env, {"connector-1", "conn-b"})
    before = (secs[o.connector_secret_name("conn-b")]["metadata"]["uid"],
              pds[o.connector_pod_name("conn-b")]["metadata"]["uid"])
    env.kube.merge_patch("nodes", "conn-b", {"metadata": {"labels": {EDGE: ""}}})  # a careless label
    wait_for(lambda: events_for(env, "conn-b"), timeout=30, what="a Warning Event on conn-b")
    wait_matches_plan(env)
    after = (secrets(env)[o.connector_secret_name("conn-b")]["metadata"]["uid"],
             pods(env)[o.connector_pod_name("conn-b")]["metadata"]["uid"])
    assert after == before, "the connector's key and Pod must survive a bad label"
