"""The garbage collector's settings for a run: start-up objects frozen, young collections rarer.

CPython's defaults (a young collection every 700 net allocations, a full one when the
objects promoted since the last reach a quarter of the heap) suit short scripts. A run keeps
thousands of requests in flight, each a few dozen objects that live for the length of a
request: with the defaults most of them survive two young collections, reach the oldest
generation and trigger full collections of the whole heap. Measured on
``benchmarks.scale rate`` (2 cores, zero-latency simulator): 4,515 collections taking 7.3 s
of a 24 s run, and 20-odd full ones of 80-140 ms each, every one a stall of the event loop.

``tuned()`` does what asyncio servers commonly do after start-up: ``gc.freeze()`` moves the
objects made so far (modules, the config, the pydantic schemas: about 55,000) out of every
later collection, and a young threshold of ``YOUNG`` lets a request's objects die by
reference counting before they are ever examined. Same run: 29 collections, 0.5 s in all,
the largest 60 ms, none of them full. Reference cycles are still collected, just later;
the frozen start-up objects are handed back to the collector when the run ends.

The threshold counts allocations less deallocations, and deallocating an older object
counts too, so a young collection walks every object made since the last one and still
alive: at 2,000 requests a second most of the run's 60,000-75,000 live objects (units in
flight, queued branches, results waiting for the writer), 30-55 ms whatever the
threshold. A threshold of 50,000 rather than 10,000 keeps the pauses that size and makes
them rare: over 80 s of ``benchmarks.scale rate`` (240 chunks), 3 collections (63 ms in
all) against 36-119 (0.6-2.1 s in all, and 3-10 of the middle generation at up to 49 ms).
The cyclic garbage a run makes (mostly closed connections) is a few objects per hundred
requests, so the longer wait holds back a few megabytes at most.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

# Net allocations of tracked objects between young collections (CPython's default: 700).
YOUNG = 50_000


@contextmanager
def tuned(young: int = YOUNG) -> Iterator[None]:
    """Within: the objects that exist now frozen and the young threshold ``young``; both
    restored on leaving (the threshold to what it was)."""
    before = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(young, *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()
