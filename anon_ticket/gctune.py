"""The cyclic garbage collector's settings for a long-running server process.

Python's default runs a young collection every 700 net allocations of tracked objects. Under
HTTP load that scanned each in-flight request's objects (hypercorn's, quart's, ours) again
and again: 9 to 12% of a server's CPU went to the collector, the trivial quart-trio app's as
much as ours. At 10,000 most of them are gone before a collection comes (about 1%), with
young pauses of a few milliseconds; cycles wait a little longer to be collected. And what
start-up built lives as long as the process, so it is frozen out of every later collection.
"""

from __future__ import annotations

import gc

GEN0_THRESHOLD = 10_000  # young collections (Python's default: 700)


def settle() -> tuple[int, int, int]:
    """Call once start-up is done; returns the thresholds it replaced (for `restore`)."""
    previous = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(GEN0_THRESHOLD, previous[1], previous[2])
    return previous


def restore(previous: tuple[int, int, int]) -> None:
    gc.set_threshold(*previous)
    gc.unfreeze()
