"""Peak memory and time of the import planner (listing + planning) at 100,000 keys, and of the import report.

Each measurement runs in a fresh child process, so its peak is its own. Two memory figures:

- **RSS**: the child's resident-memory high-water mark (``VmHWM``, reset with ``clear_refs`` right before the
  phase) minus its RSS at that moment, i.e. what the phase adds on top of the interpreter, boto3 and the modules;
- **tracemalloc**: the peak of Python allocations during the phase (a separate run: tracing slows the code).

Listings:

- ``fake``: 100,000 keys of a realistic hospital day (patient / study UID / series UID / SOP UID ``.dcm``, study
  sizes and file sizes by modality, ~150-character keys), served as ``ListObjectsV2`` pages shaped like botocore's
  (``Key``, ``LastModified`` datetime, ``ETag``, ``Size``, ``StorageClass``, ...) by an in-process paginator.
  Uploading 100,000 objects to the endpoint's moto S3 takes ~15 min and moto lists them in quadratic time, so
  the full size is measured with this paginator;
- ``endpoint``: a smaller real run, a day of ``--endpoint-objects`` keys from the same generator uploaded (1-byte bodies)
  to the endpoint's S3 (``healthimaging-local serve`` subprocess) and listed over HTTP with stock boto3.

Each listing is also measured *naively* side by side (every response page kept, as
``paginator.paginate(...).build_full_result()`` would), to show what keeping key, size and ETag only saves.
``report`` feeds the report builder one success line per object (100,000, as streamed ndjson would) and
streams the report document into a gzip sink.

Usage: ``.venv/bin/python benchmarks/planner_memory.py --rounds 5``
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402

MODES = (
    "fake",
    "fake_naive",
    "fake_tracemalloc",
    "endpoint",
    "endpoint_naive",
    "report",
    "report_tracemalloc",
)
BUCKET = "hospital"
PREFIX = "day/2025-03-01/"
MODALITIES = (  # (share, series range, instances-per-series choices, bytes per file)
    ("CR", 0.35, (1, 2), (1, 2, 3), 9_000_000),
    ("CT", 0.35, (2, 6), (1, 3, 60, 120, 300, 600), 525_000),
    ("MR", 0.22, (4, 12), (20, 40, 120, 200), 140_000),
    ("US", 0.08, (1, 3), (10, 30, 60), 900_000),
)


def day_keys(count: int, seed: int = 11) -> Iterator[tuple[str, int]]:
    """``(key, size)`` of a realistic day, in key order, ``count`` objects."""
    rng = random.Random(seed)
    made: list[tuple[str, int]] = []
    while len(made) < count:
        patient = f"{rng.randrange(10**7, 10**8)}"
        for _ in range(rng.choice((1, 1, 1, 2))):
            modality, _, series_range, instances, size = rng.choices(MODALITIES, [m[1] for m in MODALITIES])[
                0
            ]
            study = (
                f"1.2.840.113619.2.55.3.{rng.randrange(10**9)}.{rng.randrange(10**4)}.{rng.randrange(10**10)}"
            )
            for s in range(1, rng.randint(*series_range) + 1):
                series = f"{study}.{s}.{rng.randrange(10**6)}"
                for i in range(1, rng.choice(instances) + 1):
                    key = f"{PREFIX}{patient}/{study}/{series}/{series}.{i}.dcm"
                    made.append((key, int(size * rng.uniform(0.9, 1.1))))
    made.sort()
    return iter(made[:count])


class FakePaginator:
    """``list_objects_v2`` pages as botocore parses them, generated page by page."""

    def __init__(self, count: int) -> None:
        self.count = count

    def paginate(self, Bucket: str, Prefix: str, PaginationConfig: Any = None) -> Iterator[dict[str, Any]]:
        keys = day_keys(self.count)
        modified = datetime(2025, 3, 1, 23, 0, tzinfo=UTC)
        while True:
            contents = [
                {
                    "Key": key,
                    "LastModified": modified,
                    "ETag": f'"{abs(hash(key)):032x}"'[:34],
                    "ChecksumAlgorithm": ["CRC32"],
                    "ChecksumType": "FULL_OBJECT",
                    "Size": size,
                    "StorageClass": "STANDARD",
                }
                for key, size in (next(keys, None) or ("", -1) for _ in range(1000))
                if size >= 0
            ]
            if not contents:
                return
            yield {
                "IsTruncated": len(contents) == 1000,
                "Contents": contents,
                "Name": Bucket,
                "Prefix": Prefix,
                "MaxKeys": 1000,
                "EncodingType": "url",
                "KeyCount": len(contents),
                "ResponseMetadata": {"HTTPStatusCode": 200, "HTTPHeaders": {}, "RetryAttempts": 0},
            }


class FakeClient:
    """A stand-in S3 client: a paginator, and a ``put_object`` that reads and discards the body."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.written = 0

    def get_paginator(self, name: str) -> FakePaginator:
        return FakePaginator(self.count)

    def put_object(self, Body: Any, **kwargs: Any) -> None:
        while chunk := Body.read(1 << 20):
            self.written += len(chunk)


