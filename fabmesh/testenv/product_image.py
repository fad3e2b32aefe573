"""The product image, built here from the project's Dockerfile: no Docker, no registry, cached.

Two steps, each cached under ``~/.cache/fabmesh/images`` by a hash of its inputs:

1. **Base**: a Debian bookworm root filesystem made by ``mmdebstrap`` from Debian
   packages (``python3``, ``python3-pip``, ``ca-certificates``), with its apt sources
   pointing at the Debian mirrors, so the Dockerfile's ``apt-get`` works in it. It
   stands in for ``python:3.11-slim-bookworm`` (bookworm's python3 is 3.11), which
   would be a registry pull. PEP 668's ``EXTERNALLY-MANAGED`` marker is removed, as
   the PEP allows for single-purpose container images, so ``pip install .`` works as
   it does on the official Python image. buildah imports the tarball as
   ``localhost/fabmesh-base:<hash>`` (``FROM scratch`` + ``ADD``).
2. **Product**: ``buildah bud`` of the unchanged Dockerfile with
   ``--build-arg BASE=localhost/fabmesh-base:<hash> --pull=never``: the Dockerfile's
   ``FROM ${BASE}`` defaults to the official image, so a normal build is unchanged.
   Its ``RUN`` steps use the host's network (``--network host``) for Debian's mirror
   and PyPI, nothing else. The result is written as an OCI archive named
   ``fabmesh.local/fabmesh:<hash>`` that ``ctr -n k8s.io images import`` loads
   (:func:`fabmesh.testenv.images.import_archive`). The tag is never ``latest`` and
   Pods use ``imagePullPolicy: Never``: kubelet never asks a registry.

buildah keeps its own storage under the cache (``--root``), so nothing here touches
the box's ``/var/lib/containers``; the build context is a copy of exactly the
files the Dockerfile reads, so the hash covers everything the image depends on.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fabmesh.testenv.assets import cache_root

REPO = Path(__file__).resolve().parents[2]
REGISTRY = "fabmesh.local"
SUITE = "bookworm"
MIRRORS = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
HOST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
BASE_PACKAGES = ("python3", "python3-pip", "ca-certificates")
# What the Dockerfile COPYs; the image's hash is taken over exactly these.
CONTEXT_FILES = ("Dockerfile", "pyproject.toml", "README.md")
CONTEXT_DIRS = ("fabmesh",)


class ProductImageError(RuntimeError):
    """A build step failed; the message names the step and where its output is."""


@dataclass(frozen=True)
class ProductImage:
    """The OCI archive to import into a node's runtime, and the name Pods refer to."""

    archive: Path
    name: str

    @property
    def repository(self) -> str:
        return self.name.rsplit(":", 1)[0]

    @property
    def tag(self) -> str:
        return self.name.rsplit(":", 1)[1]


def _images_dir() -> Path:
    return cache_root() / "images"


def _buildah(*args: str) -> list[str]:
    store = _images_dir() / "buildah"
    return ["buildah", "--root", str(store / "root"), "--runroot", str(store / "run"),
            "--storage-driver", "overlay", *args]


def _run(step: str, cmd: list[str], log: Path) -> None:
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
        out.flush()
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    if done.returncode != 0:
        raise ProductImageError(f"product image step {step!r} failed ({done.returncode}); see {log}")


def base_key() -> str:
    """Hash of everything the base rootfs is made from (suite, mirrors, packages, the hook)."""
    text = "\n".join([SUITE, *MIRRORS, *BASE_PACKAGES, _HOOK])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def context_files(repo: Path = REPO) -> list[Path]:
    """The files the Dockerfile reads, relative to ``repo``, sorted (bytecode caches left out)."""
    files = [Path(name) for name in CONTEXT_FILES]
    for directory in CONTEXT_DIRS:
        files += [p.relative_to(repo) for p in (repo / directory).rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"]
    return sorted(files)


def product_key(repo: Path = REPO) -> str:
    """Hash of the base and of every file in the build context, names included."""
    digest = hashlib.sha256(base_key().encode())
    for path in context_files(repo):
        digest.update(str(path).encode() + b"\0" + (repo / path).read_bytes() + b"\0")
    return digest.hexdigest()[:12]


_HOOK = 'rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED'


def ensure_base(log: Path) -> str:
    """The base image in buildah's store (built once per :func:`base_key`); returns its name."""
    key = base_key()
    name = f"localhost/fabmesh-base:{key}"
    if subprocess.run(_buildah("inspect", "--type", "image", name), capture_output=True).returncode == 0:
        return name
    rootfs = _images_dir() / f"base-{key}.tar"
    if not rootfs.exists():
        partial = rootfs.with_suffix(".tmp.tar")
        _run("mmdebstrap", ["mmdebstrap", "--variant=minbase", "--include=" + ",".join(BASE_PACKAGES),
                            "--aptopt=Acquire::Languages \"none\"",
                            "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
                            "--dpkgopt=path-exclude=/usr/share/locale/*",
                            f"--customize-hook={_HOOK}", SUITE, str(partial), *MIRRORS], log)
        partial.rename(rootfs)
    with tempfile.TemporaryDirectory(prefix="fabmesh-base-") as tmp:
        context = Path(tmp)
        (context / "Containerfile").write_text('FROM scratch\nADD base.tar /\nCMD ["/bin/bash"]\n')
        try:
            (context / "base.tar").hardlink_to(rootfs)
        except OSError:  # another filesystem
            shutil.copy(rootfs, context / "base.tar")
        _run("buildah bud (base)", _buildah("bud", "--pull=never", "--layers=false", "-t", name,
                                            "-f", str(context / "Containerfile"), str(context)), log)
    return name


def ensure_product_image(repo: Path = REPO) -> ProductImage:
    """The product image's OCI archive, built (once per :func:`product_key`) from the Dockerfile."""
    key = product_key(repo)
    image = ProductImage(archive=_images_dir() / f"fabmesh-{key}.tar", name=f"{REGISTRY}/fabmesh:{key}")
    if image.archive.exists():
        return image
    images = _images_dir()
    images.mkdir(parents=True, exist_ok=True)
    log = images / f"fabmesh-{key}.log"
    base = ensure_base(log)
    with tempfile.TemporaryDirectory(prefix="fabmesh-context-") as tmp:
        context = Path(tmp)
        for path in context_files(repo):
            (context / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / path, context / path)
        # The box's CA bundle is bind-mounted for the RUN steps only (not committed): a box behind a
        # TLS-inspecting proxy reaches PyPI only with its own CAs.
        _run("buildah bud", _buildah("bud", "--pull=never", "--network", "host", "--layers",
                                     "--volume", f"{HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro",
                                     "--build-arg", f"BASE={base}", "-t", image.name,
                                     "-f", str(context / "Dockerfile"), str(context)), log)
    partial = image.archive.with_suffix(".tmp.tar")
    partial.unlink(missing_ok=True)
    _run("buildah push", _buildah("push", image.name, f"oci-archive:{partial}:{image.name}"), log)
    partial.rename(image.archive)
    return image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fabmesh.testenv.product_image",
        description="Build (once, cached by its inputs' hash) the fabmesh image from the Dockerfile on an "
                    "mmdebstrap base, with buildah, and print its OCI archive and name.")
    parser.parse_args(argv)
    started = time.monotonic()
    try:
        image = ensure_product_image()
    except ProductImageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"FABMESH_IMAGE_ARCHIVE={image.archive}")
    print(f"FABMESH_IMAGE={image.name}")
    print(f"# {time.monotonic() - started:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
