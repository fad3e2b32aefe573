"""Kubernetes timestamps (RFC 3339, UTC, whole seconds) read and written one way everywhere (pure).

The operator, the node's status writer and the plugin compare times that another process wrote;
one parser that treats a naive time as UTC and a malformed one as absent keeps them agreeing.
"""

from __future__ import annotations

from datetime import UTC, datetime


def parse_time(text: str | None) -> datetime | None:
    """An aware datetime, or None for an empty or malformed value (never raises on what others wrote)."""
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def format_time(moment: datetime) -> str:
    """``2026-12-02T01:02:03Z``: what the API server writes in ``metadata`` and what we write back."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
