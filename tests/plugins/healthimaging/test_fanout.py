"""ordered_map: results in input order, a bounded number ahead, errors where they belong."""

from __future__ import annotations

import threading
import time

import pytest

from healthimaging.fanout import ordered_map


def test_results_come_in_input_order_though_calls_end_out_of_order() -> None:
    def slow_for_small(n: int) -> int:
        time.sleep(0.002 * (10 - n))
        return n * n

    assert list(ordered_map(slow_for_small, range(10), workers=4)) == [n * n for n in range(10)]


def test_calls_run_at_once_up_to_workers() -> None:
    running, most = 0, 0
    lock = threading.Lock()

    def call(_: int) -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.02)
        with lock:
            running -= 1

    list(ordered_map(call, range(12), workers=3))
    assert most == 3


def test_no_more_than_twice_the_workers_are_submitted_ahead_of_the_consumer() -> None:
    submitted = []
    results = ordered_map(lambda n: n, (submitted.append(n) or n for n in range(100)), workers=2)
    assert next(results) == 0
    assert len(submitted) <= 5


def test_the_first_error_is_raised_in_its_place() -> None:
    def fail_on_three(n: int) -> int:
        if n == 3:
            raise ValueError("three")
        return n

    results = ordered_map(fail_on_three, range(10), workers=4)
    assert [next(results) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="three"):
        next(results)


def test_one_worker_calls_in_this_thread() -> None:
    threads = list(ordered_map(lambda _: threading.current_thread(), range(3), workers=1))
    assert threads == [threading.current_thread()] * 3


def test_rate_limit_spaces_calls_from_every_thread() -> None:
    from healthimaging.fanout import RateLimit

    clock = [0.0]
    limit = RateLimit(4.0, clock=lambda: clock[0], sleep=lambda s: None)
    assert [limit.reserve() for _ in range(3)] == [0.0, 0.25, 0.5]
    clock[0] = 10.0  # idle for long: no credit is banked, the next call goes at once
    assert limit.reserve() == 0.0
    assert RateLimit(0).reserve() == 0.0


def test_a_shared_rate_limit_spaces_the_calls_of_every_thread() -> None:
    from healthimaging.fanout import RateLimit

    limit = RateLimit(50.0)
    began: list[float] = []

    def call(_: int) -> None:
        limit.acquire()
        began.append(time.monotonic())

    list(ordered_map(call, range(6), workers=3))
    assert max(began) - min(began) >= 5 / 50.0 * 0.9
