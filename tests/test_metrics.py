"""The metrics registry's own collectors."""

from __future__ import annotations

import gc

from prometheus_client import generate_latest

from anon_ticket.metrics import Metrics


def test_gc_times_count_and_time_collections_by_generation() -> None:
    metrics = Metrics()
    gc.callbacks.append(metrics.gc_times)
    try:
        gc.collect(0)
        gc.collect()
    finally:
        gc.callbacks.remove(metrics.gc_times)
    times = metrics.gc_times
    assert times.collections[0] >= 1 and times.collections[2] >= 1
    assert times.seconds[2] > 0
    text = generate_latest(metrics.registry).decode()
    assert f'anon_ticket_gc_collections_total{{generation="2"}} {float(times.collections[2])}' \
        in text
    assert 'anon_ticket_gc_seconds_total{generation="0"}' in text
