"""The kernel tier's one host-side test: boot one VM, run ``tests/kernel/inside`` in it, report the result.

The guest runs this very checkout with the project's own interpreter (both are visible in the guest
at the same paths); its pytest writes a JUnit report into a directory shared with the host. A
failure inside fails this test with the guest's output; a missing piece fails (on CI) or skips
(elsewhere) naming the install step, like every other tier's missing tools.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.conftest import require_root_tools
from tests.kernel import vm
from tests.kernel.conftest import ARTIFACTS_ENV, GUEST_ENV

REPO = Path(__file__).resolve().parents[2]
BOOT_AND_RUN_TIMEOUT_S = 40 * 60  # a hung guest must not hang CI; the tier takes a fraction of this
PASSED_ENV = ("KUBEBUILDER_ASSETS", "CI", "HOME", "PATH")


def _guest_command(rwdir: Path) -> str:
    env = {GUEST_ENV: "1", ARTIFACTS_ENV: str(rwdir), "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONUNBUFFERED": "1",
           **{k: os.environ[k] for k in PASSED_ENV if k in os.environ}}
    pytest_argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "-rA",
                   "--basetemp=/tmp/fabmesh-kernel-tier", f"--junitxml={rwdir / 'junit.xml'}",
                   "tests/kernel/inside"]
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    return f"cd {shlex.quote(str(REPO))} && exec env {exports} {shlex.join(pytest_argv)}"


def _summary(junit: Path) -> str:
    suite = ET.parse(junit).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    assert suite is not None
    return ", ".join(f"{k}={suite.get(k)}" for k in ("tests", "failures", "errors", "skipped", "time"))


def test_kernel_backend_tier_passes_inside_a_vm_with_esp(tmp_path: Path) -> None:
    require_root_tools("ip")
    try:
        vm.check_tools()
        kernel = vm.kernel_image()
        kvm = os.environ.get("FABMESH_VM_KVM") == "1"
        argv = vm.vng_command(kernel, tmp_path, _guest_command(tmp_path), kvm=kvm, cpus=os.cpu_count() or 2)
    except vm.VmUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{exc} (CI must not skip)")
        pytest.skip(str(exc))
    console = tmp_path / "console.log"
    started = time.monotonic()
    with open(console, "wb") as out:
        try:
            done = subprocess.run(argv, cwd=REPO, env=vm.host_env(), stdin=subprocess.DEVNULL, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=BOOT_AND_RUN_TIMEOUT_S, start_new_session=True)
            rc: int | str = done.returncode
        except subprocess.TimeoutExpired:
            rc = f"timeout after {BOOT_AND_RUN_TIMEOUT_S}s"
    seconds = time.monotonic() - started
    text = console.read_text(errors="replace")
    junit = tmp_path / "junit.xml"
    summary = _summary(junit) if junit.exists() else "no JUnit report: the guest's pytest never finished"
    print(f"kernel tier: {kernel.name}, {'KVM' if kvm else 'software emulation'}, {seconds:.0f}s: {summary}")
    print(text[-20000:])
    logs = tmp_path / "mesh-logs.txt"
    where = f" (the mesh's logs: {logs})" if logs.exists() else ""
    assert rc == 0 and junit.exists(), f"the guest's pytest failed (exit {rc}; {summary}){where}:\n{text[-12000:]}"
