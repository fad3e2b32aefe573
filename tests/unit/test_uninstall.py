"""What an uninstall removes and whom it waits for (pure): ``fabmesh/operator/uninstall_plan.py`` and
``fabmesh/node/teardown.py``, plus how the Pods see the request and report the answer."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from fabmesh.agent.command import register as register_agent
from fabmesh.connector.command import register as register_connector
from fabmesh.mesh.model import NodeSettings
from fabmesh.mesh.names import (
    FLANNEL_COPY_ANNOTATION,
    POD_ANNOTATIONS_FILE,
    POD_CIDR_ANNOTATION,
    STATUS_ANNOTATION,
    TEARDOWN_ANNOTATION,
)
from fabmesh.mesh.tunnelstatus import NodeReport, parse_report
from fabmesh.node.command import options
from fabmesh.node.teardown import TeardownPlan, plan_teardown, requested
from fabmesh.operator.objects import agent_pod, connector_pod
from fabmesh.operator.settings import OperatorSettings
from fabmesh.operator.uninstall_plan import (
    DELETE_ORDER,
    Targets,
    annotation_strip,
    answered,
    teardown_targets,
    waiting,
)


def _pod(name: str, kind: str = "agent", node: str | None = "edge-1", phase: str | None = "Running",
         deleting: bool = False, managed: bool = True) -> dict[str, Any]:
    labels = {"fabmesh.io/kind": kind, **({"app.kubernetes.io/managed-by": "fabmesh"} if managed else {})}
    meta: dict[str, Any] = {"name": name, "labels": labels}
    if deleting:
        meta["deletionTimestamp"] = "2026-12-02T02:00:00Z"
    return {"metadata": meta, "spec": {"nodeName": node} if node else {}, "status": {"phase": phase} if phase else {}}


@pytest.mark.parametrize(("pods", "asked", "unreachable"), [
    pytest.param([_pod("fabmesh-agent-edge-1")], {"edge-1": "fabmesh-agent-edge-1"}, {}, id="running-agent-asked"),
    pytest.param([_pod("fabmesh-connector-c1", "connector", "c1")], {"c1": "fabmesh-connector-c1"}, {},
                 id="running-connector-asked"),
    pytest.param([_pod("fabmesh-agent-edge-1", phase="Pending")], {},
                 {"edge-1": "Pod fabmesh-agent-edge-1 is Pending"}, id="pending-cannot-answer"),
    pytest.param([_pod("fabmesh-agent-edge-1", phase="Failed")], {},
                 {"edge-1": "Pod fabmesh-agent-edge-1 is Failed"}, id="failed-cannot-answer"),
    pytest.param([_pod("fabmesh-agent-edge-1", deleting=True)], {},
                 {"edge-1": "Pod fabmesh-agent-edge-1 is being deleted"}, id="terminating-cannot-answer"),
    pytest.param([_pod("fabmesh-agent-edge-1", node=None, phase="Pending")], {}, {},
                 id="never-scheduled-programmed-nothing"),
    pytest.param([_pod("fabmesh-operator-abc", "operator", "cloud-1")], {}, {}, id="operator-pod-not-a-node-loop"),
    pytest.param([_pod("someone-else", managed=False)], {}, {}, id="not-ours"),
])
def test_running_agent_and_connector_pods_are_asked_others_name_a_node_to_clean_by_hand(
        pods: list[dict[str, Any]], asked: dict[str, str], unreachable: dict[str, str]) -> None:
    assert teardown_targets(pods) == Targets(asked=asked, unreachable=unreachable)


def _status(node: str, teardown: str | None) -> dict[str, Any]:
    return {"metadata": {"name": node}, "status": {"role": "edge", **({"teardown": teardown} if teardown else {})}}


def test_only_a_report_of_this_uninstalls_token_counts_as_an_answer() -> None:
    targets = Targets(asked={"a": "pa", "b": "pb", "c": "pc"}, unreachable={})
    statuses = [_status("a", "tok"), _status("b", "an-older-uninstall"), _status("c", None),
                {"metadata": {"name": "d"}}]
    done = answered(statuses, [], "tok")
    assert done == {"a"}
    assert waiting(targets, done) == ["b", "c"]
    assert waiting(targets, answered([_status(n, "tok") for n in "abc"], [], "tok")) == []


def _exited(kind: str, node: str, where: str, code: int, message: str, container: str | None = None
            ) -> dict[str, Any]:
    pod = _pod(f"fabmesh-{kind}-{node}", kind, node)
    other = "running" if where == "lastState" else "waiting"
    pod["status"]["containerStatuses"] = [
        {"name": "strongswan", "state": {"running": {}}},
        {"name": container or kind, where: {"terminated": {"exitCode": code, "message": message}},
         **({"state": {other: {}}} if where == "lastState" else {})}]
    return pod


@pytest.mark.parametrize(("pod", "done"), [
    pytest.param(_exited("agent", "e1", "state", 0, "tok"), {"e1"}, id="agent-exited-with-the-token"),
    pytest.param(_exited("agent", "e1", "lastState", 0, "tok\n"), {"e1"}, id="restarted-since-last-state-counts"),
    pytest.param(_exited("connector", "c1", "state", 0, "tok"), {"c1"}, id="connector"),
    pytest.param(_exited("agent", "e1", "state", 1, "tok"), set(), id="failed-exit-is-no-answer"),
    pytest.param(_exited("agent", "e1", "state", 0, "older"), set(), id="another-uninstalls-token"),
    pytest.param(_exited("agent", "e1", "state", 0, "tok", container="strongswan"), set(),
                 id="only-the-node-loop-container-answers"),
])
def test_a_node_loop_that_exited_with_the_token_as_kubelet_reports_it_has_answered(
        pod: dict[str, Any], done: set[str]) -> None:
    """The edge's TunnelStatus may never arrive (its way to the API went with its tunnel): kubelet's report does."""
    assert answered([], [pod], "tok") == done


def test_pods_go_before_their_config_and_identities_and_every_operator_kind_is_deleted() -> None:
    assert DELETE_ORDER[0] == "pods"
    assert DELETE_ORDER.index("secrets") < DELETE_ORDER.index("serviceaccounts")
    assert set(DELETE_ORDER) == {"pods", "configmaps", "secrets", "tunnelstatuses", "rolebindings", "roles",
                                 "serviceaccounts"}


@pytest.mark.parametrize(("annotations", "patch"), [
    pytest.param({POD_CIDR_ANNOTATION: "10.233.0.0/24", STATUS_ANNOTATION: "cidr=...", "other.io/x": "1"},
                 {"metadata": {"annotations": {POD_CIDR_ANNOTATION: None, STATUS_ANNOTATION: None}}},
                 id="operator-annotations-only"),
    pytest.param({FLANNEL_COPY_ANNOTATION: "{}"}, {"metadata": {"annotations": {FLANNEL_COPY_ANNOTATION: None}}},
                 id="a-left-over-copy-record"),
    pytest.param({"flannel.alpha.coreos.com/public-ip": "1.2.3.4"}, None, id="flannels-own-keys-untouched"),
    pytest.param(None, None, id="no-annotations"),
])
def test_nodes_lose_the_operators_annotations_and_nothing_else(annotations: dict[str, str] | None,
                                                               patch: dict[str, Any] | None) -> None:
    assert annotation_strip({"metadata": {"name": "n", "annotations": annotations}}) == patch


@pytest.mark.parametrize(("text", "token"), [
    pytest.param('kubernetes.io/config.seen="2026"\nfabmesh.io/teardown="3f2a"\n', "3f2a", id="quoted"),
    pytest.param('fabmesh.io/spec-hash="abc"\n', None, id="absent"),
    pytest.param("", None, id="empty-file"),
    pytest.param('fabmesh.io/teardown=""\n', None, id="empty-value"),
    pytest.param('fabmesh.io/teardown-not="x"\n', None, id="another-key-with-the-prefix"),
    pytest.param('fabmesh.io/teardown="a\\"b"\n', 'a"b', id="go-escapes"),
])
def test_the_teardown_request_is_read_from_the_downward_api_file(text: str, token: str | None) -> None:
    assert requested(text) == token


@pytest.mark.parametrize(("edge", "cni_dir", "anchors", "plan"), [
    pytest.param(True, None, (), TeardownPlan(2620, "fabmesh0", "/etc/cni/net.d/10-fabmesh.conflist"), id="edge"),
    pytest.param(True, "/lab/cni/", (), TeardownPlan(2620, "fabmesh0", "/lab/cni/10-fabmesh.conflist"),
                 id="edge-cni-dir-override"),
    pytest.param(False, None, ("10.244.0.0/16", "10.244.0.0/16"), TeardownPlan(2620, None, None, ("10.244.0.0",)),
                 id="connector-no-bridge-no-cni-anchor-once"),
])
def test_the_teardown_plan_names_what_the_node_programmed(edge: bool, cni_dir: str | None,
                                                          anchors: tuple[str, ...], plan: TeardownPlan) -> None:
    assert plan_teardown(NodeSettings(), edge=edge, cni_conf_dir=cni_dir, anchor_subnets=anchors) == plan


def test_operator_pods_mount_their_own_annotations_and_pass_the_teardown_file() -> None:
    settings = OperatorSettings()
    for pod, register in ((agent_pod("edge-1", "uid", settings), register_agent),
                          (connector_pod("c1", "uid", "198.51.100.1", settings), register_connector)):
        spec = pod["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["pod-info"]["downwardAPI"]["items"] == [
            {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}}]
        main = spec["containers"][0]
        mount = next(m for m in main["volumeMounts"] if m["name"] == "pod-info")
        assert mount["readOnly"] is True and Path(POD_ANNOTATIONS_FILE).parent == Path(mount["mountPath"])
        parser = argparse.ArgumentParser()
        register(parser.add_subparsers(dest="command"), main["args"][0], "")
        args = parser.parse_args(main["args"])
        args.status_token_file = None  # no status target needed to check the option
        assert options(args).teardown_file == Path(POD_ANNOTATIONS_FILE)
        assert options(args).termination_log == Path("/dev/termination-log")
        assert main.get("terminationMessagePath", "/dev/termination-log") == "/dev/termination-log"


def test_the_teardown_token_is_reported_and_a_change_of_it_is_worth_a_write() -> None:
    running = NodeReport(role="edge")
    done = running.model_copy(update={"teardown": "3f2a"})
    assert running.key() != done.key()
    assert done.to_api()["teardown"] == "3f2a" and "teardown" not in running.to_api()
    parsed = parse_report({"status": done.to_api()})
    assert parsed is not None and parsed.teardown == "3f2a"
    assert TEARDOWN_ANNOTATION == "fabmesh.io/teardown"
