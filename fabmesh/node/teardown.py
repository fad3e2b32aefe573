"""Telling an uninstall from a restart, and what an uninstall removes from a node (pure).

A stopping agent or connector leaves the data plane as it is: a restart (a new image, a node
drain, an OOM kill) must not cut a single tunnel. So stopping can never be the signal to clean
up. The uninstall hook (``fabmesh operator --uninstall``) instead annotates the node's Pod with
``fabmesh.io/teardown=<token>``; the Pod sees its own annotations through a downward API file,
which kubelet rewrites as soon as it syncs the updated Pod (a ConfigMap change would wait for
kubelet's cache and resync period, a minute or more). The loop then removes everything it
programmed (:class:`TeardownPlan`) and reports the token in its TunnelStatus (``status.teardown``),
which is what the hook waits for.

The downward API file holds one ``key="value"`` line per annotation, the value quoted as Go's
``strconv.Quote`` does.
"""

from __future__ import annotations

import ast
import ipaddress
from dataclasses import dataclass

from fabmesh.mesh.model import NodeSettings
from fabmesh.mesh.names import TEARDOWN_ANNOTATION


def requested(annotations: str) -> str | None:
    """The teardown token in a downward API annotations file, or None when there is none."""
    for line in annotations.splitlines():
        key, sep, value = line.partition("=")
        if sep and key == TEARDOWN_ANNOTATION:
            try:
                token = ast.literal_eval(value) if value.startswith('"') else value
            except (ValueError, SyntaxError):
                token = value.strip('"')
            return str(token) or None
    return None


@dataclass(frozen=True)
class TeardownPlan:
    """Everything a node's agent or connector may have programmed, to remove in this order."""

    route_table: int
    bridge: str | None  # an edge's pod bridge; a connector has none
    cni_conf: str | None  # path of the edge's conflist
    anchors: tuple[str, ...] = ()  # host addresses libipsec needed on lo (network address of a local subnet)


def plan_teardown(settings: NodeSettings, *, edge: bool, cni_conf_dir: str | None = None,
                  anchor_subnets: tuple[str, ...] = ()) -> TeardownPlan:
    """What to remove for a node run with ``settings``; ``anchor_subnets`` as ``NodeState.anchors``."""
    directory = (cni_conf_dir or settings.cni_conf_dir).rstrip("/") or "/"
    return TeardownPlan(
        route_table=settings.route_table,
        bridge=settings.bridge if edge else None,
        cni_conf=f"{directory}/{settings.cni_conf_name}" if edge else None,
        anchors=tuple(sorted({str(ipaddress.ip_network(s).network_address) for s in anchor_subnets})))
