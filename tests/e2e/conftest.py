"""e2e fixtures: one whole lab (control plane, operator, charons, connector, agents, pods) per module.

The lab is ``ALL_EDGE_KINDS``: the default one plus edge-4 alone behind a cone NAT of its own, so a
cross-site cone pair can be made by relabelling (hole punching, ``tests/e2e/test_nat.py``), and
edge-5 with a public address and no NAT, in community b with edge-2."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fabmesh.lab import bringup, probe, teardown
from fabmesh.lab.state import LabState
from fabmesh.lab.topology import ALL_EDGE_KINDS
from tests.conftest import require_root_tools


@pytest.fixture(scope="module")
def running_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabState]:
    require_root_tools("ip", "iptables-restore", "ipset", "/usr/lib/ipsec/charon", "/usr/lib/cni/bridge",
                       "nsenter", "socat", "curl")  # the last three: flanneld and its API relay
    directory: Path = tmp_path_factory.mktemp("lab")
    try:
        state = bringup.up(ALL_EDGE_KINDS, directory, timeout=90)
        report = probe.check(state, wait=60)
        assert all(p["ok"] for p in report["pairs"]), [p for p in report["pairs"] if not p["ok"]]
        yield state
    finally:
        teardown.down(directory)
