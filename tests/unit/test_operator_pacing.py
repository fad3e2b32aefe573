"""The operator's pass pacing: quick for one change, bounded for a flapping Node (simulated clock)."""

from __future__ import annotations

from itertools import pairwise

import pytest

from fabmesh.operator.loop import DEBOUNCE_S, MIN_PASS_INTERVAL_S, Pacer

pytestmark = pytest.mark.unit


def passes_started(event_times: list[float], pass_s: float, until: float) -> list[float]:
    """Drive a Pacer like OperatorLoop.work: wait for an event, wait the delay, run a pass."""
    pacer, starts, now, pending = Pacer(), [], 0.0, sorted(event_times)
    while True:
        pending = [t for t in pending if t > (starts[-1] if starts else -1.0)]
        if not pending:
            return starts
        now = max(now, pending[0])  # dirty.wait() returns at the first event since the last pass began
        start = now + pacer.delay(now)
        if start > until:
            return starts
        pacer.started(start)
        starts.append(start)
        now = start + pass_s


def test_a_single_change_after_a_quiet_spell_is_acted_on_after_the_debounce_only() -> None:
    assert passes_started([0.0, 5.0], pass_s=0.05, until=10.0) == [DEBOUNCE_S, 5.0 + DEBOUNCE_S]


@pytest.mark.parametrize("pass_s", [0.0, 0.05, 0.5, 2.0], ids=lambda s: f"pass-{s}s")
def test_a_node_flapping_every_10ms_cannot_drive_more_than_one_pass_per_interval(pass_s: float) -> None:
    flapping = [i * 0.01 for i in range(1000)]  # ten seconds of watch events
    starts = passes_started(flapping, pass_s=pass_s, until=10.0)
    assert len(starts) <= 10.0 / MIN_PASS_INTERVAL_S + 1
    assert all(b - a >= MIN_PASS_INTERVAL_S - 1e-9 for a, b in pairwise(starts))
    assert starts[-1] >= 10.0 - max(MIN_PASS_INTERVAL_S, pass_s) - DEBOUNCE_S  # events keep being served
