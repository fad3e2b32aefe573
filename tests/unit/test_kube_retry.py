"""The pause a 429 asks for, bounded so a pass never sleeps long on one request."""

from __future__ import annotations

import json

import pytest

from fabmesh.kube.client import MAX_RETRY_AFTER_S, _retry_after


@pytest.mark.parametrize(("body", "pause"), [
    (json.dumps({"code": 429, "details": {"retryAfterSeconds": 1}}), 1.0),
    (json.dumps({"code": 429, "details": {"retryAfterSeconds": 30}}), MAX_RETRY_AFTER_S),
    (json.dumps({"code": 429, "details": {"retryAfterSeconds": 0}}), 0.1),
    (json.dumps({"code": 429}), 1.0),
    ("storage is (re)initializing", 1.0),
    ("", 1.0),
    (json.dumps(["not", "an", "object"]), 1.0),
])
def test_retry_after_is_what_the_server_asks_within_bounds(body: str, pause: float) -> None:
    assert _retry_after(body) == pause
