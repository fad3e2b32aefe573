#!/usr/bin/env bash
# Install everything fabmesh's tests and lab need, idempotently; cached between runs.
#   Debian packages (strongSwan with kernel-libipsec, iproute2, iptables, ipset, CNI plugins, iperf3;
#   for real nodes: containerd 1.6 + runc, busybox-static for the local images, mmdebstrap and buildah
#   for the product image (python -m fabmesh.testenv.product_image; no Docker, no registry);
#   for the kernel tier's VM: a Debian kernel with ESP as modules, QEMU and a static busybox
#   (virtme-ng, pinned in the test extras, boots that kernel over a read-only view of this machine)
#   a Python venv at .venv with fabmesh and its pinned dependencies
#   kube-apiserver, etcd, kubectl (built from Go modules) and helm, under ~/.cache/fabmesh
# Rerun this script after any failure: every step says what it ran.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root: network namespaces, iptables and charon need it (sudo $0)"

DEBS=(strongswan-charon strongswan-swanctl libcharon-extra-plugins libstrongswan-standard-plugins
      iproute2 iptables ipset containernetworking-plugins iperf3 iputils-ping socat procps python3-venv
      containerd runc busybox-static curl)
# apt_install [APT-OPTION...] -- PACKAGE...: install the packages that are missing, saying which.
apt_install() {
  local opts=() missing=() pkg
  while [ "$1" != "--" ]; do opts+=("$1"); shift; done; shift
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -gt 0 ] || return 0
  step "apt-get install ${opts[*]} ${missing[*]}"
  apt-get update -qq || die "step 'apt-get update' failed; rerun scripts/install-deps.sh"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${opts[@]}" "${missing[@]}" >/dev/null \
    || die "step 'apt-get install ${missing[*]}' failed; rerun scripts/install-deps.sh"
}
apt_install -- "${DEBS[@]}"

# The product image for real nodes: an mmdebstrap base, the Dockerfile built by buildah (its recommends
# would add podman's network stack and fuse-overlayfs, which a root build on ext4 does not use).
apt_install --no-install-recommends -- mmdebstrap buildah uidmap

# Real nodes run Debian's containerd 1.6 (see docs/real-nodes.md for why not v2): refuse another series.
containerd --version | grep -q ' 1\.6\.' \
  || die "containerd $(containerd --version | cut -d' ' -f3) installed; real nodes are tested with the 1.6 series"

# The kernel tier's VM, without recommends: the kernel's would pull firmware and a boot loader, QEMU's
# a desktop stack. The kernel's postinst only writes /boot/initrd.img-* and the /vmlinuz links.
apt_install --no-install-recommends -- linux-image-amd64 qemu-system-x86 busybox-static

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  step "create .venv with $PY"
  "$PY" -m venv .venv || die "step 'python3 -m venv .venv' failed (is python3-venv installed?)"
fi
stamp=.venv/.fabmesh-deps-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  step "pip install -e .[test]"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e '.[test]' || die "step 'pip install -e .[test]' failed; rerun scripts/install-deps.sh"
  rm -f .venv/.fabmesh-deps-*; touch "$stamp"
fi

command -v go >/dev/null || die "no Go toolchain on PATH: kube-apiserver is built from Go modules (install Go >= 1.26)"
step "kube-apiserver, etcd, kubectl, helm and flanneld (built once, cached in ~/.cache/fabmesh)"
# flanneld: the lab (e2e tier) runs it on cloud hosts; about 4.5 min cold on 2 cores.
.venv/bin/python -m fabmesh.testenv.assets --flannel
# Real-node tier only (tests/nodes): FABMESH_NODE_ASSETS=1 also builds kubelet, kube-proxy,
# kube-controller-manager and kube-scheduler (several more minutes cold).
if [ "${FABMESH_NODE_ASSETS:-0}" = 1 ]; then
  step "kubelet, kube-proxy, kube-controller-manager, kube-scheduler (cached in ~/.cache/fabmesh)"
  .venv/bin/python -m fabmesh.testenv.assets --node
fi
