"""One reading of Kubernetes timestamps for the operator, the node's status writer and the plugin."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from fabmesh.mesh.timestamps import format_time, parse_time


@pytest.mark.parametrize(("text", "moment"), [
    ("2026-12-02T01:02:03Z", datetime(2026, 12, 2, 1, 2, 3, tzinfo=UTC)),
    ("2026-12-02T01:02:03", datetime(2026, 12, 2, 1, 2, 3, tzinfo=UTC)),  # naive: UTC
    ("2026-12-02T02:02:03+01:00", datetime(2026, 12, 2, 1, 2, 3, tzinfo=UTC)),
    ("", None),
    (None, None),
    ("yesterday", None),
])
def test_parse_time(text: str | None, moment: datetime | None) -> None:
    assert parse_time(text) == moment


def test_format_time_writes_utc_whole_seconds_and_reads_back() -> None:
    moment = datetime(2026, 12, 2, 2, 2, 3, 999, tzinfo=timezone(timedelta(hours=1)))
    assert format_time(moment) == "2026-12-02T01:02:03Z"
    assert format_time(datetime(2026, 12, 2, 1, 2, 3)) == "2026-12-02T01:02:03Z"
    assert parse_time(format_time(moment)) == moment.replace(microsecond=0)
