"""e2e fixtures: one whole lab (control plane, operator, charons, connector, agents, pods) per module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fabmesh.lab import bringup, probe, teardown
from fabmesh.lab.state import LabState
from fabmesh.lab.topology import DEFAULT, LabNat, LabNode, LabRole, NatType, Topology
from tests.conftest import require_root_tools

# The default lab plus one edge behind an endpoint-independent NAT of its own (site-3), in no
# community at first: relabelled into community a it makes a cone-NAT pair with edge-1 across two
# sites, which only hole punching connects directly (tests/e2e/test_nat.py).
E2E = Topology(nats=(*DEFAULT.nats, LabNat(name="site-3", type=NatType.MASQUERADE)),
               nodes=(*DEFAULT.nodes, LabNode(name="edge-4", role=LabRole.EDGE, nat="site-3")))


@pytest.fixture(scope="module")
def running_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabState]:
    require_root_tools("ip", "iptables-restore", "ipset", "/usr/lib/ipsec/charon", "/usr/lib/cni/bridge")
    directory: Path = tmp_path_factory.mktemp("lab")
    try:
        state = bringup.up(E2E, directory, timeout=90)
        report = probe.check(state, wait=60)
        assert all(p["ok"] for p in report["pairs"]), [p for p in report["pairs"] if not p["ok"]]
        yield state
    finally:
        teardown.down(directory)
