"""A private cgroup v1 subtree per lab node: created before kubelet starts, emptied and removed at teardown.

kubelet's ``cgroupRoot`` must already exist in every v1 hierarchy it uses, and
cpuset children start with empty ``cpus``/``mems`` (a task cannot join them), so
the root copies both from the top. The node's containerd is started inside
``<root>/runtime``: its shims inherit that cgroup and the containers go under
``<root>/kubepods``, so every process the node ever started is found by
reading ``cgroup.procs`` in the subtree, even after containerd and the shims
have daemonized away from the process that spawned them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

CGROUP_MOUNTS = Path("/proc/self/mounts")


def v1_hierarchies(mounts: str | None = None) -> list[Path]:
    """Mount points of the cgroup v1 hierarchies (one per controller set; not the v2 ``unified``)."""
    text = CGROUP_MOUNTS.read_text() if mounts is None else mounts
    return sorted(Path(fields[1]) for fields in (line.split() for line in text.splitlines())
                  if len(fields) > 2 and fields[2] == "cgroup")


def all_hierarchies(mounts: str | None = None) -> list[Path]:
    """The v1 hierarchies and the v2 ``unified`` mount: runc also makes the container's cgroup there."""
    text = CGROUP_MOUNTS.read_text() if mounts is None else mounts
    return sorted(Path(fields[1]) for fields in (line.split() for line in text.splitlines())
                  if len(fields) > 2 and fields[2] in ("cgroup", "cgroup2"))


def create(root: str, children: tuple[str, ...] = ("runtime",)) -> None:
    """mkdir ``root`` (and ``children``) in every v1 hierarchy; cpuset gets its parent's cpus and mems."""
    for hierarchy in v1_hierarchies():
        for relative in ("", *children):
            path = hierarchy / root.strip("/") / relative
            path.mkdir(parents=True, exist_ok=True)
            for knob in ("cpuset.cpus", "cpuset.mems"):
                if (path / knob).exists() and not (path / knob).read_text().strip():
                    (path / knob).write_text((path.parent / knob).read_text())


def join_files(root: str, child: str = "runtime") -> list[Path]:
    """The ``cgroup.procs`` files a process writes its PID to, to live in ``<root>/<child>``."""
    return [h / root.strip("/") / child / "cgroup.procs" for h in v1_hierarchies()]


def pids(root: str) -> set[int]:
    """Every process in the subtree, in any hierarchy."""
    found: set[int] = set()
    for hierarchy in v1_hierarchies():
        base = hierarchy / root.strip("/")
        if not base.is_dir():
            continue
        for procs in base.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                found.update(int(p) for p in procs.read_text().split())
    return found


def kill_all(root: str, timeout: float = 10.0) -> None:
    """SIGKILL every process in the subtree until none is left (a dying shim may still fork)."""
    deadline = time.monotonic() + timeout
    while (left := pids(root)) and time.monotonic() < deadline:
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    if left:
        raise RuntimeError(f"cgroup {root}: processes {sorted(left)} survived SIGKILL for {timeout:.0f}s")


def remove(root: str) -> None:
    """rmdir the subtree bottom-up in every hierarchy, ``unified`` too (cgroup dirs only go empty-first)."""
    for hierarchy in all_hierarchies():
        base = hierarchy / root.strip("/")
        if not base.is_dir():
            continue
        for directory in sorted((p for p in base.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            with contextlib.suppress(FileNotFoundError):
                directory.rmdir()
        with contextlib.suppress(FileNotFoundError):
            base.rmdir()
