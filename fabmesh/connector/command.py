"""``fabmesh connector``: the cloud side of every edge tunnel, same loop as the agent without pods.

The connector reads ``mesh.yaml`` (the ``fabmesh-connector`` ConfigMap) plus the
``peers-*.yaml`` shards (the ``fabmesh-connector-peers-NN`` ConfigMaps projected
into the same directory). It answers every edge whose identity the operator
issued; an edge removed from the config loses its connection (and so its
tunnel) on the next pass.
"""

from __future__ import annotations

import argparse

from fabmesh.node.command import register_node_command


def register(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    register_node_command(sub, name, help_text, edge=False)
