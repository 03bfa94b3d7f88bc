"""Timestamps: the stored form, and the original's forms normalised to it."""

from __future__ import annotations

import pytest

from anon_ticket.domain.timefmt import parse_legacy, rfc3339


def test_rfc3339_is_utc_with_microseconds() -> None:
    assert rfc3339(1_800_000_000.0) == "2027-01-15T08:00:00.000000Z"
    assert rfc3339(0.25) == "1970-01-01T00:00:00.250000Z"


@pytest.mark.parametrize(("text", "want"), [
    ("2025-11-20T12:34:56.123456789+00:00", "2025-11-20T12:34:56.123456Z"),  # SeaORM
    ("2025-11-20 12:34:56", "2025-11-20T12:34:56.000000Z"),  # CURRENT_TIMESTAMP
    ("2025-11-20T12:34:56Z", "2025-11-20T12:34:56.000000Z"),
    ("2025-11-20T12:34:56.5+02:00", "2025-11-20T10:34:56.500000Z"),
    ("2025-11-20T23:30:00-01:00", "2025-11-21T00:30:00.000000Z"),
    ("0999-01-01 00:00:00", "0999-01-01T00:00:00.000000Z"),  # four-digit year, as RFC 3339
])
def test_parse_legacy_forms(text: str, want: str) -> None:
    assert parse_legacy(text) == want


@pytest.mark.parametrize("text", ["", "yesterday", "2025-13-01 00:00:00",
                                  "2025-11-20T12:34:56.x+00:00"])
def test_parse_legacy_refuses_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        parse_legacy(text)
