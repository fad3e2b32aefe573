"""Build and cache the Kubernetes binaries the tests and the lab run for real.

No registry here ships kube-apiserver, so we build it (and etcd, kubectl and
helm) from Go modules at pinned releases; the real-node tier adds kubelet and
friends from the same module, and flanneld (:func:`ensure_flanneld`). ``k8s.io/kubernetes`` cannot be
``go install``-ed directly: its go.mod points every ``k8s.io/*`` staging module
at ``./staging/...`` with replace lines, which ``go install pkg@version``
refuses. So we build from a throwaway module whose go.mod pins those staging
modules to the matching ``v0.x`` tags. etcd is built in the same module, so
it gets the exact etcd release this Kubernetes release was tested against.

The result is laid out the way ``KUBEBUILDER_ASSETS`` expects (one directory
holding ``kube-apiserver``, ``etcd``, ``kubectl``), plus ``helm``. When
``KUBEBUILDER_ASSETS`` is set and complete, it is used as is.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

KUBERNETES_VERSION = "v1.37.2"
HELM_VERSION = "v3.22.0"
BINARIES = ("kube-apiserver", "etcd", "kubectl")
# Built only by ensure_node_assets(): the api tier never pays for them.
NODE_BINARIES = ("kubelet", "kube-proxy", "kube-controller-manager", "kube-scheduler")
# flanneld for cloud nodes (tests/nodes, the lab). v0.28.x is the series DESIGN.md names; v0.28.10 is the newest
# patch the Go module proxy serves (it also serves v0.28.4; nothing newer in the series).
FLANNEL_VERSION = "v0.28.10"
FLANNEL_MODULE = "github.com/flannel-io/flannel"
# Backends left out of our flanneld's main package: fabmesh runs flannel's vxlan backend only, and these two
# cannot be built here: tencentvpc's SDK module is not served by the module proxy (403), and udp needs cgo.
FLANNEL_DROPPED_BACKENDS = ("tencentvpc", "udp")
_PACKAGES = {
    "kube-apiserver": "k8s.io/kubernetes/cmd/kube-apiserver",
    "etcd": "go.etcd.io/etcd/server/v3",
    "kubectl": "k8s.io/kubernetes/cmd/kubectl",
    "kubelet": "k8s.io/kubernetes/cmd/kubelet",
    "kube-proxy": "k8s.io/kubernetes/cmd/kube-proxy",
    "kube-controller-manager": "k8s.io/kubernetes/cmd/kube-controller-manager",
    "kube-scheduler": "k8s.io/kubernetes/cmd/kube-scheduler",
}


class AssetError(RuntimeError):
    """A build step failed; the message names the step and how to rerun it."""


@dataclass(frozen=True)
class Assets:
    directory: Path
    helm: Path

    def path(self, name: str) -> Path:
        return self.directory / name


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fabmesh"


def _staging_version(kube_version: str) -> str:
    major_minor_patch = kube_version.lstrip("v").split(".")
    return "v0." + ".".join(major_minor_patch[1:])


def _run(step: str, cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    print(f"[fabmesh assets] {step}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise AssetError(
            f"step '{step}' failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}\n"
            f"rerun with: python -m fabmesh.testenv.assets"
        )
    return proc.stdout


def _go_env() -> dict[str, str]:
    if shutil.which("go") is None:
        raise AssetError("step 'find go' failed: no 'go' on PATH; install Go >= 1.26 and rerun "
                         "python -m fabmesh.testenv.assets")
    env = dict(os.environ)
    env.setdefault("CGO_ENABLED", "0")
    env.setdefault("GOFLAGS", "-buildvcs=false")
    return env


def _staging_modules(kube_version: str, env: dict[str, str]) -> list[str]:
    out = _run("download k8s.io/kubernetes", ["go", "mod", "download", "-json",
                                              f"k8s.io/kubernetes@{kube_version}"], env=env)
    gomod = Path(re.search(r'"GoMod":\s*"([^"]+)"', out).group(1))  # type: ignore[union-attr]
    return sorted(set(re.findall(r"^\s*(k8s\.io/[\w.-]+) => \./staging/", gomod.read_text(), re.M)))


def _version_ldflags(kube_version: str) -> str:
    """What ``hack/lib/version.sh`` stamps in: without it every component reports
    ``v0.0.0-master+$Format:%H$`` (Node ``kubeletVersion``, ``/version``, ``kubectl get nodes``)."""
    major, minor = kube_version.lstrip("v").split(".")[:2]
    values = {"gitVersion": kube_version, "gitMajor": major, "gitMinor": minor, "gitTreeState": "clean"}
    return " ".join(f"-X k8s.io/{pkg}.{key}={value}" for pkg in ("client-go/pkg/version", "component-base/version")
                    for key, value in values.items())


def _build_kubernetes(dest: Path, kube_version: str, names: tuple[str, ...] = BINARIES) -> None:
    """Build the missing ``names`` into ``dest``; one throwaway module, one Go build cache for all."""
    if all((dest / n).exists() for n in names):
        return
    env = _go_env()
    staging = _staging_version(kube_version)
    modules = _staging_modules(kube_version, env)
    with tempfile.TemporaryDirectory(prefix="fabmesh-k8s-build-") as tmp:
        work = Path(tmp)
        lines = ["module fabmesh.io/k8s-build", "", "go 1.26", "",
                 f"require k8s.io/kubernetes {kube_version}", ""]
        lines += [f"replace {m} => {m} {staging}" for m in modules]
        (work / "go.mod").write_text("\n".join(lines) + "\n")
        imports = "".join(f'\t_ "{_PACKAGES[n]}"\n' for n in names)
        (work / "tools.go").write_text(
            "//go:build tools\n\npackage tools\n\nimport (\n" + imports + ")\n"
        )
        _run("resolve modules", ["go", "mod", "tidy", "-e"], cwd=work, env=env)
        dest.mkdir(parents=True, exist_ok=True)
        for name in names:
            pkg = _PACKAGES[name]
            if (dest / name).exists():
                continue
            tmp_out = dest / f".{name}.tmp"
            ldflags = f"-s -w {_version_ldflags(kube_version)}"
            _run(f"build {name}", ["go", "build", "-trimpath", f"-ldflags={ldflags}", "-o", str(tmp_out), pkg],
                 cwd=work, env=env)
            tmp_out.rename(dest / name)


def _build_helm(dest: Path, helm_version: str) -> Path:
    target = dest / "helm"
    if target.exists():
        return target
    env = _go_env()
    env["GOBIN"] = str(dest)
    dest.mkdir(parents=True, exist_ok=True)
    _run("build helm", ["go", "install", f"helm.sh/helm/v3/cmd/helm@{helm_version}"], env=env)
    return target


def _complete(directory: Path) -> bool:
    return all((directory / b).is_file() and os.access(directory / b, os.X_OK) for b in BINARIES)


def ensure_assets(kube_version: str = KUBERNETES_VERSION, helm_version: str = HELM_VERSION) -> Assets:
    """Return the binaries, building whatever is missing (idempotent, cached)."""
    override = os.environ.get("KUBEBUILDER_ASSETS")
    if override and _complete(Path(override)):
        directory = Path(override)
    else:
        if override:
            print(f"[fabmesh assets] KUBEBUILDER_ASSETS={override} lacks one of {BINARIES}; "
                  "using the fabmesh cache instead", file=sys.stderr)
        directory = cache_root() / f"k8s-{kube_version}"
        if not _complete(directory):
            _build_kubernetes(directory, kube_version)
    helm = _build_helm(cache_root() / f"helm-{helm_version}", helm_version)
    return Assets(directory=directory, helm=helm)


def ensure_node_assets(kube_version: str = KUBERNETES_VERSION) -> Path:
    """Build (once) kubelet, kube-proxy, kube-controller-manager and kube-scheduler next to kube-apiserver.

    Kept apart from ensure_assets() because only the real-node tier needs them and a cold
    build of the four costs several minutes more on a 2-core machine. Returns the directory.
    """
    directory = cache_root() / f"k8s-{kube_version}"
    _build_kubernetes(directory, kube_version, NODE_BINARIES)
    return directory


def flanneld_main_go(upstream: str, dropped: tuple[str, ...] = FLANNEL_DROPPED_BACKENDS) -> str:
    """Upstream ``main.go`` without the blank imports of ``dropped`` backends (pure).

    Raises if an import to drop is missing, so a new release that moves them fails the build
    loudly instead of silently pulling the unbuildable package back in.
    """
    lines = upstream.splitlines(keepends=True)
    kept = []
    for backend in dropped:
        needle = f'"{FLANNEL_MODULE}/pkg/backend/{backend}"'
        if not any(needle in line for line in lines):
            raise AssetError(f"step 'patch flanneld main.go' failed: no import of {needle} to drop; "
                             "check FLANNEL_DROPPED_BACKENDS against the pinned release")
    for line in lines:
        if not any(f'"{FLANNEL_MODULE}/pkg/backend/{b}"' in line for b in dropped):
            kept.append(line)
    return "".join(kept)


def _build_flanneld(dest: Path, version: str) -> Path:
    """flanneld at ``version`` from a throwaway module holding upstream's ``main.go``.

    ``go install github.com/flannel-io/flannel@version`` fails here: its main package imports
    every backend, and two of them cannot be built (:data:`FLANNEL_DROPPED_BACKENDS`). So the
    throwaway module requires the pinned flannel module, copies its ``main.go`` minus those two
    imports, and builds it with the version stamp upstream's Makefile uses.
    """
    target = dest / "flanneld"
    if target.exists():
        return target
    env = _go_env()
    out = _run("download flannel", ["go", "mod", "download", "-json", f"{FLANNEL_MODULE}@{version}"], env=env)
    source = Path(re.search(r'"Dir":\s*"([^"]+)"', out).group(1))  # type: ignore[union-attr]
    with tempfile.TemporaryDirectory(prefix="fabmesh-flannel-build-") as tmp:
        work = Path(tmp)
        (work / "go.mod").write_text(f"module fabmesh.io/flannel-build\n\ngo 1.26\n\n"
                                     f"require {FLANNEL_MODULE} {version}\n")
        (work / "main.go").write_text(flanneld_main_go((source / "main.go").read_text()))
        _run("resolve flannel modules", ["go", "mod", "tidy", "-e"], cwd=work, env=env)
        dest.mkdir(parents=True, exist_ok=True)
        tmp_out = dest / ".flanneld.tmp"
        ldflags = f"-s -w -X {FLANNEL_MODULE}/pkg/version.Version={version}"
        _run("build flanneld", ["go", "build", "-trimpath", f"-ldflags={ldflags}", "-o", str(tmp_out), "."],
             cwd=work, env=env)
        tmp_out.rename(target)
    return target


def ensure_flanneld(version: str = FLANNEL_VERSION) -> Path:
    """Build (once) flanneld into ``~/.cache/fabmesh/flannel-<version>``; returns the binary's path."""
    return _build_flanneld(cache_root() / f"flannel-{version}", version)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fabmesh.testenv.assets",
        description="Build (once) and print the kube-apiserver/etcd/kubectl/helm binaries fabmesh tests use.",
    )
    parser.add_argument("--kubernetes-version", default=KUBERNETES_VERSION)
    parser.add_argument("--helm-version", default=HELM_VERSION)
    parser.add_argument("--node", action="store_true",
                        help="also build kubelet, kube-proxy, kube-controller-manager, kube-scheduler and flanneld")
    parser.add_argument("--flannel", action="store_true", help="also build flanneld (the lab runs it on cloud hosts)")
    parser.add_argument("--flannel-version", default=FLANNEL_VERSION)
    args = parser.parse_args(argv)
    try:
        assets = ensure_assets(args.kubernetes_version, args.helm_version)
        flanneld = None
        if args.node:
            ensure_node_assets(args.kubernetes_version)
        if args.node or args.flannel:
            flanneld = ensure_flanneld(args.flannel_version)
    except AssetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"KUBEBUILDER_ASSETS={assets.directory}")
    print(f"HELM={assets.helm}")
    if flanneld is not None:
        print(f"FLANNELD={flanneld}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
