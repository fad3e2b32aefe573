"""Each node's identity: a Role that names one object's status, a Pod that mounts only that identity's token."""

from __future__ import annotations

import pytest

from fabmesh.operator import objects as o
from fabmesh.operator.identity_sync import differs, wanted
from fabmesh.operator.settings import OperatorSettings

pytestmark = pytest.mark.unit
SETTINGS = OperatorSettings(agent_pods={"status_token_expiration_s": 900})


def test_the_role_grants_get_update_patch_of_its_own_status_and_nothing_else() -> None:
    role = o.status_role("edge-1", "uid-1", "fm")
    assert role["rules"] == [{"apiGroups": ["fabmesh.io"], "resources": ["tunnelstatuses/status"],
                              "resourceNames": ["edge-1"], "verbs": ["get", "patch", "update"]}]
    binding = o.status_role_binding("edge-1", "uid-1", "fm")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "fabmesh-node-edge-1", "namespace": "fm"}]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]


def test_agent_pod_mounts_a_short_lived_token_of_its_own_node_identity_only() -> None:
    spec = o.agent_pod("edge-1", "uid-1", SETTINGS)["spec"]
    assert (spec["serviceAccountName"], spec["automountServiceAccountToken"]) == ("fabmesh-node-edge-1", False)
    tokens = [s["serviceAccountToken"] for v in spec["volumes"] for s in (v.get("projected") or {}).get("sources", [])
              if "serviceAccountToken" in s]
    assert tokens == [{"path": "token", "expirationSeconds": 900}]
    main = spec["containers"][0]
    assert {"name": "status-token", "mountPath": o.STATUS_TOKEN_DIR, "readOnly": True} in main["volumeMounts"]
    assert all(m["name"] != "status-token" for m in spec["containers"][1]["volumeMounts"])  # not charon
    args = main["args"]
    assert args[args.index("--status-token-file") + 1] == f"{o.STATUS_TOKEN_DIR}/token"
    assert args[args.index("--status-namespace") + 1] == SETTINGS.namespace


def test_connector_pod_uses_its_own_node_identity() -> None:
    spec = o.connector_pod("cloud-1", "uid-c", "192.0.2.1", SETTINGS)["spec"]
    assert spec["serviceAccountName"] == "fabmesh-node-cloud-1"


def test_an_object_read_back_unchanged_is_not_rewritten_and_a_changed_rule_is() -> None:
    want = wanted({"edge-1": ("uid-1", "edge")}, "fm")
    for kind, objs in want.items():
        for body in objs.values():
            read_back = {**body, "metadata": {**body["metadata"], "resourceVersion": "7", "uid": "x"}}
            assert not differs(kind, read_back, body), kind
    role = want["roles"]["fabmesh-status-edge-1"]
    widened = {**role, "rules": [{**role["rules"][0], "resourceNames": []}]}
    assert differs("roles", widened, role)


def test_a_configured_status_server_reaches_the_agent_and_none_means_in_cluster() -> None:
    named = o.agent_pod("edge-1", "u", OperatorSettings(agent_pods={"status_server": "https://203.0.113.1:6443"}))
    args = named["spec"]["containers"][0]["args"]
    assert args[args.index("--status-server") + 1] == "https://203.0.113.1:6443"
    assert "--status-server" not in o.agent_pod("edge-1", "u", SETTINGS)["spec"]["containers"][0]["args"]
