"""``fabmesh agent``: the edge node's loop (bridge, CNI, routes, iptables/ipset, tunnels over VICI)."""

from __future__ import annotations

import argparse

from fabmesh.node.command import register_node_command


def register(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    register_node_command(sub, name, help_text, edge=True)
