"""Data-plane fixtures: throwaway network namespaces, hosts on a WAN bridge, charons.

Every namespace carries a unique prefix and is deleted at teardown (tolerating
"already gone"); every daemon is stopped by PID. Nothing here touches the
machine's own interfaces, routes or iptables.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fabmesh.testenv.hosts import Network, network
from tests.conftest import require_root_tools

TOOLS = ("ip", "iptables-restore", "ipset", "/usr/lib/ipsec/charon")


@pytest.fixture(scope="session", autouse=True)
def _dataplane_tools() -> None:
    require_root_tools(*TOOLS)


@pytest.fixture
def netns() -> Iterator[str]:
    """One empty namespace with loopback up, deleted afterwards."""
    name = f"fmt{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def wan(tmp_path: Path) -> Iterator[Network]:
    """A WAN bridge; add hosts with ``wan.add_host(name)``; all torn down by PID and name."""
    with network(tmp_path / "net", tag="fmt") as net:
        yield net
