"""A routes step that fails part-way: the pass logs what it wrote and goes on to the next steps."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from fabmesh.mesh.dataplane import Route
from fabmesh.netlink.driver import RouteChanges, RouteFailure, RoutesNotApplied
from fabmesh.node import apply
from fabmesh.node.apply import ApplyReport, NodeApplier

pytestmark = pytest.mark.unit

GOOD = Route(dst="10.233.1.0/24", dev="wan0", table=2620)
BAD = Route(dst="10.233.2.0/24", dev="wan0", table=2620, src="10.244.0.0")


class FailingNetlink:
    """Writes the rule and one route, refuses the other, as the kernel does for a source on no interface."""

    writes = 0

    def __init__(self, _netns: Any) -> None:
        pass

    def __enter__(self) -> FailingNetlink:
        return self

    def __exit__(self, *_: object) -> None:
        pass

    def ensure_rule(self, _table: int, _priority: int) -> bool:
        return True

    def set_routes(self, table: int, _routes: Any) -> RouteChanges:
        raise RoutesNotApplied(table, [RouteFailure(BAD, "Invalid argument (errno 22)")], RouteChanges(added=(GOOD,)))


def test_a_route_the_kernel_refuses_is_reported_and_the_pass_goes_on(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(apply, "Netlink", FailingNetlink)
    applier = NodeApplier("edge-1", tmp_path / "vici", tmp_path / "state", None)
    report = ApplyReport()
    state: Any = SimpleNamespace(route_table=2620, routes=(GOOD, BAD))
    with caplog.at_level(logging.INFO):
        applier._step(report, "routes", lambda: applier._routes(state))
        applier._step(report, "next", lambda: ["action=next"])
    assert report.changes == ["action=add-rule table=2620 priority=100", f"action=add-route {GOOD.key()}",
                              "action=next"]
    assert len(report.errors) == 1 and "10.233.2.0/24" in report.errors[0]
