"""The operator takes its flannel annotations back before an edge Node goes (real kube-apiserver, chart RBAC).

What flanneld's informer would see is recorded with a watch on the Node, as flanneld's own informer
watches it: the DELETED event must carry no ``kube-subnet-manager`` marker, or flanneld on every cloud
node would remove the connector's shared FDB entry (see fabmesh/operator/flannel.py).
"""

from __future__ import annotations

import subprocess
import sys
import threading
from typing import Any

from kubernetes import client, watch

from fabmesh.mesh.names import FLANNEL_COPY_ANNOTATION, FLANNEL_FINALIZER
from fabmesh.testenv.cluster import install_release_hook_rbac
from fabmesh.testenv.controlplane import ControlPlane
from fabmesh.testenv.hosts import stop_pid, wait_for
from tests.api.conftest import OperatorEnv
from tests.api.operator_helpers import EDGE, FLANNEL, cloud_nodes, create_nodes, edge, nodes, wait_converged

MARKER = "flannel.alpha.coreos.com/kube-subnet-manager"
COPIED = (*FLANNEL, MARKER, FLANNEL_COPY_ANNOTATION)


class NodeEvents:
    """Every watch event of one Node, in order, as an informer receives them."""

    def __init__(self, env: OperatorEnv, name: str) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.error: Exception | None = None
        self._watch = watch.Watch()
        core = client.CoreV1Api(env.kube.api)
        rv = env.kube.get("nodes", name)["metadata"]["resourceVersion"]
        threading.Thread(target=self._run, args=(core, name, rv), daemon=True, name=f"watch-{name}").start()

    def _run(self, core: client.CoreV1Api, name: str, rv: str) -> None:
        try:
            for event in self._watch.stream(core.list_node, field_selector=f"metadata.name={name}",
                                            resource_version=rv, deserialize=False, timeout_seconds=300,
                                            _request_timeout=(5, 320)):
                self.events.append((event["type"], event["object"]))
        except Exception as exc:  # noted, not raised: the stream ends when the API server stops
            self.error = exc

    def stop(self) -> None:
        self._watch.stop()


def _held(node: dict[str, Any]) -> bool:
    meta = node["metadata"]
    return FLANNEL_FINALIZER in (meta.get("finalizers") or ()) and all(k in meta["annotations"] for k in COPIED)


def test_why_two_writes_the_api_server_deletes_a_node_as_stored_when_its_last_finalizer_goes(
        operator_env: OperatorEnv) -> None:
    """The premise of the release order: stripping the marker in the write that removes the last finalizer
    is never stored, and the DELETED event (what flanneld's DeleteFunc reads) still carries the marker."""
    env = operator_env
    create_nodes(env.kube, [edge("e9", "192.0.2.9", annotations={**FLANNEL, MARKER: "true"})])
    env.kube.merge_patch("nodes", "e9", {"metadata": {"finalizers": ["example.com/hold"]}})
    recorded = NodeEvents(env, "e9")
    env.kube.delete("nodes", "e9")
    env.kube.merge_patch("nodes", "e9", {"metadata": {"finalizers": None, "annotations": {MARKER: None}}})
    wait_for(lambda: recorded.events and recorded.events[-1][0] == "DELETED", timeout=10, what="the DELETED event")
    recorded.stop()
    assert recorded.events[-1][1]["metadata"]["annotations"].get(MARKER) == "true"


