"""Make a test or lab cluster look like one the Helm chart was installed into, minus the images.

The chart is rendered with the real ``helm template``; the RBAC objects it
ships are applied to the real API server; a token for the operator's
ServiceAccount (TokenRequest) becomes a kubeconfig. The operator then runs as a
local process with exactly the rights it will have in production, not as admin.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from fabmesh.kube.client import ApiError, Kube
from fabmesh.testenv.controlplane import ControlPlane

CHART = Path(__file__).resolve().parents[2] / "charts" / "fabmesh"
RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
CRD_KIND = "CustomResourceDefinition"
_PLURAL = {"ServiceAccount": "serviceaccounts", "ClusterRole": "clusterroles",
           "ClusterRoleBinding": "clusterrolebindings", "Role": "roles", "RoleBinding": "rolebindings",
           "Namespace": "namespaces", CRD_KIND: "customresourcedefinitions"}
_RBAC_GROUP = "/apis/rbac.authorization.k8s.io/v1"


def render_chart(helm: Path, namespace: str, values: dict[str, Any] | None = None,
                 chart: Path = CHART, hooks: bool = False) -> list[dict[str, Any]]:
    """What ``helm install`` creates; with ``hooks``, also the hook objects (created only at their hook)."""
    cmd = [str(helm), "template", "fabmesh", str(chart), "--namespace", namespace]
    if not hooks:
        cmd.append("--no-hooks")
    if values:
        cmd += ["--values", "-"]
    out = subprocess.run(cmd, input=yaml.safe_dump(values or {}), capture_output=True, text=True, check=True)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def _url(kind: str, namespace: str | None, name: str | None = None) -> str:
    base = _RBAC_GROUP if kind.startswith(("Cluster", "Role")) else "/api/v1"
    if kind == CRD_KIND:
        base = "/apis/apiextensions.k8s.io/v1"
    path = base + (f"/namespaces/{namespace}" if namespace else "") + f"/{_PLURAL[kind]}"
    return path + (f"/{name}" if name else "")


def apply(kube: Kube, obj: dict[str, Any]) -> None:
    """Create, or replace when it exists (RBAC objects have no immutable fields that matter here)."""
    kind = obj["kind"]
    namespace = obj["metadata"].get("namespace") if not kind.startswith("Cluster") and kind != CRD_KIND else None
    try:
        kube._call("POST", _url(kind, namespace), obj)
    except ApiError as exc:
        if not exc.conflict:
            raise
        current = kube._call("GET", _url(kind, namespace, obj["metadata"]["name"]))
        obj = {**obj, "metadata": {**obj["metadata"], "resourceVersion": current["metadata"]["resourceVersion"]}}
        kube._call("PUT", _url(kind, namespace, obj["metadata"]["name"]), obj)


def wait_established(kube: Kube, name: str, timeout: float = 30.0) -> None:
    """Until the API server serves the CRD (its Established condition), as ``kubectl wait`` would."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        crd = kube._call("GET", _url(CRD_KIND, None, name))
        if any(c.get("type") == "Established" and c.get("status") == "True"
               for c in (crd.get("status") or {}).get("conditions") or []):
            return
        time.sleep(0.1)
    raise TimeoutError(f"CRD {name} not Established after {timeout}s")


def ensure_namespace(kube: Kube, name: str) -> None:
    try:
        kube.create("namespaces", {"metadata": {"name": name}})
    except ApiError as exc:
        if not exc.conflict:
            raise


def install_operator_rbac(cp: ControlPlane, kube: Kube, namespace: str) -> Path:
    """Apply the chart's RBAC for ``namespace`` and return a kubeconfig for the operator's SA."""
    assert cp.assets is not None
    ensure_namespace(kube, namespace)
    for obj in render_chart(cp.assets.helm, namespace):
        if obj["kind"] in (*RBAC_KINDS, CRD_KIND):
            apply(kube, obj)
        if obj["kind"] == CRD_KIND:
            wait_established(kube, obj["metadata"]["name"])
    return service_account_kubeconfig(cp, kube, namespace, "fabmesh-operator")


def install_release_hook_rbac(cp: ControlPlane, kube: Kube, namespace: str) -> Path:
    """Apply the RBAC of the chart's uninstall hook (``fabmesh operator --release``) and return its kubeconfig."""
    assert cp.assets is not None
    ensure_namespace(kube, namespace)
    for obj in render_chart(cp.assets.helm, namespace, hooks=True):
        if obj["kind"] in RBAC_KINDS and "helm.sh/hook" in (obj["metadata"].get("annotations") or {}):
            apply(kube, obj)
    return service_account_kubeconfig(cp, kube, namespace, "fabmesh-release")


def service_account_kubeconfig(cp: ControlPlane, kube: Kube, namespace: str, account: str) -> Path:
    token = kube._call("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token",
                       {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                        "spec": {"audiences": ["https://kubernetes.default.svc"],
                                 "expirationSeconds": 86400}})["status"]["token"]
    suffix = "" if account == "fabmesh-operator" else f"-{account}"
    return cp.kubeconfig_for_token(f"operator-{namespace}{suffix}", token, namespace)


def spawn_operator(kubeconfig: Path, settings: Path, identity: str, log_dir: Path,
                   health_port: int = 0, restart: bool = False) -> subprocess.Popen[bytes]:
    """The real operator entry point as its own process (stop it by PID).

    With ``restart`` it runs under :mod:`fabmesh.testenv.supervise`, which starts it again when it
    exits, as the kubelet does for the operator's Deployment (it exits on losing its Lease).

    Its writes carry field manager ``fabmesh-operator/<identity>``, so ``metadata.managedFields`` tells
    which replica wrote what; its health endpoint listens on 127.0.0.1:``health_port`` (0 = none, so
    that several replicas on one host do not fight over a port).
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"operator-{identity}.log", "ab") as log:
        supervisor = [sys.executable, "-m", "fabmesh.testenv.supervise", "--"] if restart else []
        return subprocess.Popen(
            [*supervisor, sys.executable, "-m", "fabmesh.cli", "operator", "--kubeconfig", str(kubeconfig),
             "--config", str(settings), "--identity", identity,
             "--field-manager", f"fabmesh-operator/{identity}",
             "--health-address", "127.0.0.1", "--health-port", str(health_port)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
