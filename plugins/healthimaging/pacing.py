"""
Pace StartDICOMImportJob calls across every run, backfill and worker, from the service's own state.

The service is the one place all runs share, so the gate asks it: ``ListDICOMImportJobs`` for the jobs that are
SUBMITTED or IN_PROGRESS in the data store. A new job may start when fewer than ``max_imports_in_flight`` are in
flight and the newest was submitted at least ``1 / start_rate`` seconds ago. Otherwise the start task defers for
the time left (it holds no worker slot while it waits) and asks again.

A task that starts many jobs (the import pipeline's ``start_imports``) waits in process with :class:`StartPacer`
instead. Two workers that ask at the same instant may both start: StartDICOMImportJob's documented burst (2) absorbs that,
and the operator's own backoff absorbs a ThrottlingException or ServiceQuotaExceededException beyond it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger(__name__)

IN_FLIGHT_STATUSES = ("SUBMITTED", "IN_PROGRESS")
#: Shortest and longest wait for a free slot (seconds): a job in flight takes minutes, so poll slowly then.
MIN_WAIT = 1.0
FULL_WAIT = 60.0
#: How much later than this process's start call the service may stamp that job's submittedAt.
OWN_START_SKEW = timedelta(seconds=5)
#: Seconds a listing of the jobs in flight stands for :class:`StartPacer`: between listings it counts its own
#: starts, and lists before every start once that count comes near the limit.
LISTING_MAX_AGE = 10.0


@dataclass(frozen=True)
class StartPace:
    """How fast import jobs may start in one data store.

    :param start_rate: StartDICOMImportJob calls per second
    :param max_imports_in_flight: jobs SUBMITTED or IN_PROGRESS at once
    """

    start_rate: float
    max_imports_in_flight: int

    def __post_init__(self) -> None:
        if self.start_rate <= 0:
            raise ValueError(f"start_rate must be > 0, got {self.start_rate}")
        if self.max_imports_in_flight < 1:
            raise ValueError(f"max_imports_in_flight must be >= 1, got {self.max_imports_in_flight}")

    @classmethod
    def from_config(cls) -> StartPace:
        """The ``[healthimaging] start_rate`` and ``max_imports_in_flight`` settings."""
        from healthimaging import config

        return cls(config.start_rate(), config.max_imports_in_flight())


def jobs_in_flight(client: Any, datastore_id: str, limit: int) -> tuple[int, datetime | None]:
    """Count the data store's jobs in flight (up to ``limit``) and find the newest submission.

    :param client: a boto3 ``medical-imaging`` client
    :param datastore_id: the data store
    :param limit: stop counting here
    :return: (jobs in flight, newest ``submittedAt`` among them or None)
    """
    count = 0
    newest: datetime | None = None
    for status in IN_FLIGHT_STATUSES:
        kwargs: dict[str, Any] = {"datastoreId": datastore_id, "jobStatus": status, "maxResults": 50}
        while count < limit:
            page = client.list_dicom_import_jobs(**kwargs)
            for job in page.get("jobSummaries", []):
                count += 1
                submitted = job.get("submittedAt")
                if isinstance(submitted, datetime) and (newest is None or submitted > newest):
                    newest = submitted
            if not page.get("nextToken"):
                break
            kwargs["nextToken"] = page["nextToken"]
    return min(count, limit), newest


def seconds_until_start(
    client: Any,
    datastore_id: str,
    pace: StartPace,
    now: datetime | None = None,
    shortest: float = MIN_WAIT,
) -> float:
    """How long to wait before the next StartDICOMImportJob call in this data store (0: start now).

    :param client: a boto3 ``medical-imaging`` client
    :param datastore_id: the data store
    :param pace: the pace to keep
    :param now: the current time (tests pass one)
    :param shortest: the shortest wait returned when any is needed (a task that defers for it pays seconds of
        scheduling; one that sleeps in process passes 0)
    """
    in_flight, newest = jobs_in_flight(client, datastore_id, pace.max_imports_in_flight)
    if in_flight >= pace.max_imports_in_flight:
        return FULL_WAIT
    if newest is None:
        return 0.0
    now = now or datetime.now(UTC)
    left = 1.0 / pace.start_rate - (now - newest).total_seconds()
    return max(shortest, left) if left > 0 else 0.0


class StartPacer:
    """Block until the next StartDICOMImportJob call keeps the pace (for one task that starts many jobs).

    Asks the service (:func:`jobs_in_flight`) at most every :data:`LISTING_MAX_AGE` seconds, and before every start
    once the jobs last seen in flight plus its own starts since come within what other runs could have started
    meanwhile (``start_rate * LISTING_MAX_AGE``) of the limit; again only while the data store is full. Between
    listings it counts its own starts: a listing per start cost more than the start itself, and spaced the starts
    wider than ``1 / start_rate``. It spaces its starts by its own clock, and from the service's newest
    ``submittedAt`` (right after a listing) only when that job is not its own last start (another run's): the
    service stamps a job a moment after the call, so spacing from the stamp would add that moment to every
    interval. It sleeps exactly the time left, so starts come ``1 / start_rate`` apart.

    :param client: a boto3 ``medical-imaging`` client
    :param datastore_id: the data store
    :param pace: the pace to keep
    :param sleep: the sleep function (tests pass a fake)
    :param clock: monotonic seconds (tests pass a fake)
    """

    def __init__(
        self,
        client: Any,
        datastore_id: str,
        pace: StartPace,
        sleep: Callable[[float], None] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.client = client
        self.datastore_id = datastore_id
        self.pace = pace
        self.sleep = sleep or time.sleep
        self.clock = clock or time.monotonic
        self._last: float | None = None
        self._last_started: datetime | None = None
        self._listed_at: float | None = None
        self._seen_in_flight = 0
        self._own_since_listing = 0

    def _needs_listing(self) -> bool:
        if self._listed_at is None or self.clock() - self._listed_at >= LISTING_MAX_AGE:
            return True
        # other runs' starts since the listing, which it does not see
        unseen = max(2, math.ceil(self.pace.start_rate * LISTING_MAX_AGE))
        return self._seen_in_flight + self._own_since_listing + unseen >= self.pace.max_imports_in_flight

    def __call__(self) -> None:
        interval = 1.0 / self.pace.start_rate
        newest: datetime | None = None
        if self._needs_listing():
            while True:
                in_flight, newest = jobs_in_flight(
                    self.client, self.datastore_id, self.pace.max_imports_in_flight
                )
                if in_flight < self.pace.max_imports_in_flight:
                    break
                log.info(
                    "Data store %s has %d imports in flight: waiting",
                    self.datastore_id,
                    self.pace.max_imports_in_flight,
                )
                self.sleep(FULL_WAIT)
            self._listed_at, self._seen_in_flight, self._own_since_listing = self.clock(), in_flight, 0
        wait = 0.0
        if newest is not None and not self._is_own(newest):  # another run's start: space from it too
            wait = interval - (datetime.now(UTC) - newest).total_seconds()
        # No second look after the sleep: a start another DAG made meanwhile is absorbed by StartDICOMImportJob's
        # burst (2), and a ThrottlingException or a full data store beyond it by the operator's own backoff.
        if self._last is not None:
            wait = max(wait, self._last + interval - self.clock())
        if wait > 0:
            self.sleep(wait)
        self._last = self.clock()
        self._last_started = datetime.now(UTC)
        self._own_since_listing += 1

    def _is_own(self, submitted: datetime) -> bool:
        """Whether the newest job in flight is this pacer's last start (the service stamps it a moment later).

        Spacing from the service's stamp would add that moment to every interval.
        """
        return self._last_started is not None and submitted <= self._last_started + OWN_START_SKEW
