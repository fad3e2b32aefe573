"""``fabmesh operator --uninstall`` (the chart's pre-delete hook) against a real kube-apiserver, as its own account.

No kubelet runs here: a node's answer is written by the test, as the agent writes it (the token from its
Pod's annotation into its TunnelStatus ``status.teardown``); the real answer on real nodes is
tests/nodes/test_helm_install.py's uninstall test. Pods with a ``nodeName`` are only marked for deletion
here (no kubelet confirms it), so "gone" for a Pod means "being deleted".
"""

from __future__ import annotations

import subprocess
import sys

from fabmesh.mesh.names import FLANNEL_FINALIZER, MANAGED_SELECTOR, POD_CIDR_ANNOTATION, TEARDOWN_ANNOTATION
from fabmesh.mesh.tunnelstatus import PLURAL
from fabmesh.operator.objects import agent_pod_name, connector_pod_name
from fabmesh.testenv.cluster import install_release_hook_rbac
from fabmesh.testenv.controlplane import ControlPlane
from fabmesh.testenv.hosts import stop_pid, wait_for
from tests.api.conftest import OperatorEnv
from tests.api.operator_helpers import cloud_nodes, create_nodes, edge, nodes, wait_converged

OPERATOR_DEPLOYMENT = {
    "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "fabmesh-operator"},
    "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "fm-op"}},
             "template": {"metadata": {"labels": {"app": "fm-op"}},
                          "spec": {"containers": [{"name": "operator", "image": "fabmesh:never-run"}]}}}}
KINDS = ("configmaps", "secrets", "serviceaccounts", "roles", "rolebindings", PLURAL)


def _names(env: OperatorEnv, kind: str) -> list[str]:
    return sorted(o["metadata"]["name"] for o in env.kube.list(kind, env.namespace, MANAGED_SELECTOR))


def test_uninstall_hook_fences_the_operator_waits_for_the_nodes_that_answer_and_deletes_everything(
        operator_env: OperatorEnv, control_plane: ControlPlane) -> None:
    env = operator_env
    hook = install_release_hook_rbac(control_plane, env.kube, env.namespace)
    env.kube._call("POST", f"/apis/apps/v1/namespaces/{env.namespace}/deployments", OPERATOR_DEPLOYMENT)
    create_nodes(env.kube, [*cloud_nodes(), edge("e1", "192.0.2.1"), edge("e2", "192.0.2.2")])
    operator = env.start()
    wait_converged(env, {"e1", "e2"})
    wait_for(lambda: env.kube.get(PLURAL, "e1", env.namespace) and _names(env, "pods"), timeout=30,
             what="the operator's TunnelStatus objects and Pods")
    before = {kind: _names(env, kind) for kind in KINDS}
    assert all(before.values()), before
    assert POD_CIDR_ANNOTATION in nodes(env)["e1"]["metadata"]["annotations"]
    assert FLANNEL_FINALIZER in nodes(env)["e1"]["metadata"]["finalizers"]
    stop_pid(operator.pid)  # as the scaled-down Deployment would; its Lease is still fresh
    # e1's and e2's agents run (as a kubelet would report it); the connector's never started: it cannot answer.
    for edge_name in ("e1", "e2"):
        env.kube.merge_patch("pods", agent_pod_name(edge_name), {"status": {"phase": "Running"}}, env.namespace,
                             sub="status")

    hook_run = subprocess.Popen([sys.executable, "-m", "fabmesh.cli", "operator", "--uninstall", "--kubeconfig",
                                 str(hook), "--config", str(env.settings_file), "--release-wait", "60",
                                 "--node-timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def asked(pod_name: str) -> str | None:
            pod = env.kube.get("pods", pod_name, env.namespace) or {}
            return (pod.get("metadata", {}).get("annotations") or {}).get(TEARDOWN_ANNOTATION)

        token = wait_for(lambda: asked(agent_pod_name("e1")), timeout=60, what="e1's agent Pod asked to tear down")
        assert asked(agent_pod_name("e2")) == token
        assert asked(connector_pod_name("connector-1")) is None  # Pending: nobody there to ask
        # e1 answers in its TunnelStatus; e2 as kubelet reports its agent's exit (its termination message).
        env.kube.merge_patch(PLURAL, "e1", {"status": {"role": "edge", "teardown": token}}, env.namespace,
                             sub="status")
        assert hook_run.poll() is None, "the hook must wait for e2's answer"
        env.kube.merge_patch("pods", agent_pod_name("e2"), {"status": {"containerStatuses": [{
            "name": "agent", "image": "fabmesh", "imageID": "", "ready": False, "restartCount": 1,
            "state": {"terminated": {"exitCode": 0, "reason": "Completed", "message": token}}}]}},
            env.namespace, sub="status")
        out, err = hook_run.communicate(timeout=120)
    finally:
        if hook_run.poll() is None:
            hook_run.kill()
    print(f"\n[observed] hook stdout:\n{out}\n[observed] hook stderr:\n{err}")
    assert hook_run.returncode == 0, err
    assert "node=e1 teardown done" in out and "node=e2 teardown done" in out
    assert "node=connector-1 NOT cleaned" in err and "fabmesh connector cleanup" in err

    deployment = env.kube._call("GET", f"/apis/apps/v1/namespaces/{env.namespace}/deployments/fabmesh-operator")
    assert deployment["spec"]["replicas"] == 0
    assert {kind: _names(env, kind) for kind in KINDS} == {kind: [] for kind in KINDS}
    pods = env.kube.list("pods", env.namespace, MANAGED_SELECTOR)
    assert pods and all(p["metadata"].get("deletionTimestamp") for p in pods)  # no kubelet to confirm
    assert env.kube.get("leases", env.settings.leader_election.lease_name, env.namespace) is None
    for name, obj in nodes(env).items():
        meta = obj["metadata"]
        assert FLANNEL_FINALIZER not in (meta.get("finalizers") or ()), name
        assert not [k for k in meta.get("annotations") or {} if k.startswith("fabmesh.io/")], (name, meta)
