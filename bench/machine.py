"""What the benchmarks record about the machine they ran on (every figure names its machine)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from fabmesh.testenv.hosts import CHARON


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    strongswan = subprocess.run([str(CHARON), "--version"], capture_output=True, text=True).stdout.strip()
    return {"nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release(), "python": platform.python_version(),
            "strongswan": strongswan or "?"}
