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

:func:`answer` also writes the page's XML itself for a path-style request without a delimiter: moto renders each
key through its generic model serializer, about as slow as its sorting was. Anything else (virtual-host style,
delimiter, owner, a missing bucket, a bad token) is left to moto, which answers as before.
"""

from __future__ import annotations

import bisect
import hashlib
import threading
import uuid
from collections import OrderedDict
from typing import Any
from urllib.parse import parse_qs, quote, unquote
from xml.sax.saxutils import escape

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


#: Query parameters :func:`answer` handles; any other leaves the request to moto.
ANSWERED_PARAMETERS = frozenset(
    {"list-type", "prefix", "continuation-token", "start-after", "max-keys", "encoding-type"}
)
S3_NAMESPACE = "http://s3.amazonaws.com/doc/2006-03-01/"


def answer(environ: dict[str, Any]) -> tuple[str, list[tuple[str, str]], bytes] | None:
    """Answer a path-style ListObjectsV2 request without a delimiter, or None to leave it to moto.

    :param environ: the WSGI environ of an S3 request
    :return: status line, headers and body of the ``ListBucketResult``
    """
    from moto.s3.exceptions import InvalidContinuationToken, MissingBucket

    from healthimaging_local.s3 import backend

    if environ.get("REQUEST_METHOD") != "GET":
        return None
    query = {name: values[-1] for name, values in parse_qs(environ.get("QUERY_STRING", ""), True).items()}
    if query.get("list-type") != "2" or not set(query) <= ANSWERED_PARAMETERS:
        return None
    encoding = query.get("encoding-type")
    names = unquote(environ.get("PATH_INFO", "")).strip("/").split("/")
    if (
        encoding not in (None, "url")
        or len(names) != 1
        or not names[0]
        or query.get("continuation-token") == ""
    ):
        return None
    try:
        max_keys = int(query.get("max-keys", "1000"))
        s3 = backend()
        bucket = s3.get_bucket(names[0])
        prefix, token, after = query.get("prefix"), query.get("continuation-token"), query.get("start-after")
        if max_keys <= 0:
            return None
        page, truncated, next_token = list_objects_v2(s3, bucket, prefix, None, token, after, max_keys)
    except (ValueError, MissingBucket, InvalidContinuationToken):
        return None

    def text(value: str) -> str:
        return escape(quote(value) if encoding == "url" else value)

    parts = [
        f'<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult xmlns="{S3_NAMESPACE}">',
        f"<Name>{escape(bucket.name)}</Name><Prefix>{text(prefix or '')}</Prefix><MaxKeys>{max_keys}</MaxKeys>",
        f"<KeyCount>{len(page)}</KeyCount><IsTruncated>{'true' if truncated else 'false'}</IsTruncated>",
    ]
    for key in page:
        checksum = getattr(key, "checksum_algorithm", None)
        parts.append(
            f"<Contents><Key>{text(key.name)}</Key><LastModified>{key.last_modified_ISO8601}</LastModified>"
            f"<ETag>{escape(key.etag)}</ETag><Size>{key.size}</Size>"
            f"{f'<ChecksumAlgorithm>{escape(checksum)}</ChecksumAlgorithm>' if checksum else ''}"
            f"<StorageClass>{escape(key.storage_class)}</StorageClass></Contents>"
        )
    if encoding:
        parts.append(f"<EncodingType>{encoding}</EncodingType>")
    if token:
        parts.append(f"<ContinuationToken>{escape(token)}</ContinuationToken>")
    if next_token:
        parts.append(f"<NextContinuationToken>{next_token}</NextContinuationToken>")
    if after and not token:
        parts.append(f"<StartAfter>{text(after)}</StartAfter>")
    parts.append("</ListBucketResult>")
    body = "".join(parts).encode()
    headers = [
        ("Content-Type", "application/xml"),
        ("Content-Length", str(len(body))),
        ("x-amz-request-id", uuid.uuid4().hex.upper()[:16]),
    ]
    return "200 OK", headers, body


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
