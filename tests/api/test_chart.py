"""The Helm chart, with the real helm binary: it lints, refuses bad values by name, renders least privilege,
and installs into a real kube-apiserver where RBAC gives each ServiceAccount exactly what it needs.

There is no controller-manager or kubelet here, so the installed Deployment never gets Pods:
the tests install without ``--wait`` and look at the objects in the API, and ask the API server's own
authorizer (SubjectAccessReview) what each ServiceAccount may do.
"""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fabmesh.cli import build_parser
from fabmesh.kube.client import ApiError, Kube, load_api_client
from fabmesh.operator.objects import (
    CLOUD_ROUTES_CONFIGMAP,
    CONNECTOR_CONFIGMAP,
    connector_pod,
    connector_secret_name,
    connector_shard_name,
)
from fabmesh.operator.settings import OperatorSettings
from fabmesh.testenv.cluster import CHART, install_release_hook_rbac, render_chart
from fabmesh.testenv.controlplane import ControlPlane

pytestmark = pytest.mark.api

Obj = dict[str, Any]
RELEASE = "fabmesh"
HELM_OWNER = "meta.helm.sh/release-namespace"
_RBAC = "/apis/rbac.authorization.k8s.io/v1"
# API paths of everything the chart renders, by kind (namespaced ones take the namespace).
_COLLECTION = {
    "ServiceAccount": "/api/v1/namespaces/{ns}/serviceaccounts",
    "ConfigMap": "/api/v1/namespaces/{ns}/configmaps",
    "Deployment": "/apis/apps/v1/namespaces/{ns}/deployments",
    "DaemonSet": "/apis/apps/v1/namespaces/{ns}/daemonsets",
    "Role": _RBAC + "/namespaces/{ns}/roles",
    "RoleBinding": _RBAC + "/namespaces/{ns}/rolebindings",
    "ClusterRole": _RBAC + "/clusterroles",
    "ClusterRoleBinding": _RBAC + "/clusterrolebindings",
    "CustomResourceDefinition": "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
}


def object_path(obj: Obj) -> str:
    return _COLLECTION[obj["kind"]].format(ns=obj["metadata"].get("namespace")) + f"/{obj['metadata']['name']}"


