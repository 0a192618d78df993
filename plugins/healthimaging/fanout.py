"""Many independent service calls of one task, a few at a time, results in input order."""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

T = TypeVar("T")
R = TypeVar("R")

#: Calls in flight at once: under botocore's default connection pool (10) and gentle on the service.
DEFAULT_WORKERS = 8
#: Per-job calls begun per second where each makes one GetDICOMImportJob (the service allows 25 per second).
JOB_CALLS_PER_SECOND = 20.0


class RateLimit:
    """Space calls made from any thread to at most ``rate`` per second (0 or less: no limit).

    :param rate: calls per second
    :param clock: monotonic seconds (tests pass a fake)
    :param sleep: the sleep function (tests pass a fake)
    """

    def __init__(
        self,
        rate: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.rate = rate
        self._clock, self._sleep = clock, sleep
        self._next = 0.0
        self._lock = threading.Lock()

    def reserve(self) -> float:
        """Take the next turn; return the seconds to wait for it (0: now)."""
        if self.rate <= 0:
            return 0.0
        with self._lock:
            now = self._clock()
            turn = max(now, self._next)
            self._next = turn + 1.0 / self.rate
        return turn - now

    def acquire(self) -> None:
        """Wait for this call's turn."""
        delay = self.reserve()
        if delay > 0:
            self._sleep(delay)


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int = DEFAULT_WORKERS) -> Iterator[R]:
    """``map(fn, items)`` with up to ``workers`` calls in flight, yielding results in the order of ``items``.

    At most ``2 * workers`` results are held ahead of the consumer, so memory stays bounded however many items
    there are (``ThreadPoolExecutor.map`` submits them all at once). The first exception is raised where its
    result would have been yielded; calls already in flight finish first. ``fn`` must be thread-safe (boto3
    clients are); to keep under a service's rate, it takes a turn of a shared :class:`RateLimit` before its call.

    :param fn: the call to make for each item
    :param items: the inputs
    :param workers: the most calls in flight; 1 calls ``fn`` in this thread
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="healthimaging-fanout") as pool:
        pending: deque[Future[R]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # an error or a consumer that stops early: start no more calls
            for future in pending:
                future.cancel()
