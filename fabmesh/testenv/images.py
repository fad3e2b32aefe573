"""Container images for real nodes, built here from Debian's busybox-static: no Docker, no registry.

A node's runtime needs two images before it can run anything: the sandbox
("pause") image every Pod starts with, and something to run in the Pod. Both
are one layer holding ``/bin/busybox`` (a static binary) and a symlink per
applet, written as an OCI image layout in one tar archive that
``ctr -n k8s.io images import`` loads. containerd names an imported image from
the ``io.containerd.image.name`` annotation of its manifest descriptor in
``index.json``.

The archive is deterministic (fixed mtimes, sorted entries): the same busybox
binary gives the same digests, so the archive is cached and a tag derived from
the binary's hash changes exactly when the binary does. The tag is never
``latest``: kubelet would then default to ``imagePullPolicy: Always`` and try a
registry. The pause image runs ``sleep infinity``; containerd stops a sandbox
with SIGKILL, so a PID 1 that ignores SIGTERM is fine.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import platform
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fabmesh.testenv.assets import cache_root

BUSYBOX = Path("/bin/busybox")
REGISTRY = "fabmesh.local"
# What tests use inside a pod; busybox-static has every one as an applet.
APPLETS = ("sh", "sleep", "ping", "nc", "wget", "traceroute", "ip", "cat", "echo", "hostname", "ls", "ps")
_MEDIA = "application/vnd.oci.image"


class ImageError(RuntimeError):
    """An image could not be built or imported; the message names the image and the step."""


@dataclass(frozen=True)
class LocalImages:
    """The archive to import into every node and the names Pods and the runtime refer to."""

    archive: Path
    busybox: str
    pause: str


def _arch() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def _layer(busybox: bytes) -> bytes:
    """One gzipped tar: /bin/busybox, an applet symlink each, and the directories runc mounts over."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for directory in ("bin", "etc", "proc", "sys", "dev", "tmp", "var", "var/run"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o1777 if directory == "tmp" else 0o755, 0
            tar.addfile(info)
        info = tarfile.TarInfo("bin/busybox")
        info.size, info.mode, info.mtime = len(busybox), 0o755, 0
        tar.addfile(info, io.BytesIO(busybox))
        for applet in sorted(APPLETS):
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname, link.mode, link.mtime = tarfile.SYMTYPE, "busybox", 0o777, 0
            tar.addfile(link)
        passwd = b"root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n"
        info = tarfile.TarInfo("etc/passwd")
        info.size, info.mode, info.mtime = len(passwd), 0o644, 0
        tar.addfile(info, io.BytesIO(passwd))
    return raw.getvalue()


def _blob(blobs: dict[str, bytes], data: bytes, media_type: str) -> dict[str, Any]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return {"mediaType": media_type, "digest": digest, "size": len(data)}


def build_archive(busybox: bytes, names: dict[str, list[str]]) -> bytes:
    """An OCI image layout tar with one manifest per ``name -> entrypoint``, all sharing one layer."""
    blobs: dict[str, bytes] = {}
    layer_tar = _layer(busybox)
    diff_id = "sha256:" + hashlib.sha256(layer_tar).hexdigest()
    layer = _blob(blobs, gzip.compress(layer_tar, mtime=0), f"{_MEDIA}.layer.v1.tar+gzip")
    manifests = []
    for name, entrypoint in sorted(names.items()):
        config = {
            "architecture": _arch(), "os": "linux",
            "config": {"Entrypoint": entrypoint, "Env": ["PATH=/bin"], "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }
        config_desc = _blob(blobs, json.dumps(config, sort_keys=True).encode(), f"{_MEDIA}.config.v1+json")
        manifest = {"schemaVersion": 2, "mediaType": f"{_MEDIA}.manifest.v1+json",
                    "config": config_desc, "layers": [layer]}
        desc = _blob(blobs, json.dumps(manifest, sort_keys=True).encode(), f"{_MEDIA}.manifest.v1+json")
        desc["annotations"] = {"io.containerd.image.name": name,
                               "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1]}
        desc["platform"] = {"architecture": _arch(), "os": "linux"}
        manifests.append(desc)
    files = {"oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
             "index.json": json.dumps({"schemaVersion": 2, "manifests": manifests}, sort_keys=True).encode()}
    files.update({f"blobs/sha256/{d.split(':', 1)[1]}": data for d, data in blobs.items()})
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for directory in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
            tar.addfile(info)
        for path, data in sorted(files.items()):
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def ensure_local_images(busybox_path: Path = BUSYBOX) -> LocalImages:
    """Build (once, cached by the busybox binary's hash) the test-pod and pause images' archive."""
    if not busybox_path.is_file():
        raise ImageError(f"image busybox: {busybox_path} missing; install busybox-static "
                         "(scripts/install-deps.sh)")
    busybox = busybox_path.read_bytes()
    tag = hashlib.sha256(busybox).hexdigest()[:12]
    images = LocalImages(archive=cache_root() / "images" / f"local-{tag}.tar",
                         busybox=f"{REGISTRY}/busybox:{tag}", pause=f"{REGISTRY}/pause:{tag}")
    if not images.archive.exists():
        images.archive.parent.mkdir(parents=True, exist_ok=True)
        data = build_archive(busybox, {images.busybox: ["/bin/sh"],
                                       images.pause: ["/bin/sleep", "infinity"]})
        partial = images.archive.with_suffix(".tmp")
        partial.write_bytes(data)
        partial.rename(images.archive)
    return images


def import_images(images: LocalImages, containerd_socket: Path) -> None:
    """Load the archive into a node's containerd, in the CRI's ``k8s.io`` namespace."""
    import_archive(images.archive, containerd_socket)


def import_archive(archive: Path, containerd_socket: Path) -> None:
    """Load one OCI archive (e.g. the product image's) into a node's containerd, namespace ``k8s.io``."""
    cmd = ["ctr", "--address", str(containerd_socket), "-n", "k8s.io", "images", "import", str(archive)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ImageError(f"image archive {archive}: import into {containerd_socket} failed "
                         f"({proc.returncode}): {proc.stderr.strip()}")
