"""In the guest: load ESP and friends, then one kernel-ESP mesh for the whole session.

The mesh is :mod:`tests.kernel.inside.mesh`'s: planned in-process by the operator's own code, no
control plane (under software emulation kube-apiserver alone needs minutes). Its pod-to-pod
reachability matrix must be full before any test runs; ``fabmesh lab down``'s teardown removes it.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fabmesh.lab import probe, teardown
from fabmesh.lab.state import LabState
from tests.conftest import require_root_tools
from tests.kernel.conftest import ARTIFACTS_ENV, GUEST_ENV
from tests.kernel.inside import mesh

# esp4 and xfrm_user for charon's kernel-netlink; the rest autoload, but a missing one is clearer here.
MODULES = ("esp4", "xfrm_user", "xfrm4_tunnel", "xt_policy", "ip_set", "ip_set_hash_net", "vxlan", "veth",
           "bridge")
MESH_TIMEOUT_S = 180  # software emulation: everything is several times slower than on the host


@pytest.fixture(scope="session", autouse=True)
def _kernel_with_esp() -> None:
    if os.environ.get(GUEST_ENV) != "1":
        pytest.fail(f"tests/kernel/inside runs only in the kernel tier's VM ({GUEST_ENV}=1); run tests/kernel")
    require_root_tools("ip", "iptables-restore", "ipset", "/usr/lib/ipsec/charon", "/usr/lib/cni/bridge", "socat")
    for module in MODULES:
        done = subprocess.run(["modprobe", module], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.fail(f"step 'modprobe {module}' failed in the guest: {done.stderr.strip()}")
    print(f"guest kernel {os.uname().release}: {', '.join(MODULES)} loaded")


@pytest.fixture(scope="session")
def kernel_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabState]:
    directory: Path = tmp_path_factory.mktemp("lab")
    started = time.monotonic()
    try:
        state = mesh.build(directory, MESH_TIMEOUT_S)
        probe.wait_tunnels(state, MESH_TIMEOUT_S)
        report = probe.check(state, wait=60)
        failed = [(p["src"], p["dst"]) for p in report["pairs"] if not p["ok"]]
        print(f"kernel mesh: {len(report['pairs'])} pod pairs, full matrix after {time.monotonic() - started:.0f}s")
        if failed:
            pytest.fail(f"pod pairs that cannot reach each other over kernel ESP: {failed}\n{_logs(directory)}")
        yield state
    except BaseException:
        logs = _logs(directory)
        print(logs)
        if os.environ.get(ARTIFACTS_ENV):
            (Path(os.environ[ARTIFACTS_ENV]) / "mesh-logs.txt").write_text(logs)
        raise
    finally:
        removed = teardown.down(directory)
        if removed is not None:
            print(f"removed {len(removed.namespaces)} namespaces, stopped {len(removed.processes)} processes")


def _logs(directory: Path) -> str:
    return "\n".join(f"--- {p.relative_to(directory)}\n{p.read_text(errors='replace')[-3000:]}"
                     for p in sorted([*directory.rglob("*.log"), *directory.rglob("*.stderr")]))
