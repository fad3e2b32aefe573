"""The api tier talks to a real kube-apiserver: prove the parts are real."""

from __future__ import annotations

import threading
import uuid

import pytest
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from fabmesh.testenv.controlplane import ControlPlane

pytestmark = pytest.mark.api


def _configmap(name: str, value: str) -> client.V1ConfigMap:
    return client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name), data={"k": value})


def test_configmap_create_read_update_round_trips(api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    name = f"smoke-{uuid.uuid4().hex[:6]}"
    core.create_namespaced_config_map("default", _configmap(name, "one"))
    got = core.read_namespaced_config_map(name, "default")
    assert got.data == {"k": "one"}
    got.data["k"] = "two"
    core.replace_namespaced_config_map(name, "default", got)
    assert core.read_namespaced_config_map(name, "default").data == {"k": "two"}


def test_watch_receives_a_change_made_after_it_started(api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    name = f"watched-{uuid.uuid4().hex[:6]}"
    core.create_namespaced_config_map("default", _configmap(name, "before"))
    rv = core.read_namespaced_config_map(name, "default").metadata.resource_version
    seen: list[str] = []
    w = watch.Watch()

    def consume() -> None:
        for event in w.stream(core.list_namespaced_config_map, "default", resource_version=rv,
                              field_selector=f"metadata.name={name}", timeout_seconds=20):
            seen.append(f"{event['type']}:{event['object'].data['k']}")
            w.stop()

    t = threading.Thread(target=consume)
    t.start()
    core.patch_namespaced_config_map(name, "default", {"data": {"k": "after"}})
    t.join(timeout=25)
    assert seen == ["MODIFIED:after"]


def test_update_with_stale_resource_version_is_rejected_with_409(api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    name = f"cas-{uuid.uuid4().hex[:6]}"
    core.create_namespaced_config_map("default", _configmap(name, "v1"))
    stale = core.read_namespaced_config_map(name, "default")
    core.patch_namespaced_config_map(name, "default", {"data": {"k": "v2"}})
    stale.data["k"] = "v3"
    with pytest.raises(ApiException) as exc:
        core.replace_namespaced_config_map(name, "default", stale)
    assert exc.value.status == 409
    assert core.read_namespaced_config_map(name, "default").data == {"k": "v2"}


def test_service_account_without_rbac_gets_403(api: client.ApiClient, control_plane: ControlPlane) -> None:
    core = client.CoreV1Api(api)
    name = f"nobody-{uuid.uuid4().hex[:6]}"
    core.create_namespaced_service_account("default", client.V1ServiceAccount(
        metadata=client.V1ObjectMeta(name=name)))
    token = core.create_namespaced_service_account_token(
        name, "default", client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=["https://kubernetes.default.svc"]))).status.token
    limited = config.new_client_from_config(
        config_file=str(control_plane.kubeconfig_for_token(name, token)))
    with pytest.raises(ApiException) as exc:
        client.CoreV1Api(limited).list_namespaced_config_map("default")
    assert exc.value.status == 403
    assert f"system:serviceaccount:default:{name}" in exc.value.body
