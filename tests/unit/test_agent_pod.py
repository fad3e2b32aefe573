"""The agent Pod the operator renders: locked down as far as a host-network, NET_ADMIN Pod can be."""

from __future__ import annotations

from typing import Any

import pytest

from fabmesh.mesh.model import Backend, TunnelSettings
from fabmesh.operator.objects import agent_pod
from fabmesh.operator.settings import AgentPods, OperatorSettings, Resources

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
