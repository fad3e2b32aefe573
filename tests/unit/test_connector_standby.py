"""A connector Pod on a standby node: it knows its node (``--node-name``) and loads nothing while
``mesh.yaml`` names the active connector."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from fabmesh.node.command import add_node_flags, options
from fabmesh.node.loop import NodeLoop
from tests.unit.test_plan import CONNECTOR, edge, run


def _parsed(*argv: str, edge: bool) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_node_flags(parser, edge=edge)
    return parser.parse_args(list(argv))


def test_only_the_connector_takes_a_node_name() -> None:
    assert options(_parsed("--node-name", "cloud-1", edge=False)).node_name == "cloud-1"
    assert options(_parsed(edge=False)).node_name is None
    with pytest.raises(SystemExit):
        _parsed("--node-name", "cloud-1", edge=True)


def _loop(tmp_path: Path, node_name: str) -> NodeLoop:
    result, _ = run(CONNECTOR, edge("e1", "192.0.2.1"))
    mesh = result.connector_mesh()
    assert mesh is not None and mesh.node.name == "conn"
    (tmp_path / "mesh").mkdir()
    (tmp_path / "mesh" / "mesh.yaml").write_text(mesh.to_yaml())
    (tmp_path / "tls").mkdir()  # empty: the standby never gets this far
    args = _parsed("--config-dir", str(tmp_path / "mesh"), "--tls-dir", str(tmp_path / "tls"),
                   "--vici-socket", str(tmp_path / "charon.vici"), "--state-dir", str(tmp_path / "state"),
                   "--metrics-port", "0", "--node-name", node_name, edge=False)
    return NodeLoop(options(args))


def test_a_standby_loads_nothing_and_is_healthy(tmp_path: Path) -> None:
    loop = _loop(tmp_path, "conn-standby")
    assert loop.run_pass() is True
    assert (loop.applier, loop.last_good, loop.standby_for) == (None, None, "conn")
    assert loop.metrics.config_errors._value.get() == 0  # it did not even try to read its Secret


def test_the_node_mesh_yaml_names_loads_its_config(tmp_path: Path) -> None:
    loop = _loop(tmp_path, "conn")
    assert loop.run_pass() is False  # it is active: it reads its Secret, which is missing here
    assert loop.metrics.config_errors._value.get() == 1 and loop.standby_for is None
