"""The agent Pod the operator renders: locked down as far as a host-network, NET_ADMIN Pod can be."""

from __future__ import annotations

from typing import Any

import pytest

from fabmesh.mesh.model import Backend, TunnelSettings
from fabmesh.operator.objects import agent_pod, connector_pod
from fabmesh.operator.settings import AgentPods, ConnectorPods, OperatorSettings, Resources

BACKENDS = [pytest.param(b, id=b.value) for b in Backend]


def _pod(backend: Backend = Backend.KERNEL, **agent_pods: Any) -> dict[str, Any]:
    settings = OperatorSettings(tunnel=TunnelSettings(backend=backend), agent_pods=AgentPods(**agent_pods))
    return agent_pod("edge-1", "uid-1", settings)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_container_runs_with_runtime_default_seccomp_no_escalation_and_a_read_only_root(
        backend: Backend) -> None:
    spec = _pod(backend)["spec"]
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in spec["containers"]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["capabilities"]["drop"] == ["ALL"], container["name"]
        assert set(context["capabilities"]["add"]) <= {"NET_ADMIN", "NET_RAW", "NET_BIND_SERVICE"}
        assert "privileged" not in context


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_path_a_container_writes_is_a_volume(backend: Backend) -> None:
    spec = _pod(backend)["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    writable = {c["name"]: {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"] if not m.get("readOnly")}
                for c in spec["containers"]}
    # The agent: its state and the VICI socket, temporary files, the CNI file on the host, the xtables lock.
    assert set(writable["agent"]) == {"/var/run/fabmesh", "/tmp", "/etc/cni/net.d", "/run/xtables.lock"}
    assert "emptyDir" in writable["agent"]["/tmp"] and "emptyDir" in writable["agent"]["/var/run/fabmesh"]
    # charon: strongswan.conf and the VICI socket, and its compiled-in pid file /var/run/charon.pid.
    assert {"/var/run", "/var/run/fabmesh"} <= set(writable["strongswan"])
    assert "emptyDir" in writable["strongswan"]["/var/run"]
    assert writable["strongswan"]["/var/run/fabmesh"] is writable["agent"]["/var/run/fabmesh"]


def test_containers_get_the_default_requests_and_limits() -> None:
    containers = {c["name"]: c for c in _pod()["spec"]["containers"]}
    assert containers["agent"]["resources"] == {"requests": {"cpu": "20m", "memory": "64Mi"},
                                                "limits": {"cpu": "500m", "memory": "256Mi"}}
    assert containers["strongswan"]["resources"] == {"requests": {"cpu": "20m", "memory": "32Mi"},
                                                     "limits": {"cpu": "1", "memory": "256Mi"}}


def test_resources_come_from_the_settings_and_change_the_spec_hash() -> None:
    default = _pod()
    custom = _pod(resources=Resources(limits={"memory": "1Gi"}),
                  strongswan_resources=Resources(requests={"cpu": "1"}))
    containers = {c["name"]: c for c in custom["spec"]["containers"]}
    assert containers["agent"]["resources"] == {"limits": {"memory": "1Gi"}}
    assert containers["strongswan"]["resources"] == {"requests": {"cpu": "1"}}
    assert custom["metadata"]["annotations"] != default["metadata"]["annotations"]


# -- the connector Pod: one per connector node, the same hardening, only its own Secret ---------------

def _connector(backend: Backend = Backend.KERNEL, **connector_pods: Any) -> dict[str, Any]:
    settings = OperatorSettings(tunnel=TunnelSettings(backend=backend), connector_shards=3,
                                connector_pods=ConnectorPods(**connector_pods))
    return connector_pod("cloud-1", "uid-9", "198.51.100.1", settings)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_connector_pod_is_hardened_like_the_agent_pod(backend: Backend) -> None:
    connector, agent = _connector(backend)["spec"], _pod(backend)["spec"]
    for key in ("securityContext", "hostNetwork", "automountServiceAccountToken", "enableServiceLinks",
                "priorityClassName", "tolerations", "dnsPolicy"):
        assert connector[key] == agent[key], key
    assert connector["nodeName"] == "cloud-1"
    for mine, theirs in zip(connector["containers"], agent["containers"], strict=True):
        assert mine["securityContext"] == theirs["securityContext"]
        assert mine["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_connector_pod_mounts_only_its_own_secret_and_the_connector_configmaps() -> None:
    pod = _connector()
    assert pod["metadata"]["name"] == "fabmesh-connector-cloud-1"
    assert pod["metadata"]["ownerReferences"] == [{"apiVersion": "v1", "kind": "Node", "name": "cloud-1",
                                                   "uid": "uid-9"}]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert [v["secret"]["secretName"] for v in volumes.values() if "secret" in v] == ["fabmesh-connector-tls-cloud-1"]
    assert volumes["tls"]["secret"]["defaultMode"] == 0o400
    sources = [s["configMap"]["name"] for s in volumes["mesh"]["projected"]["sources"]]
    assert sources == ["fabmesh-connector", "fabmesh-connector-peers-00", "fabmesh-connector-peers-01",
                       "fabmesh-connector-peers-02"]
    assert not [v for v in volumes.values() if "hostPath" in v and v["hostPath"]["path"] == "/etc/cni/net.d"]


def test_the_connector_pod_knows_its_node_and_binds_metrics_to_the_node_address() -> None:
    args = {c["name"]: c["args"] for c in _connector()["spec"]["containers"]}["connector"]
    assert args[0] == "connector"
    assert args[args.index("--node-name") + 1] == "cloud-1"
    assert args[args.index("--metrics-port") + 1] == "10120"
    assert args[args.index("--metrics-address") + 1] == "198.51.100.1"
    assert "--uplink" not in args
    args = {c["name"]: c["args"] for c in _connector(uplink="eth0", metrics_address="0.0.0.0",
                                                      metrics_port=9200)["spec"]["containers"]}["connector"]
    assert args[args.index("--uplink") + 1] == "eth0"
    assert args[args.index("--metrics-address") + 1] == "0.0.0.0"
    assert args[args.index("--metrics-port") + 1] == "9200"


def test_the_connector_pod_gets_the_connector_resources() -> None:
    containers = {c["name"]: c for c in _connector()["spec"]["containers"]}
    assert containers["connector"]["resources"] == {"requests": {"cpu": "100m", "memory": "128Mi"},
                                                    "limits": {"cpu": "1", "memory": "512Mi"}}
    assert containers["strongswan"]["resources"]["limits"] == {"cpu": "2", "memory": "1Gi"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_path_a_connector_container_writes_is_a_volume(backend: Backend) -> None:
    spec = _connector(backend)["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    writable = {c["name"]: {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"] if not m.get("readOnly")}
                for c in spec["containers"]}
    assert set(writable["connector"]) == {"/var/run/fabmesh", "/tmp", "/run/xtables.lock"}
    assert "emptyDir" in writable["connector"]["/tmp"]
    # charon will not start without its compiled-in pid file, /var/run/charon.pid.
    assert {"/var/run", "/var/run/fabmesh"} <= set(writable["strongswan"])
    assert "emptyDir" in writable["strongswan"]["/var/run"]
