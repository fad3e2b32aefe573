"""What kubelet would do on each lab host, driven by the real API server.

* kubelet's volume projection: each node's ConfigMap and Secret are written to
  ``<host>/mesh`` and ``<host>/tls`` (on cloud hosts other than the connector,
  ``fabmesh-cloud-routes`` to ``<host>/cloud``, for the route agent) the way
  kubelet does it: files in a timestamped directory, published by an atomic
  rename of the ``..data`` symlink, the stable names being links through ``..data``.
* kubelet's projected ServiceAccount token: each edge's and connector's node
  identity (``fabmesh-node-<node>``, created by the operator) gets a token by
  TokenRequest, written to ``<host>/status/token`` and renewed at 80% of its
  life, which the node process reads to write its TunnelStatus.

flannel is no longer imitated here: the lab runs real flanneld on cloud hosts
(:func:`fabmesh.lab.bringup.up`, :mod:`fabmesh.testenv.flannel`).

Run as ``python -m fabmesh.lab.nodesim --dir LAB_DIR``: it polls the API every
second until killed (by PID, by ``fabmesh lab down``).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from fabmesh.kube.client import ApiError, Kube, load_api_client
from fabmesh.lab.state import LabState
from fabmesh.operator import objects as o

log = logging.getLogger("fabmesh.lab.nodesim")


def project(directory: Path, files: dict[str, str]) -> bool:
    """Publish ``files`` in ``directory`` like kubelet (atomic ``..data`` swap); False if unchanged."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "..data"
    if data.is_symlink():
        current = directory / os.readlink(data)
        existing = {p.name: p.read_text() for p in current.iterdir()} if current.is_dir() else {}
        if existing == files:
            return False
    stamp = datetime.datetime.now(datetime.UTC).strftime("..%Y_%m_%d_%H_%M_%S.%f")
    fresh = directory / stamp
    fresh.mkdir()
    for name, text in files.items():
        (fresh / name).write_text(text)
    tmp = directory / "..data_tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(stamp)
    old = os.readlink(data) if data.is_symlink() else None
    os.replace(tmp, data)
    for name in files:
        link = directory / name
        if not link.is_symlink():
            link.unlink(missing_ok=True)
            link.symlink_to(f"..data/{name}")
    for stale in directory.iterdir():
        if stale.is_symlink() and not stale.name.startswith("..") and stale.name not in files:
            stale.unlink()
    if old:
        shutil.rmtree(directory / old, ignore_errors=True)
    return True


def _secret_files(secret: dict[str, Any] | None) -> dict[str, str]:
    return {k: o.unb64(v) for k, v in ((secret or {}).get("data") or {}).items()}


def project_all(kube: Kube, state: LabState) -> None:
    ns = state.operator_namespace
    cms = {c["metadata"]["name"]: c for c in kube.list("configmaps", ns)}
    secrets = {s["metadata"]["name"]: s for s in kube.list("secrets", ns)}
    for host in state.hosts:
        base = Path(state.directory) / "hosts" / host.name
        if host.role == "edge":
            cm, secret = cms.get(o.agent_configmap_name(host.name)), secrets.get(o.tls_secret_name(host.name))
            mesh_files = dict((cm or {}).get("data") or {})
        elif host.role == "connector":
            # Its own Secret only, as the operator's connector Pod mounts it.
            cm, secret = cms.get(o.CONNECTOR_CONFIGMAP), secrets.get(o.connector_secret_name(host.name))
            mesh_files = dict((cm or {}).get("data") or {})
            for name, shard in cms.items():
                if name.startswith(o.CONNECTOR_SHARD_PREFIX):
                    mesh_files[f"peers-{name.rsplit('-', 1)[1]}.yaml"] = shard["data"]["peers.yaml"]
        else:
            # The route agent's DaemonSet mounts the one shared ConfigMap, and nothing else.
            routes = cms.get(o.CLOUD_ROUTES_CONFIGMAP)
            if routes is not None and project(base / "cloud", dict(routes.get("data") or {})):
                log.info("node=%s action=project configmap=%s", host.name, o.CLOUD_ROUTES_CONFIGMAP)
            continue
        if cm is None or secret is None:
            continue  # like kubelet: the Pod waits until both exist
        if project(base / "mesh", mesh_files):
            log.info("node=%s action=project configmap", host.name)
        if project(base / "tls", _secret_files(secret)):
            log.info("node=%s action=project secret", host.name)


TOKEN_LIFETIME_S = 600


def project_tokens(kube: Kube, state: LabState, now: float) -> None:
    """A fresh token file per node identity once its file is missing or 80% through its life."""
    ns = state.operator_namespace
    for host in state.hosts:
        if host.role == "cloud":
            continue
        token = Path(state.directory) / "hosts" / host.name / "status" / "token"
        if token.exists() and now - token.stat().st_mtime < 0.8 * TOKEN_LIFETIME_S:
            continue
        try:
            answer = kube._call("POST", f"/api/v1/namespaces/{ns}/serviceaccounts/{o.node_account_name(host.name)}"
                                "/token", {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                                           "spec": {"expirationSeconds": TOKEN_LIFETIME_S}})
        except ApiError as exc:
            if exc.not_found:
                continue  # the operator has not created the node's identity yet
            raise
        token.parent.mkdir(parents=True, exist_ok=True)
        tmp = token.with_suffix(".tmp")
        tmp.write_text(answer["status"]["token"])
        tmp.chmod(0o400)
        os.replace(tmp, token)
        log.info("node=%s action=project token", host.name)


def sync_once(kube: Kube, state: LabState) -> None:
    project_all(kube, state)
    project_tokens(kube, state, time.time())


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m fabmesh.lab.nodesim",
                                     description="kubelet's volume projection for a running lab")
    parser.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    state = LabState.load(args.dir)
    if state is None or state.kubeconfig is None:
        parser.error(f"no running lab in {args.dir}")
    kube = Kube(load_api_client(state.kubeconfig))
    while True:
        try:
            sync_once(kube, state)
        except Exception as exc:  # the API may be down for a moment; try again
            log.warning("sync failed: %s", exc)
        time.sleep(1.0)


if __name__ == "__main__":
    raise SystemExit(main())
