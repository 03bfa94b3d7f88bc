"""Timestamps as stored and served: RFC 3339, UTC, microseconds, `Z` suffix (pure)."""

from __future__ import annotations

from datetime import UTC, datetime


def rfc3339(epoch_seconds: float) -> str:
    """`2026-11-23T17:14:57.123456Z` for a POSIX time."""
    return _utc_text(datetime.fromtimestamp(epoch_seconds, UTC))


def _utc_text(dt: datetime) -> str:
    # isoformat, not strftime: ten times faster (a legacy import formats every row) and it
    # pads years below 1000 to four digits, as RFC 3339 wants.
    return dt.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def parse_legacy(text: str) -> str:
    """Normalise a datetime from the original's database to our form.

    Accepts RFC 3339 with any fractional digits and an offset (`...123456789+00:00`) and
    SQLite's naive `CURRENT_TIMESTAMP` (`2025-11-20 12:34:56`, which is UTC).
    Raises ValueError on anything else.
    """
    s = text.strip().replace(" ", "T", 1)
    if s.endswith("Z"):
        s = s[:-1] + "+00:00"
    frac = ""
    main, offset = s, "+00:00"
    for sign in ("+", "-"):
        idx = s.rfind(sign)
        if idx > 10:
            main, offset = s[:idx], s[idx:]
            break
    if "." in main:
        main, frac = main.split(".", 1)
        if not frac.isdigit():
            raise ValueError(f"bad fractional seconds in {text!r}")
        frac = (frac + "000000")[:6]
    dt = datetime.fromisoformat(f"{main}.{frac or '000000'}{offset}")
    return _utc_text(dt)
