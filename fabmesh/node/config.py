"""Read a node's mounted configuration: ``mesh.yaml`` (plus connector peer shards) and its TLS files.

Kubelet projects ConfigMaps and Secrets as a ``..data`` symlink to a timestamped
directory and swaps that symlink atomically on update; reading through the
stable names therefore always sees one consistent version. :func:`fingerprint`
follows ``..data`` so the loop notices a swap without inotify.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fabmesh.mesh.model import MeshConfigError, NodeMesh, parse_node_mesh, parse_peer_shard
from fabmesh.mesh.tunnelstatus import config_generation
from fabmesh.node.tunnel_sync import Credentials
from fabmesh.pki.authority import PKIError, describe, key_matches_cert


@dataclass(frozen=True)
class NodeConfig:
    mesh: NodeMesh
    cert_pem: str
    creds: Credentials
    generation: str = ""  # tunnelstatus.config_generation of the files this config was read from


def fingerprint(*directories: Path) -> tuple[tuple[str, float, int], ...]:
    """Changes whenever kubelet swaps ``..data`` or a plain file is rewritten."""
    marks = []
    for directory in directories:
        data = directory / "..data"
        target = os.readlink(data) if data.is_symlink() else ""
        for path in sorted(directory.glob("*")):
            if path.name.startswith("."):
                continue
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            marks.append((f"{target}/{path.name}", st.st_mtime, st.st_ino))
    return tuple(marks)


def mesh_node_name(config_dir: Path) -> str:
    """The node ``mesh.yaml`` is for (a connector standby compares it with its own name before loading)."""
    mesh_file = config_dir / "mesh.yaml"
    try:
        return parse_node_mesh(mesh_file.read_text(), str(mesh_file)).node.name
    except OSError as exc:
        raise MeshConfigError(str(mesh_file), "<file>", str(exc)) from exc


def load(config_dir: Path, tls_dir: Path) -> NodeConfig:
    """Raise MeshConfigError (naming the file and field) on anything unusable."""
    mesh_file = config_dir / "mesh.yaml"
    try:
        texts = {"mesh.yaml": mesh_file.read_text()}
        mesh = parse_node_mesh(texts["mesh.yaml"], str(mesh_file))
    except OSError as exc:
        raise MeshConfigError(str(mesh_file), "<file>", str(exc)) from exc
    shards = sorted(config_dir.glob("peers-*.yaml"))
    if shards:
        peers = list(mesh.peers)
        for shard_file in shards:
            texts[shard_file.name] = shard_file.read_text()
            peers.extend(parse_peer_shard(texts[shard_file.name], str(shard_file)).peers)
        mesh = mesh.model_copy(update={"peers": tuple(sorted(peers, key=lambda p: p.name))})
    files = {}
    for name in ("tls.crt", "tls.key", "ca.crt"):
        try:
            files[name] = (tls_dir / name).read_text()
        except OSError as exc:
            raise MeshConfigError(str(tls_dir / name), "<file>", str(exc)) from exc
    try:
        info = describe(files["tls.crt"])
        if not key_matches_cert(files["tls.crt"], files["tls.key"]):
            raise MeshConfigError(str(tls_dir), "tls.key", "does not match tls.crt")
    except PKIError as exc:
        raise MeshConfigError(str(tls_dir), exc.field, exc.reason) from exc
    if info.common_name != mesh.node.name:
        raise MeshConfigError(str(tls_dir / "tls.crt"), "subject.CN",
                              f"certificate is for {info.common_name!r}, mesh.yaml is for {mesh.node.name!r}")
    return NodeConfig(mesh=mesh, cert_pem=files["tls.crt"],
                      creds=Credentials(key_pem=files["tls.key"], ca_pem=files["ca.crt"]),
                      generation=config_generation(texts))
