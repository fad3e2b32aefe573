"""Session-wide rules: on CI nothing may skip, and every tier leaves the machine as it found it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    tiers = {"unit", "api", "dataplane", "e2e", "kernel"}
    for item in items:
        tier = item.path.parent.name
        if tier in tiers and not any(item.iter_markers(name=t) for t in tiers):
            item.add_marker(getattr(pytest.mark, tier))


_skipped: list[str] = []
_namespaces_at_start: set[str] = set()


def _namespaces() -> set[str]:
    try:
        return {entry.name for entry in Path("/run/netns").iterdir()}
    except OSError:
        return set()


def live_processes() -> Iterator[tuple[Path, list[str]]]:
    """Each running (not zombie) process: its /proc directory and the fields of its stat after the name
    (state, ppid, pgrp, ...)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            yield stat.parent, fields


def _live_children() -> list[str]:
    """Processes whose parent is this pytest process and that are still running (not zombies)."""
    me = str(os.getpid())
    found = []
    for proc, fields in live_processes():
        if fields[1] == me:
            found.append(f"{proc.name}:{(proc / 'comm').read_text().strip()}")
    return found


def pytest_sessionstart(session: pytest.Session) -> None:
    _namespaces_at_start.update(_namespaces())


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Only the prefixes the tests use (fixtures: fmt*, labs: fmlab*, and cni-* that a real node's
    # containerd mounts for each Pod): a benchmark or a user's own lab beside the suite must not fail it.
    leaked_ns = sorted(n for n in _namespaces() - _namespaces_at_start if n.startswith(("fmt", "fmlab", "cni-")))
    leaked_procs = _live_children()
    if leaked_ns or leaked_procs:
        # Teardown must leave the machine as it found it; a leak fails the run.
        print(f"\nleft behind by this test session: namespaces={leaked_ns} processes={leaked_procs}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if os.environ.get("CI") == "true" and _skipped:
        # On CI a skip is a failure: every tier's tools must be there.
        print(f"\nCI=true and {len(_skipped)} test(s) skipped: {', '.join(_skipped[:10])}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def require_root_tools(*tools: str) -> None:
    """Skip loudly (never on CI) when the tier's tools are genuinely missing."""
    import shutil

    missing = [t for t in tools if shutil.which(t) is None]
    reason = None
    if os.geteuid() != 0:
        reason = "needs root (network namespaces)"
    elif missing:
        reason = f"missing tools: {', '.join(missing)}; run scripts/install-deps.sh"
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI must not skip)")
        pytest.skip(reason)
