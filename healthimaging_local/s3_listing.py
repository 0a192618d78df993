"""ListObjectsV2 pages at the cost of a page, not of the bucket, for moto 5.2's S3 backend.

moto answers every ListObjectsV2 page by filtering and sorting the whole bucket and then skipping to the
continuation token: 685 ms a page in a bucket of 100,000 keys on this project's machines, 68 s for one listing of
them (S3 answers a page in tens of milliseconds). A planner that lists a day before it imports it would measure
moto, not itself.

:func:`install` replaces ``S3Backend.list_objects_v2`` for listings without a delimiter (what bulk readers use):
the first page sorts the keys under the prefix once and keeps that order under its continuation token; a later
page continues from its place in it while the bucket holds as many keys as then, and sorts again (from the
token's key on) when it does not. Each object is read as it is now. So, as in S3, a page lists what is there when
it is asked for: an object deleted during a listing is not listed, and one created after the listing's position
is. (One deleted and another created between two pages leave the count equal: the new one is missed.) Two
listings of one prefix that reach the same key share a token, and its place, harmlessly. Listings with a
delimiter and ``MaxKeys=0`` go to moto's own code.
"""

from __future__ import annotations

import bisect
import hashlib
import threading
from collections import OrderedDict
from typing import Any

#: Listings in progress kept at once (least recently continued dropped first: its next page starts over).
MAX_SNAPSHOTS = 64

_lock = threading.Lock()
_installed = False
#: continuation token -> (sorted names under the prefix, the next page's place in them, the bucket's key count)
_snapshots: OrderedDict[str, tuple[list[str], int, int]] = OrderedDict()


def list_objects_v2(
    backend: Any,
    bucket: Any,
    prefix: str | None,
    delimiter: str | None,
    continuation_token: str | None,
    start_after: str | None,
    max_keys: int,
) -> tuple[list[Any], bool, str | None]:
    """One page of keys under ``prefix`` (moto's ``list_objects_v2`` contract, no delimiter).

    :param backend: moto's S3 backend (its ``_pagination_tokens`` learn the tokens given out, as moto's own do)
    :param bucket: moto's bucket
    :param prefix: the key prefix, or None
    :param delimiter: must be None here
    :param continuation_token: the previous page's token, or None
    :param start_after: list keys after this one (first page only)
    :param max_keys: the most keys in the page (> 0)
    :return: the page's keys, whether more follow, the next page's token
    """
    from moto.s3.exceptions import InvalidContinuationToken
    from moto.s3.models import FakeDeleteMarker

    with _lock:
        snapshot = _snapshots.get(continuation_token) if continuation_token else None
        if snapshot is not None:
            _snapshots.move_to_end(str(continuation_token))
    if snapshot is not None and snapshot[2] == len(bucket.keys):
        names, start, count = snapshot
    else:  # a first page, a dropped snapshot, or the bucket gained or lost keys since the last page
        after = backend._pagination_tokens.get(continuation_token) if continuation_token else start_after
        if continuation_token and after is None:
            raise InvalidContinuationToken()
        count = len(bucket.keys)
        names = sorted(name for name in list(bucket.keys.keys()) if name.startswith(prefix or ""))
        start = bisect.bisect_right(names, after) if after else 0
    page: list[Any] = []
    position = start
    while position < len(names) and len(page) < max_keys:
        key = bucket.keys.get(names[position])
        if key is not None and not isinstance(key, FakeDeleteMarker):
            page.append(key)
        position += 1
    if position >= len(names) or not page:
        return page, False, None
    last = page[-1].name
    token = hashlib.md5(f"{bucket.name}\0{prefix or ''}\0{last}".encode(), usedforsecurity=False).hexdigest()
    with _lock:
        backend._pagination_tokens[token] = last
        _snapshots[token] = (names, position, count)
        while len(_snapshots) > MAX_SNAPSHOTS:
            _snapshots.popitem(last=False)
    return page, True, token


def install() -> None:
    """Serve moto's delimiter-less ListObjectsV2 from :func:`list_objects_v2` (idempotent, process-wide)."""
    global _installed
    with _lock:
        if _installed:
            return
        from moto.s3.models import S3Backend

        moto_list_objects_v2 = S3Backend.list_objects_v2

        def indexed(self: Any, **listing: Any) -> Any:  # moto passes every argument by name
            from moto.s3.models import FakeTableStorageBucket

            if (
                listing["delimiter"]
                or listing["max_keys"] <= 0
                or isinstance(listing["bucket"], FakeTableStorageBucket)
            ):
                return moto_list_objects_v2(self, **listing)
            return list_objects_v2(self, **listing)

        S3Backend.list_objects_v2 = indexed  # type: ignore[method-assign,assignment]
        _installed = True