def test_deleting_an_edge_waits_for_the_operator_which_strips_the_marker_before_the_node_goes(
        operator_env: OperatorEnv) -> None:
    env = operator_env
    create_nodes(env.kube, [*cloud_nodes(), edge("e1", "192.0.2.1"), edge("e2", "192.0.2.2")])
    operator = env.start()
    wait_converged(env, {"e1", "e2"})
    wait_for(lambda: all(_held(nodes(env)[n]) for n in ("e1", "e2")), timeout=30,
             what="the finalizer and the copied keys on both edges")

    # Operator down: the deletion waits; the Node stays, marked, as flanneld last saw it.
    stop_pid(operator.pid)
    recorded = NodeEvents(env, "e1")
    env.kube.delete("nodes", "e1")
    pending = env.kube.get("nodes", "e1")
    assert pending is not None and pending["metadata"].get("deletionTimestamp") and _held(pending)

    env.start("op-2")
    wait_for(lambda: env.kube.get("nodes", "e1") is None, timeout=60, what="e1 to go once the operator runs")
    wait_for(lambda: recorded.events and recorded.events[-1][0] == "DELETED", timeout=10, what="the DELETED event")
    recorded.stop()
    kinds = [kind for kind, _ in recorded.events]
    final = recorded.events[-1][1]["metadata"]
    # What flanneld's DeleteFunc reads: no marker (so no lease removal) and none of the copied keys.
    assert not set(COPIED) & set(final.get("annotations") or {}), final.get("annotations")
    # Two writes: one stripped the marker while the finalizer held the Node; only then did the finalizer go.
    stripped = [o["metadata"] for kind, o in recorded.events if kind == "MODIFIED"
                and MARKER not in (o["metadata"].get("annotations") or {})]
    assert stripped and FLANNEL_FINALIZER in stripped[0].get("finalizers", ()), kinds
    # The other edge is untouched.
    assert _held(nodes(env)["e2"])


def test_an_edge_turned_cloud_node_keeps_what_its_own_flanneld_wrote(operator_env: OperatorEnv) -> None:
    env = operator_env
    create_nodes(env.kube, [*cloud_nodes(), edge("e1", "192.0.2.1"), edge("e2", "192.0.2.2")])
    env.start()
    wait_converged(env, {"e1", "e2"})
    wait_for(lambda: all(_held(nodes(env)[n]) for n in ("e1", "e2")), timeout=30, what="both edges held")
    own = {**FLANNEL, "flannel.alpha.coreos.com/public-ip": "192.0.2.1",
           "flannel.alpha.coreos.com/backend-data": '{"VNI":1,"VtepMAC":"0a:58:0a:f4:01:01"}'}
    # e1 becomes a cloud node: the label goes and its own flanneld writes its own VTEP in the same moment.
    env.kube.merge_patch("nodes", "e1", {"metadata": {"labels": {EDGE: None}, "annotations": own}})
    # e2 just stops being an edge: everything fabmesh copied goes, the Node stays.
    env.kube.merge_patch("nodes", "e2", {"metadata": {"labels": {EDGE: None}}})

    def released(name: str) -> bool:
        meta = nodes(env)[name]["metadata"]
        return FLANNEL_FINALIZER not in (meta.get("finalizers") or ())
    wait_for(lambda: released("e1") and released("e2"), timeout=60, what="the finalizers to go")
    e1, e2 = (nodes(env)[n]["metadata"]["annotations"] for n in ("e1", "e2"))
    assert {k: e1.get(k) for k in (*own, MARKER)} == {**own, MARKER: "true"}
    assert FLANNEL_COPY_ANNOTATION not in e1
    assert not set(COPIED) & set(e2), e2


def test_release_for_an_uninstall_frees_every_node_once_the_operator_is_gone(
        operator_env: OperatorEnv, control_plane: ControlPlane) -> None:
    """Run as the chart's post-delete hook runs it: with that hook's own ServiceAccount and RBAC."""
    env = operator_env
    hook = install_release_hook_rbac(control_plane, env.kube, env.namespace)
    create_nodes(env.kube, [*cloud_nodes(), edge("e1", "192.0.2.1"), edge("e2", "192.0.2.2")])
    operator = env.start()
    wait_converged(env, {"e1", "e2"})
    wait_for(lambda: all(_held(nodes(env)[n]) for n in ("e1", "e2")), timeout=30, what="both edges held")
    stop_pid(operator.pid)  # its Lease is still fresh: the release waits for it to lapse
    done = subprocess.run([sys.executable, "-m", "fabmesh.cli", "operator", "--release", "--kubeconfig",
                           str(hook), "--config", str(env.settings_file), "--release-wait", "60"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for name in ("e1", "e2"):
        meta = nodes(env)[name]["metadata"]
        assert not meta.get("finalizers") and not set(COPIED) & set(meta["annotations"]), meta
    env.kube.delete("nodes", "e1")  # nothing holds it any more
    wait_for(lambda: env.kube.get("nodes", "e1") is None, timeout=10, what="e1 to go without an operator")