class Helm:
    """The real helm binary, with its config, cache and data kept out of the user's home."""

    def __init__(self, binary: Path, home: Path, kubeconfig: Path) -> None:
        self.binary, self.kubeconfig = binary, kubeconfig
        self.env = {**os.environ, "KUBECACHEDIR": str(home / "kube-cache"),
                    **{f"HELM_{d}_HOME": str(home / d.lower()) for d in ("CACHE", "CONFIG", "DATA")}}

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.binary), *args], capture_output=True, text=True, env=self.env, timeout=60)

    def cluster(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(*args, "--kubeconfig", str(self.kubeconfig))


@pytest.fixture(scope="module")
def helm(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    assert control_plane.assets is not None
    return Helm(control_plane.assets.helm, tmp_path_factory.mktemp("helm"), control_plane.kubeconfig)


@pytest.fixture(scope="module")
def admin(control_plane: ControlPlane) -> Kube:
    return Kube(load_api_client(str(control_plane.kubeconfig)))


@pytest.fixture(scope="module")
def rendered(helm: Helm) -> dict[tuple[str, str], Obj]:
    return {(o["kind"], o["metadata"]["name"]): o for o in render_chart(helm.binary, "fm-render")}


def container(pod_spec: Obj, name: str) -> Obj:
    return next(c for c in pod_spec["containers"] if c["name"] == name)


# -- lint and schema --------------------------------------------------------------------------------

def test_chart_lints_clean(helm: Helm) -> None:
    result = helm.run("lint", str(CHART))
    assert result.returncode == 0, result.stdout + result.stderr


BAD_VALUES = [
    pytest.param("lint", "operator.settings.tunnel.backend=bogus", r"operator[./]settings[./]tunnel[./]backend",
                 id="lint-unknown-backend"),
    pytest.param("template", "operator.settings.tunnel.backend=bogus",
                 r"operator[./]settings[./]tunnel[./]backend", id="template-unknown-backend"),
    pytest.param("template", "operator.settings.connector_shards=0", r"connector_shards", id="zero-shards"),
    pytest.param("template", "operator.settings.tunnel.mtu=100", r"tunnel[./]mtu", id="mtu-below-576"),
    pytest.param("template", "operator.settings.edge_lable=x", r"edge_lable", id="misspelt-setting"),
    pytest.param("template", "operator.settings.leader_election.retry_period_s=9", r"leader_election",
                 id="lease-shorter-than-retry"),
    pytest.param("template", "operator.settings.tunnel.esp_proposals={aes256gcm16-ecp256,aes128-sha1-modp1024}",
                 r"operator[./]settings[./]tunnel[./]esp_proposals[./[]1", id="weak-esp-proposal"),
    pytest.param("template", "operator.settings.tunnel.esp_proposals={aes256gcm16}",
                 r"tunnel[./]esp_proposals[./[]0", id="esp-proposal-without-pfs"),
    pytest.param("template", "operator.settings.tunnel.ike_proposals={aes256gcm16-prfsha1-modp1024}",
                 r"tunnel[./]ike_proposals[./[]0", id="weak-ike-proposal"),
    pytest.param("template", "operator.settings.node.cni_conf_dir=/etc/cni/../../root", r"node[./]cni_conf_dir",
                 id="cni-dir-with-dot-dot"),
    pytest.param("template", "operator.settings.node.cni_conf_name=../evil.conflist", r"node[./]cni_conf_name",
                 id="cni-name-with-slash"),
    pytest.param("template", "operator.settings.agent_pods.resources.limits.memory=lots",
                 r"agent_pods[./]resources[./]limits[./]memory", id="malformed-agent-quantity"),
    pytest.param("template", "operator.settings.connector_pods.resources.limits.cpu=fast",
                 r"connector_pods[./]resources[./]limits", id="malformed-connector-quantity"),
    pytest.param("template", "operator.settings.connector_pods.uplink=eth0/x", r"connector_pods[./]uplink",
                 id="uplink-not-a-device-name"),
    pytest.param("template", "connector.enabled=false", r"connector", id="the-old-connector-values-are-gone"),
    pytest.param("template", "operator.healthPort=0", r"healthPort", id="health-port-zero"),
]


@pytest.mark.parametrize(("verb", "setting", "field"), BAD_VALUES)
def test_bad_value_fails_naming_the_field(helm: Helm, verb: str, setting: str, field: str) -> None:
    result = helm.run(verb, *(["fabmesh"] if verb == "template" else []), str(CHART), "--set", setting)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert re.search(field, output), output


def test_unknown_backend_message_lists_the_allowed_ones(helm: Helm) -> None:
    result = helm.run("template", "fabmesh", str(CHART), "--set", "operator.settings.tunnel.backend=bogus")
    assert "kernel" in result.stderr and "libipsec" in result.stderr, result.stderr


# -- what helm template renders -------------------------------------------------------------------

def test_operator_deployment_runs_two_replicas_as_the_operator_service_account(
        rendered: dict[tuple[str, str], Obj]) -> None:
    deployment = rendered[("Deployment", "fabmesh-operator")]
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "fabmesh-operator"


def test_operator_probes_point_at_the_health_port_the_operator_is_told_to_serve(helm: Helm) -> None:
    deployment = {(o["kind"], o["metadata"]["name"]): o for o in
                  render_chart(helm.binary, "fm-render", {"operator": {"healthPort": 18095}})}[
        ("Deployment", "fabmesh-operator")]
    operator = container(deployment["spec"]["template"]["spec"], "operator")
    args = build_parser().parse_args(operator["args"])  # the real CLI accepts what the chart passes
    assert (args.health_port, args.config) == (18095, Path("/etc/fabmesh/operator.yaml"))
    assert operator["ports"] == [{"name": "health", "containerPort": 18095, "protocol": "TCP"}]
    assert operator["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert operator["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}


def settings_of(objects: dict[tuple[str, str], Obj]) -> OperatorSettings:
    text = objects[("ConfigMap", "fabmesh-operator-settings")]["data"]["operator.yaml"]
    return OperatorSettings.model_validate(yaml.safe_load(text))


def test_no_connector_daemonset_the_operator_runs_connector_pods_from_its_settings(
        rendered: dict[tuple[str, str], Obj]) -> None:
    # A DaemonSet would mount one key on every connector node; the operator mounts each node's own. The one
    # DaemonSet is the route agent's, which mounts no Secret (test_cloud_agent_daemonset_...).
    assert [name for kind, name in rendered if kind == "DaemonSet"] == ["fabmesh-cloud-agent"]
    settings = settings_of(rendered)
    pods = settings.connector_pods
    assert pods.enabled is True
    assert (pods.image, pods.strongswan_image, pods.image_pull_policy) == (
        "ghcr.io/fabmesh/fabmesh:0.1.0", "ghcr.io/fabmesh/fabmesh:0.1.0", "IfNotPresent")
    assert pods.metrics_port == 10120 and pods.metrics_address == "" and pods.uplink == ""
    spec = connector_pod("cloud-1", "uid", "198.51.100.1", settings)["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    sources = [s["configMap"] for s in volumes["mesh"]["projected"]["sources"]]
    assert sources[0] == {"name": CONNECTOR_CONFIGMAP, "items": [{"key": "mesh.yaml", "path": "mesh.yaml"}]}
    assert sources[1:] == [{"name": connector_shard_name(i), "optional": True,
                            "items": [{"key": "peers.yaml", "path": f"peers-{i:02d}.yaml"}]} for i in range(16)]
    assert volumes["tls"]["secret"] == {"secretName": connector_secret_name("cloud-1"), "defaultMode": 0o400}


def test_only_the_operator_has_a_service_account_and_rbac(rendered: dict[tuple[str, str], Obj]) -> None:
    assert [name for kind, name in rendered if kind == "ServiceAccount"] == ["fabmesh-operator"]
    bound = {s["name"] for (kind, _), o in rendered.items() if kind.endswith("Binding") for s in o["subjects"]}
    assert bound == {"fabmesh-operator"}


def test_no_secret_or_private_key_is_rendered(rendered: dict[tuple[str, str], Obj]) -> None:
    assert [name for kind, name in rendered if kind == "Secret"] == []
    configmaps = [o for (kind, _), o in rendered.items() if kind == "ConfigMap"]
    assert configmaps, "the operator's settings ConfigMap should be rendered"
    for cm in configmaps:
        for key, text in cm.get("data", {}).items():
            assert not re.search(r"PRIVATE KEY|tls\.key|BEGIN CERTIFICATE", text), f"{cm['metadata']['name']}/{key}"


def test_cloud_agent_daemonset_runs_on_other_cloud_nodes_with_net_admin_one_configmap_and_no_token(
        rendered: dict[tuple[str, str], Obj], helm: Helm) -> None:
    daemonset = rendered[("DaemonSet", "fabmesh-cloud-agent")]
    spec = daemonset["spec"]["template"]["spec"]
    (term,) = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    settings = settings_of(rendered)
    assert term["matchExpressions"] == [{"key": settings.edge_label, "operator": "DoesNotExist"},
                                        {"key": settings.connector_label, "operator": "DoesNotExist"}]
    assert spec["hostNetwork"] is True and spec["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in spec
    agent = container(spec, "cloud-agent")
    assert agent["securityContext"]["capabilities"] == {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}
    assert agent["args"][:1] == ["cloud-agent"]
    assert agent["env"] == [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["routes"]["configMap"] == {"name": CLOUD_ROUTES_CONFIGMAP, "optional": True}
    assert not [v for v in spec["volumes"] if "secret" in v or "projected" in v]
    build_parser(["cloud-agent"]).parse_args(agent["args"])  # the flags exist
    assert settings.cloud_agent.route_edge_pod_cidrs is False and settings.cloud_agent.route_table == 2621
    values = {"cloudAgent": {"enabled": False},
              "operator": {"settings": {"cloud_agent": {"route_edge_pod_cidrs": True, "route_table": 3000}}}}
    objects = {(o["kind"], o["metadata"]["name"]): o for o in render_chart(helm.binary, "fm-render", values)}
    assert [name for kind, name in objects if kind == "DaemonSet"] == []
    assert settings_of(objects).cloud_agent.model_dump() == {"route_edge_pod_cidrs": True, "route_table": 3000,
                                                              "resync_period_s": 30}


def test_shard_count_and_connector_pods_follow_the_values(helm: Helm) -> None:
    values = {"operator": {"settings": {"connector_shards": 3,
                                        "connector_pods": {"enabled": False, "uplink": "eth0"}}}}
    settings = settings_of({(o["kind"], o["metadata"]["name"]): o
                            for o in render_chart(helm.binary, "fm-render", values)})
    assert settings.connector_shards == 3
    assert (settings.connector_pods.enabled, settings.connector_pods.uplink) == (False, "eth0")
    assert settings.connector_pods.image == "ghcr.io/fabmesh/fabmesh:0.1.0"  # images still come from image.*


def _containers(rendered: dict[tuple[str, str], Obj]) -> dict[str, tuple[Obj, Obj]]:
    """"<workload>/<container>" -> (the Pod spec, the container), for every workload the chart renders."""
    found = {}
    for (kind, name), obj in rendered.items():
        if kind in ("Deployment", "DaemonSet"):
            spec = obj["spec"]["template"]["spec"]
            found.update({f"{name}/{c['name']}": (spec, c) for c in spec["containers"]})
    return found


def test_every_container_is_locked_down_and_has_requests_and_limits(rendered: dict[tuple[str, str], Obj]) -> None:
    containers = _containers(rendered)
    # agents and connectors: Pods the operator creates
    assert set(containers) == {"fabmesh-operator/operator", "fabmesh-cloud-agent/cloud-agent"}
    for where, (spec, c) in containers.items():
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        context = c["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, where
        assert context["readOnlyRootFilesystem"] is True, where
        assert context["capabilities"]["drop"] == ["ALL"], where
        assert set(context["capabilities"].get("add", [])) <= {"NET_ADMIN", "NET_RAW", "NET_BIND_SERVICE"}, where
        assert "privileged" not in context, where
        resources = c["resources"]
        assert set(resources["requests"]) == {"cpu", "memory"} == set(resources["limits"]), where
    operator_spec, operator = containers["fabmesh-operator/operator"]
    assert operator_spec["securityContext"]["runAsNonRoot"] is True
    assert "add" not in operator["securityContext"]["capabilities"]


def test_resources_follow_the_values(helm: Helm) -> None:
    values = {"operator": {"resources": {"limits": {"memory": "2Gi"}},
                           "settings": {"connector_pods": {"resources": {"requests": {"cpu": "1"}},
                                                           "strongswan_resources": {}}}}}
    objects = {(o["kind"], o["metadata"]["name"]): o for o in render_chart(helm.binary, "fm-render", values)}
    containers = _containers(objects)
    assert containers["fabmesh-operator/operator"][1]["resources"]["limits"] == {"memory": "2Gi", "cpu": "1"}
    settings = settings_of(objects)
    assert settings.connector_pods.resources.requests == {"cpu": "1", "memory": "128Mi"}
    assert settings.connector_pods.resources.limits == {"cpu": "1", "memory": "512Mi"}


def test_agent_pod_resources_and_proposals_reach_the_operator_settings(helm: Helm) -> None:
    values = {"operator": {"settings": {"agent_pods": {"resources": {"limits": {"memory": "1Gi"}}},
                                        "tunnel": {"esp_proposals": ["chacha20poly1305-x25519"]}}}}
    objects = {(o["kind"], o["metadata"]["name"]): o for o in render_chart(helm.binary, "fm-render", values)}
    settings = settings_of(objects)
    assert settings.agent_pods.resources.limits == {"cpu": "500m", "memory": "1Gi"}
    assert settings.tunnel.esp_proposals == ("chacha20poly1305-x25519",)


# -- helm install into the real API server ---------------------------------------------------------

def remove_unowned_copies(admin: Kube, objects: list[Obj], namespace: str) -> None:
    """Objects outside the release namespace (ClusterRole, the events Role in default) may have been
    applied by another test from ``helm template``; helm refuses to adopt what another release or no
    release owns, so drop those copies first."""
    for obj in objects:
        if obj["metadata"].get("namespace") == namespace:
            continue
        try:
            current = admin._call("GET", object_path(obj))
        except ApiError as exc:
            if exc.not_found:
                continue
            raise
        if (current["metadata"].get("annotations") or {}).get(HELM_OWNER) != namespace:
            admin._call("DELETE", object_path(obj))


@pytest.fixture(scope="module")
def installed(helm: Helm, admin: Kube) -> Iterator[tuple[str, list[Obj], str]]:
    """(namespace, the rendered objects, helm's install output); uninstalled at the end."""
    namespace = f"fm-chart-{uuid.uuid4().hex[:6]}"
    objects = render_chart(helm.binary, namespace)
    remove_unowned_copies(admin, objects, namespace)
    result = helm.cluster("install", RELEASE, str(CHART), "-n", namespace, "--create-namespace", "--wait=false")
    assert result.returncode == 0, result.stdout + result.stderr
    try:
        yield namespace, objects, result.stdout
    finally:
        # No kubelet here would ever run the pre-delete Job (test_uninstall_hook_... checks what it renders).
        gone = helm.cluster("uninstall", RELEASE, "-n", namespace, "--no-hooks")
        assert gone.returncode == 0, gone.stdout + gone.stderr


def test_helm_install_creates_every_rendered_object_in_the_api(
        installed: tuple[str, list[Obj], str], admin: Kube) -> None:
    namespace, objects, _ = installed
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding"} <= kinds
    # The only DaemonSet is the route agent's (no connector DaemonSet: see above).
    assert [o["metadata"]["name"] for o in objects if o["kind"] == "DaemonSet"] == ["fabmesh-cloud-agent"]
    for obj in objects:
        live = admin._call("GET", object_path(obj))
        assert live["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm", object_path(obj)
        assert live["metadata"]["annotations"][HELM_OWNER] == namespace, object_path(obj)
    daemonsets = admin._call("GET", _COLLECTION["DaemonSet"].format(ns=namespace))["items"]
    assert [d["metadata"]["name"] for d in daemonsets] == ["fabmesh-cloud-agent"]


def test_install_notes_tell_the_next_steps(installed: tuple[str, list[Obj], str]) -> None:
    namespace, _, output = installed
    for step in ("kubectl label node <edge-node> node-role.kubernetes.io/edge=",
                 "kubectl label node <cloud-node> node-restriction.kubernetes.io/fabmesh-connector=",
                 "community.fabmesh.io/<name>=", "kubectl fabmesh doctor", "kubectl fabmesh status",
                 f"kubectl -n {namespace} get cm -l app.kubernetes.io/managed-by=fabmesh"):
        assert step in output, output


def test_uninstall_hook_runs_the_uninstall_as_its_own_locked_down_account(helm: Helm) -> None:
    hooks = {(o["kind"], o["metadata"]["name"]): o for o in render_chart(helm.binary, "fm-render", hooks=True)
             if "helm.sh/hook" in (o["metadata"].get("annotations") or {})}
    assert set(hooks) == {(k, "fabmesh-release") for k in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding",
                                                           "Role", "RoleBinding", "Job")} | {
        ("ConfigMap", "fabmesh-release-settings")}
    for obj in hooks.values():  # before Helm deletes the operator (it fences it); deleted once it has succeeded
        annotations = obj["metadata"]["annotations"]
        assert annotations["helm.sh/hook"] == "pre-delete"
        assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
    spec = hooks[("Job", "fabmesh-release")]["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "fabmesh-release" and spec["restartPolicy"] == "Never"
    (release,) = spec["containers"]
    args = build_parser().parse_args(release["args"])
    assert (args.command, args.uninstall, str(args.config)) == ("operator", True, "/etc/fabmesh/operator.yaml")
    assert (args.node_timeout, args.operator_deployment) == (120.0, "fabmesh-operator")
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert release["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                          "capabilities": {"drop": ["ALL"]}}
    assert set(release["resources"]["requests"]) == {"cpu", "memory"} == set(release["resources"]["limits"])
    settings = OperatorSettings.model_validate(yaml.safe_load(
        hooks[("ConfigMap", "fabmesh-release-settings")]["data"]["operator.yaml"]))
    assert settings.namespace == "fm-render"
    quick = render_chart(helm.binary, "fm-render", {"operator": {"uninstallNodeTimeoutSeconds": 30}}, hooks=True)
    (job,) = [o for o in quick if o["kind"] == "Job"]
    assert build_parser().parse_args(job["spec"]["template"]["spec"]["containers"][0]["args"]).node_timeout == 30
    off = render_chart(helm.binary, "fm-render", {"operator": {"releaseOnUninstall": False}}, hooks=True)
    assert not [o for o in off if "helm.sh/hook" in (o["metadata"].get("annotations") or {})]


# (id, ServiceAccount, verb, API group, resource, namespace: "own" = the release's, None = cluster-wide, allowed)
RBAC_MATRIX = [
    ("operator-lists-nodes", "fabmesh-operator", "list", "", "nodes", None, True),
    ("operator-watches-nodes", "fabmesh-operator", "watch", "", "nodes", None, True),
    ("operator-patches-nodes", "fabmesh-operator", "patch", "", "nodes", None, True),
    ("operator-creates-configmaps", "fabmesh-operator", "create", "", "configmaps", "own", True),
    ("operator-updates-configmaps", "fabmesh-operator", "update", "", "configmaps", "own", True),
    ("operator-deletes-configmaps", "fabmesh-operator", "delete", "", "configmaps", "own", True),
    ("operator-creates-secrets", "fabmesh-operator", "create", "", "secrets", "own", True),
    ("operator-updates-secrets", "fabmesh-operator", "update", "", "secrets", "own", True),
    ("operator-deletes-secrets", "fabmesh-operator", "delete", "", "secrets", "own", True),
    ("operator-creates-pods", "fabmesh-operator", "create", "", "pods", "own", True),
    ("operator-lists-pods", "fabmesh-operator", "list", "", "pods", "own", True),
    ("operator-deletes-pods", "fabmesh-operator", "delete", "", "pods", "own", True),
    ("operator-gets-lease", "fabmesh-operator", "get", "coordination.k8s.io", "leases", "own", True),
    ("operator-creates-lease", "fabmesh-operator", "create", "coordination.k8s.io", "leases", "own", True),
    ("operator-updates-lease", "fabmesh-operator", "update", "coordination.k8s.io", "leases", "own", True),
    ("operator-creates-events-in-default", "fabmesh-operator", "create", "", "events", "default", True),
    ("operator-cannot-get-kube-system-secrets", "fabmesh-operator", "get", "", "secrets", "kube-system", False),
    ("operator-cannot-delete-nodes", "fabmesh-operator", "delete", "", "nodes", None, False),
    ("operator-cannot-create-clusterroles", "fabmesh-operator", "create", "rbac.authorization.k8s.io",
     "clusterroles", None, False),
    ("operator-cannot-list-secrets-cluster-wide", "fabmesh-operator", "list", "", "secrets", None, False),
    ("operator-cannot-create-pods-in-default", "fabmesh-operator", "create", "", "pods", "default", False),
    ("operator-cannot-update-pods", "fabmesh-operator", "update", "", "pods", "own", False),
    # Each node's identity (fabmesh-node-<node>, its Role and RoleBinding, its TunnelStatus): the operator
    # holds what those Roles grant (tunnelstatuses/status) instead of "escalate" or "bind".
    ("operator-creates-serviceaccounts", "fabmesh-operator", "create", "", "serviceaccounts", "own", True),
    ("operator-creates-roles", "fabmesh-operator", "create", "rbac.authorization.k8s.io", "roles", "own", True),
    ("operator-creates-rolebindings", "fabmesh-operator", "create", "rbac.authorization.k8s.io", "rolebindings",
     "own", True),
    ("operator-creates-tunnelstatuses", "fabmesh-operator", "create", "fabmesh.io", "tunnelstatuses", "own", True),
    ("operator-patches-tunnelstatus-status", "fabmesh-operator", "patch", "fabmesh.io", "tunnelstatuses/status",
     "own", True),
    ("operator-cannot-escalate-roles", "fabmesh-operator", "escalate", "rbac.authorization.k8s.io", "roles", "own",
     False),
    ("operator-cannot-bind-roles", "fabmesh-operator", "bind", "rbac.authorization.k8s.io", "roles", "own", False),
    ("operator-cannot-mint-tokens", "fabmesh-operator", "create", "", "serviceaccounts/token", "own", False),
    ("operator-cannot-create-roles-in-default", "fabmesh-operator", "create", "rbac.authorization.k8s.io", "roles",
     "default", False),
    # Agent and connector Pods run as the namespace's "default" account (no token mounted): it may do nothing.
    ("node-pods-cannot-get-configmaps", "default", "get", "", "configmaps", "own", False),
    ("node-pods-cannot-get-secrets", "default", "get", "", "secrets", "own", False),
    ("node-pods-cannot-list-nodes", "default", "list", "", "nodes", None, False),
    ("node-pods-cannot-create-events", "default", "create", "", "events", "default", False),
]


def may(admin: Kube, namespace: str, account: str, verb: str, group: str, resource: str,
        where: str | None) -> bool:
    """The API server's own answer (SubjectAccessReview) for that ServiceAccount, with its groups."""
    resource, _, subresource = resource.partition("/")
    attributes = {"verb": verb, "group": group, "resource": resource, "subresource": subresource}
    if where is not None:
        attributes["namespace"] = namespace if where == "own" else where
    review = admin._call("POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", {
        "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
        "spec": {"user": f"system:serviceaccount:{namespace}:{account}",
                 "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"],
                 "resourceAttributes": attributes}})
    return bool(review["status"].get("allowed"))


@pytest.mark.parametrize(("account", "verb", "group", "resource", "where", "expected"),
                         [pytest.param(*case[1:], id=case[0]) for case in RBAC_MATRIX])
def test_installed_rbac_is_least_privilege(installed: tuple[str, list[Obj], str], admin: Kube, account: str,
                                           verb: str, group: str, resource: str, where: str | None,
                                           expected: bool) -> None:
    assert may(admin, installed[0], account, verb, group, resource, where) is expected


# The uninstall hook's account, applied as helm applies it at pre-delete: (id, verb, group, resource, namespace,
# object name, allowed). It deletes by label (deletecollection) and never reads a Secret or a ConfigMap.
RELEASE_RBAC = [
    ("release-lists-nodes", "list", "", "nodes", None, None, True),
    ("release-patches-nodes", "patch", "", "nodes", None, None, True),
    ("release-gets-the-operator-lease", "get", "coordination.k8s.io", "leases", "own", "fabmesh-operator", True),
    ("release-deletes-the-operator-lease", "delete", "coordination.k8s.io", "leases", "own", "fabmesh-operator",
     True),
    ("release-cannot-delete-another-lease", "delete", "coordination.k8s.io", "leases", "own", "other", False),
    ("release-cannot-get-another-lease", "get", "coordination.k8s.io", "leases", "own", "other", False),
    ("release-cannot-update-the-lease", "update", "coordination.k8s.io", "leases", "own", "fabmesh-operator", False),
    ("release-cannot-update-nodes", "update", "", "nodes", None, None, False),
    ("release-cannot-delete-nodes", "delete", "", "nodes", None, None, False),
    ("release-cannot-get-secrets", "get", "", "secrets", "own", None, False),
    ("release-cannot-list-secrets", "list", "", "secrets", "own", None, False),
    ("release-cannot-list-configmaps", "list", "", "configmaps", "own", None, False),
    ("release-cannot-get-configmaps", "get", "", "configmaps", "own", None, False),
    ("release-deletes-secrets-by-label", "deletecollection", "", "secrets", "own", None, True),
    ("release-deletes-configmaps-by-label", "deletecollection", "", "configmaps", "own", None, True),
    ("release-deletes-accounts-by-label", "deletecollection", "", "serviceaccounts", "own", None, True),
    ("release-deletes-roles-by-label", "deletecollection", "rbac.authorization.k8s.io", "roles", "own", None, True),
    ("release-deletes-bindings-by-label", "deletecollection", "rbac.authorization.k8s.io", "rolebindings", "own",
     None, True),
    ("release-cannot-create-roles", "create", "rbac.authorization.k8s.io", "roles", "own", None, False),
    ("release-cannot-bind", "create", "rbac.authorization.k8s.io", "rolebindings", "own", None, False),
    ("release-cannot-delete-secrets-elsewhere", "deletecollection", "", "secrets", None, None, False),
    ("release-annotates-pods", "patch", "", "pods", "own", None, True),
    ("release-lists-pods", "list", "", "pods", "own", None, True),
    ("release-deletes-pods-by-label", "deletecollection", "", "pods", "own", None, True),
    ("release-cannot-create-pods", "create", "", "pods", "own", None, False),
    ("release-cannot-exec-into-pods", "create", "", "pods/exec", "own", None, False),
    ("release-reads-tunnel-statuses", "list", "fabmesh.io", "tunnelstatuses", "own", None, True),
    ("release-deletes-tunnel-statuses", "deletecollection", "fabmesh.io", "tunnelstatuses", "own", None, True),
    ("release-cannot-write-tunnel-status", "patch", "fabmesh.io", "tunnelstatuses/status", "own", None, False),
    ("release-scales-the-operator", "patch", "apps", "deployments/scale", "own", "fabmesh-operator", True),
    ("release-cannot-scale-another-deployment", "patch", "apps", "deployments/scale", "own", "other", False),
    ("release-cannot-patch-the-operator", "patch", "apps", "deployments", "own", "fabmesh-operator", False),
    ("release-cannot-delete-the-operator", "delete", "apps", "deployments", "own", "fabmesh-operator", False),
]


@pytest.fixture(scope="module")
def release_hook_namespace(control_plane: ControlPlane, admin: Kube) -> str:
    namespace = f"fm-hook-{uuid.uuid4().hex[:6]}"
    install_release_hook_rbac(control_plane, admin, namespace)
    return namespace


@pytest.mark.parametrize(("verb", "group", "resource", "where", "name", "expected"),
                         [pytest.param(*case[1:], id=case[0]) for case in RELEASE_RBAC])
def test_uninstall_hook_rbac_is_least_privilege(release_hook_namespace: str, admin: Kube, verb: str, group: str,
                                                resource: str, where: str | None, name: str | None,
                                                expected: bool) -> None:
    resource, _, subresource = resource.partition("/")
    attributes = {"verb": verb, "group": group, "resource": resource, "subresource": subresource,
                  **({"name": name} if name else {})}
    if where is not None:
        attributes["namespace"] = release_hook_namespace
    review = admin._call("POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", {
        "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
        "spec": {"user": f"system:serviceaccount:{release_hook_namespace}:fabmesh-release",
                 "groups": ["system:serviceaccounts", f"system:serviceaccounts:{release_hook_namespace}",
                            "system:authenticated"],
                 "resourceAttributes": attributes}})
    assert bool(review["status"].get("allowed")) is expected
