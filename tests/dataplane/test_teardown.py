"""The test environment leaves the machine as it found it: no namespace, no daemon."""

from __future__ import annotations

from pathlib import Path

import pytest

from fabmesh.testenv.hosts import network, owned_namespaces

pytestmark = pytest.mark.dataplane


def test_network_teardown_removes_every_namespace_and_stops_every_charon(tmp_path: Path) -> None:
    with network(tmp_path, tag="fmt") as net:
        a, b = net.add_host("a"), net.add_host("b")
        a.add_pod("p", "10.10.1.2/24")
        pids = [a.start_charon().pid, b.start_charon().pid]
        prefix = net.prefix
        assert len(owned_namespaces(prefix)) == 4  # wan, a, b, a's pod
    assert owned_namespaces(prefix) == []
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or _zombie(pid), f"charon {pid} outlived its network"


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return True

