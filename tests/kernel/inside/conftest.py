"""In the guest: load ESP and friends, then one lab with the kernel backend for the whole session.

The lab is brought up by the command a user types, ``fabmesh lab up --backend kernel``, whose
reachability matrix must be full before any test runs (that is also the tier's proof that the
main demo works on the production backend). ``fabmesh lab down`` removes it at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fabmesh.lab.state import LabState
from fabmesh.mesh.model import Backend
from tests.conftest import require_root_tools
from tests.kernel.conftest import GUEST_ENV

# esp4 and xfrm_user for charon's kernel-netlink; the rest autoload, but a missing one is clearer here.
MODULES = ("esp4", "xfrm_user", "xfrm4_tunnel", "xt_policy", "ip_set", "ip_set_hash_net", "vxlan", "veth",
           "bridge")
LAB_TIMEOUT_S = 300  # software emulation: everything is several times slower than on the host


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


def _fabmesh(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fabmesh.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session")
def kernel_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabState]:
    directory: Path = tmp_path_factory.mktemp("lab")
    try:
        up = _fabmesh("lab", "--dir", str(directory), "up", "--backend", "kernel", "--json",
                      "--timeout", str(LAB_TIMEOUT_S), timeout=LAB_TIMEOUT_S * 3)
        report = json.loads(up.stdout) if up.stdout.strip().startswith("{") else None
        if up.returncode != 0 or report is None:
            logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                             for p in sorted(directory.rglob("*.log")))
            pytest.fail(f"'fabmesh lab up --backend kernel' failed ({up.returncode}):\n{up.stdout[-4000:]}\n"
                        f"{up.stderr[-4000:]}\n{logs}")
        print(f"lab up --backend kernel: full matrix in {report['seconds_to_full_matrix']}s, "
              f"{len(report['pairs'])} pairs ok")
        state = LabState.load(directory)
        assert state is not None and state.backend is Backend.KERNEL
        yield state
    finally:
        down = _fabmesh("lab", "--dir", str(directory), "down", timeout=LAB_TIMEOUT_S)
        print(down.stdout[-2000:], down.stderr[-2000:])
