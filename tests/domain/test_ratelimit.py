"""The token bucket (anon_ticket/domain/ratelimit.py): pure, on a given clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from anon_ticket.domain.ratelimit import TokenBucket


def test_a_burst_is_free_then_each_token_waits_its_turn() -> None:
    bucket = TokenBucket(rate=10, burst=3, max_wait=1.0)
    assert [bucket.reserve(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.reserve(0.0) == pytest.approx(0.1)
    assert bucket.reserve(0.0) == pytest.approx(0.2)


def test_past_the_longest_wait_nothing_is_taken() -> None:
    bucket = TokenBucket(rate=10, burst=1, max_wait=0.25)
    assert bucket.reserve(0.0) == 0.0
    assert bucket.reserve(0.0) == pytest.approx(0.1)
    assert bucket.reserve(0.0) == pytest.approx(0.2)
    assert bucket.reserve(0.0) is None  # would be 0.3
    assert bucket.reserve(0.0) is None  # and it took nothing: still 0.3
    assert bucket.reserve(1.0) == 0.0  # refilled, up to the burst


def test_it_refills_at_its_rate_up_to_the_burst() -> None:
    bucket = TokenBucket(rate=2, burst=4, max_wait=0)
    for _ in range(4):
        assert bucket.reserve(0.0) == 0.0
    assert bucket.reserve(0.0) is None
    assert bucket.reserve(0.5) == 0.0  # one token back after half a second
    assert bucket.reserve(0.5) is None
    assert [bucket.reserve(100.0) for _ in range(5)] == [0.0, 0.0, 0.0, 0.0, None]


@given(st.lists(st.floats(min_value=0, max_value=5), min_size=1, max_size=200))
def test_never_more_than_rate_times_time_plus_burst(gaps: list[float]) -> None:
    rate, burst = 7.0, 3.0
    bucket = TokenBucket(rate, burst, max_wait=2.0)
    now = 0.0
    due: list[float] = []
    for gap in gaps:
        now += gap
        wait = bucket.reserve(now)
        if wait is not None:
            assert 0 <= wait <= 2.0
            due.append(now + wait)
    due.sort()
    for i, t in enumerate(due):  # the (i+1)-th token is never due before it is earned
        assert i + 1 <= burst + rate * t + 1e-6
