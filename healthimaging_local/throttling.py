"""Request rates of the HealthImaging operations, enforced as token buckets (``ThrottlingException``, HTTP 429).

The figures are AWS's documented TPS (sustained rate / burst) per account and region, from
https://docs.aws.amazon.com/healthimaging/latest/devguide/throttling-limits.html. An older copy of that page gives
StartDICOMImportJob 0.25/1, which is why every rate is a setting. By default the endpoint enforces only the two
operations a pipeline hammers, StartDICOMImportJob (1/s, burst 2) and GetDICOMImportJob (25/s, burst 50);
``serve --documented-rate-limits`` enforces the whole table.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping


@dataclass(frozen=True)
class RateLimit:
    """A sustained rate with a burst.

    :param rate: tokens added per second (0 switches the limit off).
    :param burst: the bucket's size: requests allowed at once after a quiet period.
    """

    rate: float
    burst: int

    @property
    def enforced(self) -> bool:
        """Whether this limit throttles at all."""
        return self.rate > 0 and self.burst > 0


DOCUMENTED_RATE_LIMITS: dict[str, RateLimit] = {
    "CreateDatastore": RateLimit(0.085, 1),
    "GetDatastore": RateLimit(10, 20),
    "ListDatastores": RateLimit(5, 10),
    "DeleteDatastore": RateLimit(0.085, 1),
    "StartDICOMImportJob": RateLimit(1, 2),
    "GetDICOMImportJob": RateLimit(25, 50),
    "ListDICOMImportJobs": RateLimit(10, 20),
    "SearchImageSets": RateLimit(25, 50),
    "GetImageSet": RateLimit(25, 50),
    "GetImageSetMetadata": RateLimit(50, 100),
    "ListImageSetVersions": RateLimit(25, 50),
    "DeleteImageSet": RateLimit(0.25, 1),
}
PIPELINE_OPERATIONS = ("StartDICOMImportJob", "GetDICOMImportJob")


def default_rate_limits() -> dict[str, RateLimit]:
    """The limits enforced unless configured otherwise: the documented ones of StartDICOMImportJob and GetDICOMImportJob."""
    return {name: DOCUMENTED_RATE_LIMITS[name] for name in PIPELINE_OPERATIONS}


def parse_rate_limit(text: str) -> tuple[str, RateLimit]:
    """Parse ``Operation=RATE[/BURST]`` (burst defaults to the rate rounded up, at least 1).

    :param text: e.g. ``SearchImageSets=25/50`` or ``DeleteImageSet=0``.
    :raises ValueError: on an unknown operation or a malformed or negative figure.
    """
    name, sep, figures = text.partition("=")
    if not sep or name not in DOCUMENTED_RATE_LIMITS:
        known = ", ".join(DOCUMENTED_RATE_LIMITS)
        raise ValueError(f"expected OPERATION=RATE[/BURST] with OPERATION one of {known}; got {text!r}")
    rate_text, _, burst_text = figures.partition("/")
    rate = float(rate_text)
    burst = int(burst_text) if burst_text else max(1, math.ceil(rate))
    if rate < 0 or burst < 0 or not math.isfinite(rate):
        raise ValueError(f"rate and burst must be finite and >= 0; got {text!r}")
    return name, RateLimit(rate, burst)


def rate_limits(
    start: RateLimit,
    get: RateLimit,
    documented_others: bool = False,
    overrides: Iterable[tuple[str, RateLimit]] = (),
) -> dict[str, RateLimit]:
    """The limits the ``serve`` flags describe (later entries win: table, then start/get, then overrides).

    :param start: StartDICOMImportJob's limit.
    :param get: GetDICOMImportJob's limit.
    :param documented_others: also enforce the documented limits of every other operation.
    :param overrides: ``(operation, limit)`` pairs from ``--rate-limit``.
    """
    limits = dict(DOCUMENTED_RATE_LIMITS) if documented_others else {}
    limits.update({"StartDICOMImportJob": start, "GetDICOMImportJob": get})
    limits.update(overrides)
    return {name: limit for name, limit in limits.items() if limit.enforced}


class TokenBucket:
    """A token bucket, full at first: each request takes one token, tokens come back at ``rate`` per second.

    :param limit: rate and burst.
    :param clock: monotonic seconds (for tests).
    """

    def __init__(self, limit: RateLimit, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self._clock = clock
        self._tokens = float(limit.burst)
        self._updated = clock()
        self._lock = threading.Lock()

    def take(self) -> bool:
        """Take a token if one is left (True), else leave the bucket as it is (False)."""
        with self._lock:
            now = self._clock()
            elapsed = max(0.0, now - self._updated)
            self._tokens = min(float(self.limit.burst), self._tokens + elapsed * self.limit.rate)
            self._updated = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            return False


class RateLimiter:
    """One token bucket per limited operation (per account and region, as AWS counts them).

    :param limits: operation name to its limit; operations not named are not limited.
    :param clock: monotonic seconds (for tests).
    """

    def __init__(self, limits: Mapping[str, RateLimit], clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = {name: limit for name, limit in limits.items() if limit.enforced}
        self._buckets = {name: TokenBucket(limit, clock) for name, limit in self.limits.items()}

    def allow(self, operation: str) -> bool:
        """Whether a request of ``operation`` may go ahead now (taking its token).

        :param operation: the operation name, e.g. ``StartDICOMImportJob``.
        """
        bucket = self._buckets.get(operation)
        return bucket is None or bucket.take()
