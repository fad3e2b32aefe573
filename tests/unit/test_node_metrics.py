"""The node loop's metrics: per-peer series follow mesh.yaml, a taken port is survived, one default port."""

from __future__ import annotations

import argparse
import errno
import logging
import socket

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fabmesh.mesh.ports import DEFAULT_METRICS_PORT
from fabmesh.node.command import add_node_flags, options
from fabmesh.node.metrics import Metrics, serve
from fabmesh.operator.objects import agent_pod
from fabmesh.operator.settings import AgentPods, OperatorSettings

UP = {"state": "ESTABLISHED", "child-sas": {"a-1": {"bytes-in": "100", "bytes-out": "40"}}}


def _peer_series(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) if f.name in ("fabmesh_tunnel_up", "fabmesh_tunnel_bytes")
            for s in f.samples}


def test_removed_peer_disappears_from_every_per_peer_series_and_the_others_stay() -> None:
    metrics = Metrics()
    metrics.export_peers(["conn", "edge-2"], {"conn": UP, "edge-2": UP})
    assert ("fabmesh_tunnel_up", (("peer", "edge-2"),)) in _peer_series(metrics)

    metrics.export_peers(["conn"], {"conn": UP, "edge-2": UP})  # charon may still hold the SA for a moment

    assert _peer_series(metrics) == {
        ("fabmesh_tunnel_up", (("peer", "conn"),)): 1.0,
        ("fabmesh_tunnel_bytes", (("direction", "in"), ("peer", "conn"))): 100.0,
        ("fabmesh_tunnel_bytes", (("direction", "out"), ("peer", "conn"))): 40.0,
    }


def test_peer_that_comes_back_is_exported_again_and_a_down_peer_reports_zero() -> None:
    metrics = Metrics()
    metrics.export_peers(["conn", "edge-2"], {})
    metrics.export_peers(["conn"], {})
    metrics.export_peers(["conn", "edge-2"], {"edge-2": UP})
    series = _peer_series(metrics)
    assert series[("fabmesh_tunnel_up", (("peer", "edge-2"),))] == 1.0
    assert series[("fabmesh_tunnel_up", (("peer", "conn"),))] == 0.0


def test_taken_port_is_one_logged_error_naming_address_port_and_errno_not_an_exception(
        caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with caplog.at_level(logging.ERROR, logger="fabmesh.node.metrics"):
            assert serve(Metrics().registry, "127.0.0.1", port) is False
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, errors
    assert f"address=127.0.0.1 port={port} errno={errno.errorcode[errno.EADDRINUSE]}" in errors[0]


def _parsed(*argv: str, edge: bool = True) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_node_flags(parser, edge=edge)
    return parser.parse_args(list(argv))


FLAG_CASES = {
    "default-port-node-address": ((), DEFAULT_METRICS_PORT, None),
    "zero-disables": (("--metrics-port", "0"), 0, None),
    "explicit-address": (("--metrics-port", "9999", "--metrics-address", "0.0.0.0"), 9999, "0.0.0.0"),
}


@pytest.mark.parametrize(("argv", "port", "address"), FLAG_CASES.values(), ids=FLAG_CASES.keys())
def test_metrics_flags(argv: tuple[str, ...], port: int, address: str | None) -> None:
    opts = options(_parsed(*argv))
    assert (opts.metrics_port, opts.metrics_address) == (port, address)


def test_metrics_port_out_of_range_is_refused() -> None:
    with pytest.raises(SystemExit):
        _parsed("--metrics-port", "70000")


def test_default_port_is_not_node_exporters() -> None:
    assert DEFAULT_METRICS_PORT != 9100


def _agent_args(pods: AgentPods) -> list[str]:
    pod = agent_pod("e1", "uid-1", OperatorSettings(agent_pods=pods))
    return next(c for c in pod["spec"]["containers"] if c["name"] == "agent")["args"]


def test_agent_pod_passes_the_metrics_port_and_leaves_the_address_to_the_node() -> None:
    args = _agent_args(AgentPods())
    assert args[args.index("--metrics-port") + 1] == str(DEFAULT_METRICS_PORT)
    assert "--metrics-address" not in args


def test_agent_pod_passes_a_configured_metrics_address_and_port() -> None:
    args = _agent_args(AgentPods(metrics_port=0, metrics_address="::"))
    assert args[-4:] == ["--metrics-port", "0", "--metrics-address", "::"]