class Peak:
    """Resident-memory high-water mark of this process since :meth:`reset`."""

    def __init__(self, trace: bool) -> None:
        self.trace = trace
        self.process = psutil.Process()

    def reset(self) -> None:
        gc.collect()
        if self.trace:
            tracemalloc.start()
        Path("/proc/self/clear_refs").write_text("5")
        self.base = self.process.memory_info().rss
        self.started = time.perf_counter()

    def read(self) -> dict[str, float]:
        seconds = time.perf_counter() - self.started
        hwm = next(
            int(line.split()[1]) * 1024
            for line in Path("/proc/self/status").read_text().splitlines()
            if line.startswith("VmHWM:")
        )
        figures = {"seconds": seconds, "rss_peak_added_mb": (hwm - self.base) / 1e6}
        if self.trace:
            current, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            figures |= {"tracemalloc_peak_mb": peak / 1e6, "tracemalloc_retained_mb": current / 1e6}
        return figures


def child(mode: str, count: int, url: str | None) -> dict[str, Any]:
    """One measurement (runs in a fresh interpreter)."""
    from healthimaging.planner import S3Object, list_objects, plan_objects, write_json_document, write_plan
    from healthimaging.report import ChunkJob, ReportBuilder

    client: Any = harness.client(url, "s3") if url else FakeClient(count)
    uri = f"s3://{BUCKET}/{PREFIX}"
    peak = Peak(trace=mode.endswith("tracemalloc"))
    out: dict[str, Any] = {"mode": mode, "objects": count}
    peak.reset()
    if mode.endswith("naive"):  # every response page kept while planning
        pages = list(client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=PREFIX))
        objects = [
            S3Object(c["Key"], c["Size"], c["ETag"].strip('"')) for p in pages for c in p.get("Contents", ())
        ]
    else:
        objects = list(list_objects(client, uri))
    list_seconds = time.perf_counter() - peak.started
    plan = plan_objects(objects, uri)
    out["list_and_plan"] = peak.read() | {"list_seconds": list_seconds}
    out["list_and_plan"]["plan_seconds"] = out["list_and_plan"]["seconds"] - list_seconds
    out["listed"] = len(objects)
    out["chunks"] = len(plan.chunks)
    out["chunk_files"] = sorted(c.files for c in plan.chunks)
    out["bytes"] = plan.totals()["bytes"]
    if mode.endswith("naive"):
        return out
    del objects
    if mode.startswith("report"):
        peak.reset()
        builder = ReportBuilder(plan)
        for chunk in plan.chunks:
            lines = (
                {
                    "inputFile": o.key,
                    "importResponse": {"imageSetId": o.key.rsplit("/", 2)[1][-32:], "isPrimary": True},
                }
                for o in chunk.objects
            )
            builder.add_job(ChunkJob(chunk.id, f"job-{chunk.id}", "COMPLETED", "s3://o/"), None, lines)
        report = builder.build()
        sink = FakeClient(0)
        write_json_document(sink, "s3://out/report.json.gz", report.document())
        out["report"] = peak.read() | {"gzip_bytes": sink.written, "imported": report.totals()["imported"]}
    elif not url:
        peak.reset()
        sink = FakeClient(0)
        write_plan(sink, plan, "s3://out/plan.json.gz")
        out["write_plan"] = peak.read() | {"gzip_bytes": sink.written}
    return out


def run_child(mode: str, count: int, url: str | None) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--child", mode, "--objects", str(count)] + (
        ["--url", url] if url else []
    )
    out = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=HERE.parent).stdout
    return json.loads(out.strip().splitlines()[-1])


def upload(url: str, count: int) -> float:
    s3 = harness.client(url, "s3", max_pool_connections=32)
    s3.create_bucket(Bucket=BUCKET)
    started = time.perf_counter()
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda item: s3.put_object(Bucket=BUCKET, Key=item[0], Body=b"x"), day_keys(count)))
    return time.perf_counter() - started


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of every numeric figure of every phase over runs of one mode."""
    result: dict[str, Any] = {}
    for phase in ("list_and_plan", "write_plan", "report"):
        if phase in runs[0]:
            result[phase] = {
                name: statistics.median(r[phase][name] for r in runs)
                for name, value in runs[0][phase].items()
                if isinstance(value, int | float)
            }
    for name in ("objects", "listed", "chunks", "bytes"):
        if name in runs[0]:
            result[name] = runs[0][name]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--objects", type=int, default=100_000)
    parser.add_argument("--endpoint-objects", type=int, default=10_000)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=harness.RESULTS / "planner_memory.json")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.objects, args.url)))
        return
    modes = args.modes.split(",")
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory() as state:
        serve = None
        upload_seconds = None
        if any(m.startswith("endpoint") for m in modes):
            serve = harness.ServeProcess(Path(state) / "state", Path(state) / "serve.log")
            upload_seconds = upload(serve.url, args.endpoint_objects)
        try:
            for round_ in range(args.rounds):
                for mode in modes:  # side by side in every round
                    endpoint = mode.startswith("endpoint")
                    count = args.endpoint_objects if endpoint else args.objects
                    run = run_child(mode, count, serve.url if endpoint and serve else None)
                    runs[mode].append(run)
                    print(
                        f"round {round_ + 1} {mode}: {json.dumps({k: v for k, v in run.items() if k != 'chunk_files'})}",
                        flush=True,
                    )
        finally:
            if serve:
                serve.stop()
    result = {
        "benchmark": "planner_memory",
        "machine": harness.machine(),
        "command": harness.command_line(),
        "memory": "rss_peak_added_mb: VmHWM (reset by clear_refs right before the phase) minus RSS then; "
        "tracemalloc_*: Python allocations, in the *_tracemalloc runs",
        "endpoint_upload_seconds": upload_seconds,
        "medians": {mode: medians(r) for mode, r in runs.items() if r},
        "runs": runs,
    }
    harness.write_result("planner_memory", result, args.json)


if __name__ == "__main__":
    main()
