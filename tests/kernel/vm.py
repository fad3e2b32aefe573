"""Boot the Debian kernel under QEMU with virtme-ng and run a command in it: the kernel tier's VM.

virtme-ng (``vng``) boots a kernel over a read-only 9p view of this machine's root, with writable
overlays (in guest memory) on /etc, /home, /opt, /srv, /tmp, /usr and /var: the project, its venv,
charon and the Kubernetes binaries are all there at their usual paths, and whatever the tests
write disappears with the VM. One directory of the host is shared writable (``--rwdir``) to
bring the guest's JUnit report and logs back.

KVM: on this machine ``/dev/kvm`` is provided by ``kvm_pvm`` (Pagetable-based Virtual Machine, a
KVM that runs without hardware virtualisation, inside a Firecracker guest): it only runs guest
kernels built for PVM. A stock Debian kernel fails with ``-cpu host`` ("failed to set MSR 0x10a",
IA32_ARCH_CAPABILITIES) and hangs right after the real-mode setup ("Probing EDD") with any other
CPU model, so KVM is used only when ``FABMESH_VM_KVM=1`` says so; software emulation (TCG) always
works and is the default.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
from pathlib import Path

KERNEL_GLOB = "/boot/vmlinuz-*"
QEMU = "qemu-system-x86_64"
MEMORY = "3G"


class VmUnavailable(RuntimeError):
    """A piece the VM needs is missing; the message names the step that installs it."""


def kernel_image() -> Path:
    """The newest Debian kernel image whose modules are installed (virtme-ng loads ESP from them)."""
    for image in sorted(glob.glob(KERNEL_GLOB), reverse=True):
        release = Path(image).name.removeprefix("vmlinuz-")
        if Path("/lib/modules", release, "kernel/net/ipv4/esp4.ko").exists() or glob.glob(
                f"/lib/modules/{release}/kernel/net/ipv4/esp4.ko*"):
            return Path(image)
    raise VmUnavailable(f"no kernel image with the esp4 module under {KERNEL_GLOB}: step 'apt-get install "
                        "linux-image-amd64' of scripts/install-deps.sh")


def vng() -> str:
    found = shutil.which("vng", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    if not found:
        raise VmUnavailable("no 'vng' (virtme-ng): step 'pip install -e .[test]' of scripts/install-deps.sh")
    return found


def host_env() -> dict[str, str]:
    """``vng`` runs ``virtme-run`` from PATH: the venv's bin directory must be on it."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}


def check_tools() -> None:
    if shutil.which(QEMU) is None:
        raise VmUnavailable(f"no {QEMU}: step 'apt-get install qemu-system-x86' of scripts/install-deps.sh")
    if shutil.which("busybox") is None:
        raise VmUnavailable("no busybox (virtme-ng's initramfs needs a static one): step 'apt-get install "
                            "busybox-static' of scripts/install-deps.sh")


def vng_command(kernel: Path, rwdir: Path, guest_command: str, *, kvm: bool, cpus: int) -> list[str]:
    """The ``vng`` invocation: 9p root (virtio-fs needs a virtiofsd), no microvm (it needs virtio-fs)."""
    argv = [vng(), "--run", str(kernel), "--force-9p", "--disable-microvm", "--memory", MEMORY,
            "--cpus", str(cpus), f"--rwdir={rwdir}"]
    if not kvm:
        argv.append("--disable-kvm")
    return [*argv, "--", guest_command]
