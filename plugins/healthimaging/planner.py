"""
Plan the import of an S3 prefix of any size: one streamed listing, a folder tree, and the fewest input prefixes
(chunks) that each fit one import job.

How a prefix is split:

- The listing builds a folder tree with file counts, byte sums and nested-folder counts per folder.
- A folder that fits one job (files, bytes, nested folders, and no file over the per-file limit) is one chunk.
- A folder that does not fit is descended into. Its sub-folders that fit are packed together where one S3 key
  prefix holds exactly them and nothing else. S3 prefixes are string prefixes: ``day/P1`` holds ``day/P1/`` and
  ``day/P10/``, so packing works on a trie over the sibling names (see :func:`_pack`).
- Files that no prefix of their own can reach (loose files beside the sub-folders of a folder that does not fit,
  or more loose files in one folder than one job takes) are *staged*: copied server-side under
  ``<staging_s3_uri>/<run scope>/<chunk id>/<original key>`` (see :mod:`healthimaging.staging`) and imported from
  there. Staging is opt-in; without a staging prefix, planning raises :class:`StagingRequiredError`.
- A file over the per-file limit is refused: it is listed in the plan and imports nothing. No chunk prefix holds
  it, so the folder holding it never counts as fitting.

The plan is deterministic for one listing: keys are sorted, chunk ids are ``<ordinal>-<digest>``, and each chunk
carries a content digest (sha256 over the sorted key, ETag and size of its original objects).

Logs and :meth:`Plan.summary` (the XCom) name prefixes, counts and bytes only. Object keys, which can name
patients, are only in :meth:`Plan.document`, written to S3 with :func:`write_plan`.

This module imports neither boto3 nor botocore: clients are passed in.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import re
import tempfile
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from json.encoder import encode_basestring as _json_string
from operator import attrgetter
from os.path import commonprefix
from typing import IO, Any, NamedTuple

from healthimaging.validation import split_s3_uri

log = logging.getLogger(__name__)

PLAN_FORMAT = "healthimaging-import-plan/1"
STAGING_SETTING = "staging_s3_uri"
MAX_S3_URI_LENGTH = 1024  # StartDICOMImportJob inputS3Uri (service model)
MAX_KEY_BYTES = 1024  # S3 object keys
MAX_LABEL_LENGTH = 100
MAX_FOLDERS_NAMED = 20
_RUN_SCOPE = re.compile(r"[A-Za-z0-9._=-]{1,128}")
_BUCKET = re.compile(r"[a-z0-9][.\-a-z0-9]{1,61}[a-z0-9]")


class S3Object(NamedTuple):
    """What the plan keeps of one listed object (no response dicts).

    :param key: the object key
    :param size: bytes
    :param etag: the ETag without its quotes
    """

    key: str
    size: int
    etag: str


class RefusedObject(NamedTuple):
    """An object the plan does not import.

    :param key: the object key
    :param size: bytes
    :param etag: the ETag without its quotes
    :param reason: why (``FILE_TOO_LARGE``)
    """

    key: str
    size: int
    etag: str
    reason: str


@dataclass(frozen=True)
class ImportLimits:
    """What one import job takes (AWS quotas; "GB" read as 10**9 bytes, the smaller reading).

    :param max_files_per_job: files per job (quota L-685AAB3A, adjustable; default 5,000)
    :param max_bytes_per_job: total bytes per job (10 GB, not adjustable)
    :param max_folders_per_job: nested folders per job (10,000, not adjustable)
    :param max_file_bytes: bytes per file (10 GB today; older docs said 4 GB)
    """

    max_files_per_job: int = 5_000
    max_bytes_per_job: int = 10 * 1000**3
    max_folders_per_job: int = 10_000
    max_file_bytes: int = 10 * 1000**3

    def __post_init__(self) -> None:
        for name, value in self.as_dict().items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    def as_dict(self) -> dict[str, int]:
        """The limits by name (for the plan document and summary)."""
        return {
            "max_files_per_job": self.max_files_per_job,
            "max_bytes_per_job": self.max_bytes_per_job,
            "max_folders_per_job": self.max_folders_per_job,
            "max_file_bytes": self.max_file_bytes,
        }


class PlanError(ValueError):
    """The prefix cannot be planned as given; raised before any copy or import starts."""


class EmptyPrefixError(PlanError):
    """The listing holds no object to import.

    :param input_s3_uri: the listed prefix
    """

    def __init__(self, input_s3_uri: str) -> None:
        super().__init__(f"The input prefix {input_s3_uri} holds no objects to import")
        self.input_s3_uri = input_s3_uri


class UnreachableFolder(NamedTuple):
    """A folder whose loose files no input prefix of their own can reach.

    :param s3_uri: the folder
    :param files: how many of its loose files must be staged
    :param bytes: their bytes
    :param reason: why no prefix reaches them
    """

    s3_uri: str
    files: int
    bytes: int
    reason: str


class StagingRequiredError(PlanError):
    """Some files can only be imported from a staging copy, and no staging prefix is set.

    :param folders: the folders concerned
    :param setting: the name of the setting that enables staging
    """

    def __init__(self, folders: Sequence[UnreachableFolder], setting: str = STAGING_SETTING) -> None:
        self.folders = list(folders)
        files = sum(f.files for f in self.folders)
        lines = [f"  {f.s3_uri}: {f.files} file(s), {f.bytes} bytes: {f.reason}" for f in folders]
        if len(lines) > MAX_FOLDERS_NAMED:
            lines[MAX_FOLDERS_NAMED:] = [f"  ... and {len(lines) - MAX_FOLDERS_NAMED} more folder(s)"]
        super().__init__(
            f"{files} file(s) in {len(self.folders)} folder(s) cannot be reached by an input prefix of their"
            f" own, so they must be copied to a staging prefix and imported from there, but no staging"
            f" prefix is set. Set {setting} to an S3 prefix outside the input prefix that the import role can"
            f" read (staged copies are removed after the run), or move these files into sub-folders that"
            f" each fit one job:\n" + "\n".join(lines)
        )


@dataclass(frozen=True)
class Chunk:
    """One import job's input.

    :param id: stable id, ``<ordinal>-<first 10 hex of the digest>``
    :param input_s3_uri: the job's input prefix
    :param label: a short name for the UI (the prefix relative to the listed prefix)
    :param objects: the original objects it imports, sorted by key
    :param folders: nested folders under ``input_s3_uri``, counted as :func:`nested_folders` does
    :param digest: sha256 over the sorted key, ETag and size of ``objects``
    :param staged: whether the job reads staged copies (at :meth:`staged_key`) instead of the originals
    """

    id: str
    input_s3_uri: str
    label: str
    objects: Sequence[S3Object]
    folders: int
    digest: str
    staged: bool = False

    @property
    def files(self) -> int:
        """How many objects the chunk imports."""
        return len(self.objects)

    @property
    def bytes(self) -> int:
        """Their bytes."""
        return sum(o.size for o in self.objects)

    @property
    def bucket(self) -> str:
        """The bucket the job reads."""
        return split_s3_uri(self.input_s3_uri)[0]

    def staged_key(self, key: str) -> str:
        """The key of an original object's staged copy (in :attr:`bucket`).

        :param key: the original key
        """
        return split_s3_uri(self.input_s3_uri)[1] + key

    def original_key(self, input_file: str) -> str:
        """Map a key the job read (``inputFile`` of its manifests) back to the original key.

        :param input_file: a key in :attr:`bucket`, or an ``s3://`` URI
        """
        if input_file.startswith("s3://"):
            input_file = split_s3_uri(input_file)[1]
        staging_prefix = split_s3_uri(self.input_s3_uri)[1]
        if self.staged and input_file.startswith(staging_prefix):
            return input_file[len(staging_prefix) :]
        return input_file

    def summary(self) -> dict[str, Any]:
        """The chunk without its keys (for XCom and logs)."""
        return {
            "id": self.id,
            "input_s3_uri": self.input_s3_uri,
            "label": self.label,
            "files": self.files,
            "bytes": self.bytes,
            "folders": self.folders,
            "staged": self.staged,
            "digest": self.digest,
        }


@dataclass
class Plan:
    """The chunks of one listing, the objects refused, and what was listed.

    :param input_s3_uri: the listed prefix
    :param limits: the limits the chunks fit
    :param chunks: prefix chunks in key order, then staged chunks
    :param refused: objects not imported, sorted by key
    :param listing_digest: sha256 over every listed object (key, ETag, size), refused ones included
    :param staging_s3_uri: where staged chunks live, if any
    :param run_scope: the staging folder of this run under ``staging_s3_uri``
    :param folder_markers: zero-byte ``.../`` keys skipped by the listing
    """

    input_s3_uri: str
    limits: ImportLimits
    chunks: list[Chunk]
    refused: list[RefusedObject]
    listing_digest: str
    staging_s3_uri: str | None = None
    run_scope: str | None = None
    folder_markers: int = 0
    _by_id: dict[str, Chunk] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def bucket(self) -> str:
        """The listed bucket."""
        return split_s3_uri(self.input_s3_uri)[0]

    @property
    def empty(self) -> bool:
        """Whether the listing held no object at all."""
        return not self.chunks and not self.refused

    @property
    def staged_chunks(self) -> list[Chunk]:
        """The chunks whose objects must be staged before their job starts."""
        return [c for c in self.chunks if c.staged]

    def chunk(self, chunk_id: str) -> Chunk:
        """The chunk with this id.

        :param chunk_id: a :attr:`Chunk.id`
        """
        if not self._by_id:
            self._by_id.update((c.id, c) for c in self.chunks)
        return self._by_id[chunk_id]

    def totals(self) -> dict[str, int]:
        """Counts and bytes of the whole plan."""
        staged = self.staged_chunks
        return {
            "files": sum(c.files for c in self.chunks),
            "bytes": sum(c.bytes for c in self.chunks),
            "chunks": len(self.chunks),
            "staged_chunks": len(staged),
            "staged_files": sum(c.files for c in staged),
            "staged_bytes": sum(c.bytes for c in staged),
            "refused_files": len(self.refused),
            "refused_bytes": sum(r.size for r in self.refused),
            "folder_markers": self.folder_markers,
        }

    def summary(self) -> dict[str, Any]:
        """The plan without object keys, small enough for XCom: chunks (id, prefix, label, counts, digest), totals."""
        return {
            "input_s3_uri": self.input_s3_uri,
            "listing_digest": self.listing_digest,
            "staging_s3_uri": self.staging_s3_uri,
            "run_scope": self.run_scope,
            "limits": self.limits.as_dict(),
            "totals": self.totals(),
            "chunks": [c.summary() for c in self.chunks],
        }

    def document(self) -> dict[str, Any]:
        """The full plan: :meth:`summary` plus every chunk's objects and the refused objects.

        ``objects`` rows are ``[key, etag, size]``; ``refused`` rows are ``[key, etag, size, reason]``. Rows are
        generators, so :func:`write_json_document` streams them.
        """
        document = self.summary()
        document["format"] = PLAN_FORMAT
        document["chunks"] = [
            {**c.summary(), "objects": ([o.key, o.etag, o.size] for o in c.objects)} for c in self.chunks
        ]
        document["refused"] = ([r.key, r.etag, r.size, r.reason] for r in self.refused)
        return document

    @classmethod
    def from_document(cls, document: Mapping[str, Any]) -> Plan:
        """Rebuild a plan from :meth:`document` (as read back from JSON).

        :param document: the parsed plan document
        """
        if document.get("format") != PLAN_FORMAT:
            raise PlanError(
                f"Not a plan document (format {document.get('format')!r}, expected {PLAN_FORMAT})"
            )
        chunks = [
            Chunk(
                id=c["id"],
                input_s3_uri=c["input_s3_uri"],
                label=c["label"],
                objects=[S3Object(key, int(size), etag) for key, etag, size in c["objects"]],
                folders=int(c["folders"]),
                digest=c["digest"],
                staged=bool(c["staged"]),
            )
            for c in document["chunks"]
        ]
        return cls(
            input_s3_uri=document["input_s3_uri"],
            limits=ImportLimits(**document["limits"]),
            chunks=chunks,
            refused=[RefusedObject(k, int(s), e, r) for k, e, s, r in document["refused"]],
            listing_digest=document["listing_digest"],
            staging_s3_uri=document.get("staging_s3_uri"),
            run_scope=document.get("run_scope"),
            folder_markers=int(document["totals"].get("folder_markers", 0)),
        )


# ------------------------------------------------------------------------------------------- listing


def list_objects(s3_client: Any, input_s3_uri: str, *, page_size: int = 1000) -> Iterator[S3Object]:
    """Stream ``ListObjectsV2`` pages of a prefix, keeping only key, size and ETag of each object.

    :param s3_client: a boto3 S3 client
    :param input_s3_uri: ``s3://bucket/prefix`` (a string prefix; it need not end in ``/``)
    :param page_size: keys per page (at most 1,000)
    """
    bucket, prefix = _parse_uri(input_s3_uri, "input_s3_uri")
    paginator = s3_client.get_paginator("list_objects_v2")
    pages = paginator.paginate(Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size})
    # botocore parses every LastModified with dateutil, which the plan never reads: a third of the client's
    # time for a 100,000-key listing (7 of 24 s against the local endpoint; the same CPU against S3).
    factory = getattr(getattr(s3_client, "_endpoint", None), "_response_parser_factory", None)
    if factory is not None:
        factory.set_parser_defaults(timestamp_parser=str)
    try:
        for page in pages:
            for item in page.get("Contents", ()):
                yield S3Object(item["Key"], int(item["Size"]), str(item.get("ETag", "")).strip('"'))
    finally:
        if factory is not None:
            from botocore.parsers import DEFAULT_TIMESTAMP_PARSER

            factory.set_parser_defaults(timestamp_parser=DEFAULT_TIMESTAMP_PARSER)


@dataclass(frozen=True)
class PlanSettings:
    """How to plan a prefix.

    :param limits: what one job takes
    :param staging_s3_uri: where to stage files no prefix of their own reaches (a folder; copies go under
        ``<staging_s3_uri>/<run_scope>/<chunk id>/<original key>``); None: such files are an error
    :param run_scope: this run's folder under ``staging_s3_uri`` (default ``plan-<first 16 hex of the listing
        digest>``: pass a run-scoped id, so that two runs of the same listing do not share staged copies)
    :param allow_empty: return an empty plan for an empty prefix instead of raising :class:`EmptyPrefixError`
    :param loose_file_prefixes: also reach loose files by name prefixes (``day/IMG0``) before staging them
    :param staging_setting: the setting :class:`StagingRequiredError` tells the user to set
    """

    limits: ImportLimits = field(default_factory=ImportLimits)
    staging_s3_uri: str | None = None
    run_scope: str | None = None
    allow_empty: bool = False
    loose_file_prefixes: bool = False
    staging_setting: str = STAGING_SETTING


def plan_prefix(s3_client: Any, input_s3_uri: str, settings: PlanSettings | None = None) -> Plan:
    """List a prefix once and plan it (:func:`list_objects` then :func:`plan_objects`).

    :param s3_client: a boto3 S3 client
    :param input_s3_uri: the prefix to import
    :param settings: how to plan (default :class:`PlanSettings`)
    """
    return plan_objects(list_objects(s3_client, input_s3_uri), input_s3_uri, settings)


# ------------------------------------------------------------------------------------------- planning


class _Folder:
    """A folder of the tree. ``lo:hi`` is its range in the sorted objects (a key prefix is a contiguous range)."""

    __slots__ = ("bytes", "children", "files", "folders", "hi", "lo", "loose", "path", "refused")

    def __init__(self, path: str) -> None:
        self.path = path
        self.children: dict[str, _Folder] = {}
        self.loose: list[int] = []
        self.lo = self.hi = -1
        self.files = self.bytes = self.folders = self.refused = 0


class _Entry(NamedTuple):
    """A sibling in a folder being split: a sub-folder (name ends in ``/``) or a loose file."""

    name: str
    lo: int
    hi: int
    files: int
    bytes: int
    # Nested folders it adds to a prefix that holds it with siblings (a sub-folder counts itself).
    folders: int
    # Whether it may share a prefix with siblings (a sub-folder that fits, or a loose file if allowed).
    packable: bool


def plan_objects(
    objects: Iterable[S3Object], input_s3_uri: str, settings: PlanSettings | None = None
) -> Plan:
    """Plan a listing: the fewest chunks that each fit one job, staged chunks, refused files.

    :param objects: the listing of ``input_s3_uri`` (any order)
    :param input_s3_uri: the listed prefix
    :param settings: how to plan (default :class:`PlanSettings`)
    :raises EmptyPrefixError: no object to import, unless ``allow_empty``
    :raises StagingRequiredError: files need staging and ``staging_s3_uri`` is None
    :raises PlanError: other bad input (keys outside the prefix, a staging prefix overlapping the input)
    """
    settings = settings or PlanSettings()
    limits, staging_s3_uri, run_scope = settings.limits, settings.staging_s3_uri, settings.run_scope
    bucket, prefix = _parse_uri(input_s3_uri, "input_s3_uri")
    items, markers = _sorted_listing(objects, prefix)
    listing_digest = content_digest(items)
    if not items:
        if not settings.allow_empty:
            raise EmptyPrefixError(input_s3_uri)
        log.info("Listed %s: empty (%d folder markers)", input_s3_uri, markers)
        return Plan(input_s3_uri, limits, [], [], listing_digest, staging_s3_uri, run_scope, markers)

    too_large = min(limits.max_file_bytes, limits.max_bytes_per_job)
    root = _build_tree(items, prefix, too_large)
    spans, staged, unreachable = _split(root, items, limits, too_large, settings.loose_file_prefixes)
    refused = [RefusedObject(o.key, o.size, o.etag, "FILE_TOO_LARGE") for o in items if o.size > too_large]

    chunks = [
        _chunk(n, f"s3://{bucket}/{path}", items[lo:hi], folders, prefix)
        for n, (path, lo, hi, folders) in enumerate(sorted(spans, key=lambda s: s[1]), start=1)
    ]
    if staged:
        if staging_s3_uri is None:
            raise StagingRequiredError(
                [
                    UnreachableFolder(f"s3://{bucket}/{path}", files, size, reason)
                    for path, (files, size, reason) in sorted(unreachable.items())
                ],
                settings.staging_setting,
            )
        run_scope = run_scope or f"plan-{listing_digest[:16]}"
        _check_staging(staging_s3_uri, run_scope, input_s3_uri)
        chunks += _staged_chunks(
            [items[i] for i in sorted(staged)], limits, staging_s3_uri, run_scope, chunks
        )
    plan = Plan(input_s3_uri, limits, chunks, refused, listing_digest, staging_s3_uri, run_scope, markers)
    verify_plan(plan, items)
    totals = plan.totals()
    log.info(
        "Planned %s: %d files, %d bytes in %d chunk(s) (%d staged: %d files); %d file(s) refused (%d bytes)",
        input_s3_uri,
        totals["files"],
        totals["bytes"],
        totals["chunks"],
        totals["staged_chunks"],
        totals["staged_files"],
        totals["refused_files"],
        totals["refused_bytes"],
    )
    return plan


def verify_plan(plan: Plan, objects: Iterable[S3Object]) -> None:
    """Check a plan against its listing, independently of how it was made.

    Every object is in exactly one chunk or refused; a prefix chunk's prefix holds exactly its objects in the
    listing; every chunk is within the limits, its nested folders counted from its keys. :func:`plan_objects`
    runs this before returning, so a planner bug fails before anything is copied or imported.

    :param plan: the plan
    :param objects: the listing it was made from
    :raises PlanError: the plan does not cover the listing exactly
    """
    _, prefix = split_s3_uri(plan.input_s3_uri)
    items, _ = _sorted_listing(objects, prefix)
    keys = [o.key for o in items]
    uses = bytearray(len(keys))
    problems: list[str] = []

    def use(key: str) -> None:
        at = bisect_left(keys, key)
        if at == len(keys) or keys[at] != key:
            problems.append("an object that is not in the listing")
        else:
            uses[at] = min(uses[at] + 1, 2)

    limits = plan.limits
    for chunk in plan.chunks:
        objects_in = list(chunk.objects)
        for o in objects_in:
            use(o.key)
        if chunk.staged:
            job_keys = [chunk.staged_key(o.key) for o in objects_in]
        else:
            job_prefix = split_s3_uri(chunk.input_s3_uri)[1]
            lo = hi = bisect_left(keys, job_prefix)
            while hi < len(keys) and keys[hi].startswith(job_prefix):
                hi += 1
            if items[lo:hi] != objects_in:
                problems.append(
                    f"chunk {chunk.id}: its prefix holds {hi - lo} listed objects, the chunk {chunk.files}"
                )
            job_keys = keys[lo:hi]
        folders = nested_folders(job_keys, split_s3_uri(chunk.input_s3_uri)[1])
        if (
            chunk.files > limits.max_files_per_job
            or chunk.bytes > limits.max_bytes_per_job
            or folders > limits.max_folders_per_job
            or folders != chunk.folders
            or any(o.size > limits.max_file_bytes for o in objects_in)
        ):
            problems.append(
                f"chunk {chunk.id}: {chunk.files} files, {chunk.bytes} bytes, {folders} folders: over a limit"
            )
    for r in plan.refused:
        use(r.key)
    twice, missed = uses.count(2), uses.count(0)
    if twice or missed:
        problems.append(f"{twice} object(s) in more than one chunk, {missed} in none")
    if problems:
        raise PlanError(
            "The plan does not cover the listing exactly (a bug; nothing was started): "
            + "; ".join(problems[:10])
        )


def nested_folders(keys: Iterable[str], input_key_prefix: str) -> int:
    """Count the nested folders an import of ``input_key_prefix`` sees, as the planner does.

    Every distinct folder path below the input prefix counts, intermediate ones included (``a/b/c.dcm`` counts
    ``a/`` and ``a/b/``). That is at least what HealthImaging can count (the local endpoint counts only folders
    that hold files), so a chunk under the limit here is under it there.

    :param keys: the keys under the prefix
    :param input_key_prefix: the key part of the input prefix
    """
    folders: set[str] = set()
    for key in keys:
        relative = key[len(input_key_prefix) :]
        end = relative.find("/")
        while end != -1:
            folders.add(relative[: end + 1])
            end = relative.find("/", end + 1)
    return len(folders)


def content_digest(objects: Iterable[S3Object]) -> str:
    """sha256 over one compact JSON line ``["key","etag",size]`` per object, in the given (key) order.

    This is a chunk's scope for its client token, so the format is fixed: ``json.dumps([key, etag, size],
    ensure_ascii=False, separators=(",", ":"))`` plus ``\\n``, UTF-8.

    :param objects: the objects, sorted by key
    """
    digest = hashlib.sha256()
    for o in objects:
        digest.update(f"[{_json_string(o.key)},{_json_string(o.etag)},{int(o.size)}]\n".encode())
    return digest.hexdigest()


def _parse_uri(uri: str, name: str) -> tuple[str, str]:
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise PlanError(f"{name} must be an s3://bucket/prefix URI, got {uri!r}")
    bucket, key = split_s3_uri(uri)
    if not _BUCKET.fullmatch(bucket):
        raise PlanError(f"{name} {uri!r} does not name a valid bucket")
    return bucket, key


def _sorted_listing(objects: Iterable[S3Object], prefix: str) -> tuple[list[S3Object], int]:
    """Sort by key and drop folder markers; refuse keys outside the prefix and repeated keys."""
    items: list[S3Object] = []
    markers = outside = 0
    for o in objects:
        if not o.key.startswith(prefix):
            outside += 1
        elif o.key.endswith("/"):
            markers += 1
        else:
            items.append(o)
    if outside:
        raise PlanError(f"The listing holds {outside} key(s) outside the prefix {prefix!r}")
    items.sort(key=attrgetter("key"))
    repeated = sum(a.key == b.key for a, b in zip(items, items[1:], strict=False))
    if repeated:
        raise PlanError(f"The listing holds {repeated} repeated key(s)")
    return items, markers


def _build_tree(items: Sequence[S3Object], prefix: str, too_large: int) -> _Folder:
    """The folder tree of a sorted listing with files, bytes, nested folders and ranges summed per folder."""
    root = _Folder(prefix)
    by_dir: dict[str, _Folder] = {"": root}  # folder path relative to the prefix (ends in "/") -> folder
    last_dir, last = "", root
    for index, o in enumerate(items):
        relative = o.key[len(prefix) :]
        directory = relative[: relative.rfind("/") + 1]
        if directory != last_dir:
            last_dir, last = directory, _folder(by_dir, prefix, directory)
        last.loose.append(index)
    order = [root]
    for folder in order:  # breadth first: parents before children
        order.extend(folder.children.values())
    for folder in reversed(order):
        if folder.loose:
            folder.lo, folder.hi = folder.loose[0], folder.loose[-1] + 1
        for index in folder.loose:
            if items[index].size > too_large:
                folder.refused += 1
            else:
                folder.files += 1
                folder.bytes += items[index].size
        for child in folder.children.values():
            folder.lo = child.lo if folder.lo < 0 else min(folder.lo, child.lo)
            folder.hi = max(folder.hi, child.hi)
            folder.files += child.files
            folder.bytes += child.bytes
            folder.folders += child.folders + 1
            folder.refused += child.refused
    return root


def _folder(by_dir: dict[str, _Folder], prefix: str, directory: str) -> _Folder:
    """The folder at ``directory`` (relative, ends in ``/``), created with its missing ancestors."""
    missing = []
    while directory not in by_dir:
        missing.append(directory)
        parent, slash, _ = directory[:-1].rpartition("/")
        directory = parent + slash
    folder = by_dir[directory]
    for path in reversed(missing):
        child = _Folder(prefix + path)
        folder.children[path[len(directory) :]] = child
        by_dir[path] = folder = child
        directory = path
    return folder


def _fits(folder: _Folder, limits: ImportLimits) -> bool:
    return (
        folder.refused == 0
        and folder.files <= limits.max_files_per_job
        and folder.bytes <= limits.max_bytes_per_job
        and folder.folders <= limits.max_folders_per_job
    )


def _split(
    root: _Folder, items: Sequence[S3Object], limits: ImportLimits, too_large: int, loose_file_prefixes: bool
) -> tuple[list[tuple[str, int, int, int]], list[int], dict[str, tuple[int, int, str]]]:
    """Split the tree: prefix spans ``(key prefix, lo, hi, nested folders)``, staged indices, unreachable folders."""
    spans: list[tuple[str, int, int, int]] = []
    staged: list[int] = []
    unreachable: dict[str, tuple[int, int, str]] = {}
    stack = [root]
    while stack:
        folder = stack.pop()
        if _fits(folder, limits):
            spans.append((folder.path, folder.lo, folder.hi, folder.folders))
            continue
        entries = []
        for name, child in folder.children.items():
            packable = _fits(child, limits)
            if not packable:
                stack.append(child)
            entries.append(
                _Entry(name, child.lo, child.hi, child.files, child.bytes, child.folders + 1, packable)
            )
        for index in folder.loose:
            o = items[index]
            packable = loose_file_prefixes and o.size <= too_large
            entries.append(_Entry(o.key[len(folder.path) :], index, index + 1, 1, o.size, 0, packable))
        entries.sort()
        packs, left = _pack(entries, limits)
        spans.extend((folder.path + name, lo, hi, folders) for name, lo, hi, folders in packs)
        left += [
            e.lo for e in entries if not e.packable and e.name[-1:] != "/" and items[e.lo].size <= too_large
        ]
        if left:
            staged.extend(left)
            unreachable[folder.path] = (
                len(left),
                sum(items[i].size for i in left),
                _unreachable_reason(folder, limits, too_large, items, loose_file_prefixes),
            )
    return spans, staged, unreachable


def _pack(
    entries: Sequence[_Entry], limits: ImportLimits
) -> tuple[list[tuple[str, int, int, int]], list[int]]:
    """Cover the packable siblings with the fewest string prefixes that hold no other sibling.

    The prefixes that hold whole siblings are the nodes of a trie over the sorted sibling names; a node holds a
    contiguous run of them. A node with no blocker (a sibling that must not be imported by this prefix) whose
    sums fit is one chunk, and that is the fewest its run can take; otherwise its children are split
    independently. A loose file whose name is a node's own string cannot be held alone when the node does not
    fit, so it is returned for staging.

    :param entries: the siblings, sorted by name
    :param limits: what one job takes
    :return: packs ``(longest common name prefix, lo, hi, nested folders)`` and indices of unreachable files
    """
    names = [e.name for e in entries]
    files = [0, *accumulate(e.files for e in entries)]
    size = [0, *accumulate(e.bytes for e in entries)]
    folders = [0, *accumulate(e.folders for e in entries)]
    blockers = [0, *accumulate(not e.packable for e in entries)]
    packs: list[tuple[str, int, int, int]] = []
    left: list[int] = []
    runs = [(0, len(entries))]
    while runs:
        lo, hi = runs.pop()
        if hi - lo == 1:
            entry = entries[lo]
            if entry.packable:  # alone under its own prefix, a sub-folder does not count itself
                packs.append((entry.name, entry.lo, entry.hi, entry.folders - entry.name.endswith("/")))
            continue
        common = commonprefix([names[lo], names[hi - 1]])
        if (
            blockers[hi] == blockers[lo]
            and files[hi] - files[lo] <= limits.max_files_per_job
            and size[hi] - size[lo] <= limits.max_bytes_per_job
            and folders[hi] - folders[lo] <= limits.max_folders_per_job
        ):
            packs.append((common, entries[lo].lo, entries[hi - 1].hi, folders[hi] - folders[lo]))
            continue
        depth, start = len(common), lo
        if len(names[lo]) == depth:  # a loose file named exactly ``common``: only this prefix holds it alone
            if entries[lo].packable:
                left.append(entries[lo].lo)
            start = lo + 1
        while start < hi:
            end, char = start + 1, names[start][depth]
            while end < hi and names[end][depth] == char:
                end += 1
            runs.append((start, end))
            start = end
    return packs, left


def _unreachable_reason(
    folder: _Folder,
    limits: ImportLimits,
    too_large: int,
    items: Sequence[S3Object],
    loose_file_prefixes: bool,
) -> str:
    if loose_file_prefixes:
        return "no key prefix holds them without other files or folders"
    if folder.children:
        return "loose files beside the sub-folders of a folder that does not fit one job"
    if any(items[i].size > too_large for i in folder.loose):
        return f"loose files beside a file refused as larger than {too_large} bytes"
    return (
        f"more loose files than one job takes (max_files_per_job={limits.max_files_per_job},"
        f" max_bytes_per_job={limits.max_bytes_per_job})"
    )


def _check_staging(staging_s3_uri: str, run_scope: str, input_s3_uri: str) -> None:
    """Refuse a bad run scope, and a staging folder the input prefix lists (or that lists the input)."""
    if not _RUN_SCOPE.fullmatch(run_scope):
        raise PlanError(f"run_scope must match {_RUN_SCOPE.pattern}, got {run_scope!r}")
    staging_bucket, staging_key = _parse_uri(staging_s3_uri, "staging_s3_uri")
    input_bucket, input_key = split_s3_uri(input_s3_uri)
    run_folder = (staging_key.rstrip("/") + "/" if staging_key else "") + run_scope + "/"
    if staging_bucket == input_bucket and (
        run_folder.startswith(input_key) or input_key.startswith(run_folder)
    ):
        raise PlanError(
            f"staging_s3_uri {staging_s3_uri} overlaps the input prefix {input_s3_uri}: the input would list the"
            " staged copies and import them twice. Choose a staging prefix outside the input prefix."
        )


def _staged_chunks(
    staged: Sequence[S3Object],
    limits: ImportLimits,
    staging_s3_uri: str,
    run_scope: str,
    before: Sequence[Chunk],
) -> list[Chunk]:
    """Pack staged files (sorted by key) into chunks in order, each within the job limits."""
    groups: list[tuple[list[S3Object], int]] = []
    current: list[S3Object] = []
    folders: set[str] = set()
    size = 0
    for o in staged:
        new = {o.key[: i + 1] for i, char in enumerate(o.key) if char == "/"} - folders
        if not current and len(new) > limits.max_folders_per_job:
            raise PlanError(
                f"A staged copy keeps its key, and one would sit {len(new)} folders deep, more than"
                f" max_folders_per_job={limits.max_folders_per_job}"
            )
        if current and (
            len(current) >= limits.max_files_per_job
            or size + o.size > limits.max_bytes_per_job
            or len(folders) + len(new) > limits.max_folders_per_job
        ):
            groups.append((current, len(folders)))
            current, folders, size = [], set(), 0
            new = {o.key[: i + 1] for i, char in enumerate(o.key) if char == "/"}
        current.append(o)
        folders |= new
        size += o.size
    groups.append((current, len(folders)))
    base = staging_s3_uri.rstrip("/") + "/"
    chunks = []
    for n, (objects, count) in enumerate(groups, start=len(before) + 1):
        digest = content_digest(objects)
        chunk_id = f"{n:04d}-{digest[:10]}"
        uri = f"{base}{run_scope}/{chunk_id}/"
        longest = max(len((split_s3_uri(uri)[1] + o.key).encode()) for o in objects)
        if longest > MAX_KEY_BYTES:
            raise PlanError(
                f"Staged copies under {uri} would have keys of {longest} bytes, more than S3's {MAX_KEY_BYTES}:"
                " choose a shorter staging_s3_uri"
            )
        label = f"staged {n - len(before)}/{len(groups)}"
        chunks.append(Chunk(chunk_id, _check_uri_length(uri), label, objects, count, digest, staged=True))
    return chunks


def _chunk(n: int, uri: str, objects: Sequence[S3Object], folders: int, listed_prefix: str) -> Chunk:
    digest = content_digest(objects)
    relative = split_s3_uri(uri)[1][len(listed_prefix) :]
    label = relative + ("" if not relative or relative.endswith("/") else "*") or "(whole prefix)"
    if len(label) > MAX_LABEL_LENGTH:
        label = "..." + label[-(MAX_LABEL_LENGTH - 3) :]
    return Chunk(f"{n:04d}-{digest[:10]}", _check_uri_length(uri), label, objects, folders, digest)


def _check_uri_length(uri: str) -> str:
    if len(uri) > MAX_S3_URI_LENGTH:
        raise PlanError(
            f"A chunk's input prefix is {len(uri)} characters long, more than {MAX_S3_URI_LENGTH}"
        )
    return uri


# ------------------------------------------------------------------------------------------- documents


def write_plan(s3_client: Any, plan: Plan, s3_uri: str) -> str:
    """Write :meth:`Plan.document` to S3 (gzip when ``s3_uri`` ends in ``.gz``); return ``s3_uri``.

    :param s3_client: a boto3 S3 client
    :param plan: the plan
    :param s3_uri: where, e.g. ``<output prefix>/plans/<run>/plan.json.gz``
    """
    return write_json_document(s3_client, s3_uri, plan.document())


def read_plan(s3_client: Any, s3_uri: str) -> Plan:
    """Read a plan written by :func:`write_plan`.

    :param s3_client: a boto3 S3 client
    :param s3_uri: where it was written
    """
    return Plan.from_document(read_json_document(s3_client, s3_uri))


def write_json_document(s3_client: Any, s3_uri: str, document: Any) -> str:
    """Stream a JSON document (generators become arrays) to S3, gzip-compressed when ``s3_uri`` ends in ``.gz``.

    :param s3_client: a boto3 S3 client
    :param s3_uri: the object to write
    :param document: JSON-like data; generators and other iterators are written as arrays, row by row
    """
    bucket, key = _parse_uri(s3_uri, "s3_uri")
    compressed = key.endswith(".gz")
    with tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024) as spool:
        sink: IO[bytes] = gzip.GzipFile(fileobj=spool, mode="wb", mtime=0) if compressed else spool  # type: ignore[assignment]
        buffer: list[str] = []
        buffered = 0
        for part in _json_parts(document):
            buffer.append(part)
            buffered += len(part)
            if buffered > 256 * 1024:
                sink.write("".join(buffer).encode())
                buffer, buffered = [], 0
        sink.write("".join(buffer).encode())
        if compressed:
            sink.close()  # ends the gzip stream; the spool stays open
        size = spool.tell()
        spool.seek(0)
        extra = {"ContentEncoding": "gzip"} if compressed else {}
        s3_client.put_object(
            Bucket=bucket, Key=key, Body=spool, ContentLength=size, ContentType="application/json", **extra
        )
    log.info("Wrote %s (%d bytes)", s3_uri, size)
    return s3_uri


def read_json_document(s3_client: Any, s3_uri: str) -> Any:
    """Read a JSON document written by :func:`write_json_document` (gzip or not).

    :param s3_client: a boto3 S3 client
    :param s3_uri: the object to read
    """
    bucket, key = _parse_uri(s3_uri, "s3_uri")
    body = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
    if body[:2] == b"\x1f\x8b":
        body = gzip.decompress(body)
    return json.loads(body)


def _json_parts(value: Any) -> Iterator[str]:
    """Encode JSON piece by piece; an iterator (not a list) is written as an array without materialising it."""
    if isinstance(value, Mapping):
        yield "{"
        for n, (name, item) in enumerate(value.items()):
            yield ("," if n else "") + json.dumps(str(name)) + ":"
            yield from _json_parts(item)
        yield "}"
    elif isinstance(value, Iterator) or (isinstance(value, list) and not _is_flat(value)):
        yield "["
        for n, item in enumerate(value):
            if n:
                yield ","
            yield from _json_parts(item)
        yield "]"
    else:
        yield json.dumps(value, ensure_ascii=False)


def _is_flat(values: list[Any]) -> bool:
    return not any(isinstance(v, Mapping | Iterator | list) for v in values)
