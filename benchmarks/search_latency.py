"""SearchImageSets latency per page with 100,000 image sets stored, and the endpoint's memory at that size.

Set-up: write ``--image-sets`` image sets straight through the store's own API (``Store.write_image_sets`` in one
transaction, one call per simulated import of a study so ``updatedAt`` spreads over a year), with a realistic
DICOMTags spread: about 8,000 patients with 1-4 studies each, 1-6 series per study, study dates and times over
2015-2024. Then ``healthimaging-local serve`` starts on that state folder in a subprocess and stock boto3
measures, over real HTTP, the wall time of every SearchImageSets call (one call = one page, maxResults 50):

- ``default``: no criteria (updatedAt DESC), paging through the first 200 pages;
- ``patient_id_equal``: EQUAL DICOMPatientId, 200 random patients (every page of each);
- ``study_date_between``: BETWEEN DICOMStudyDateAndTime over a random 90-day window, default sort, first 10
  pages of 20 windows; ``study_date_between_sorted``: the same with sort DICOMStudyDateAndTime ASC;
- ``updated_at_between_asc``: BETWEEN updatedAt over a random 30-day window, sort updatedAt ASC, first 10 pages
  of 20 windows;
- ``series_uid_equal``: EQUAL DICOMSeriesInstanceUID, 200 random series.

Each of ``--runs`` runs does every query type; per-run p50/p95/p99 and their medians over runs are recorded.
Target: p95 per page at most 50 ms for every query type.

Memory (``--memory``, default on): endpoint RSS right after start, peak RSS (``VmHWM``, reset after start)
during the search runs, then RSS and peak after uploading and importing 5,000 more files into the same data
store, and the state folder's size on disk at each step.

Usage: ``.venv/bin/python benchmarks/search_latency.py [--image-sets 100000] [--runs 5]``
"""

from __future__ import annotations

import argparse
import random
import tempfile
import threading
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from harness import (
    ServeProcess,
    client,
    command_line,
    folder_bytes,
    machine,
    percentiles,
    run_import_job,
    write_result,
)

from healthimaging_local.metadata import dicom_tags_summary
from healthimaging_local.operations import Operations
from healthimaging_local.sample_data import UID_ROOT, synthetic_study_files, upload
from healthimaging_local.store import ImageSetWrite, Store, normalize_study_date_time

PAGE_SIZE = 50
TARGET_P95_MS = 50.0
BUCKET = "bench-search"
FAMILY_NAMES = ("DOE", "ROE", "SMITH", "GARCIA", "MULLER", "ROSSI", "TANAKA", "NOVAK", "SILVA", "KOWALSKI")
SERIES_KINDS = (("CT", "CHEST"), ("MR", "HEAD"), ("CT", "ABDOMEN"), ("OT", "CHEST"), ("US", "ABDOMEN"))
FIRST_DAY = date(2015, 1, 1)
DAYS = 3652


def _document(
    datastore_id: str,
    image_set_id: str,
    patient: dict[str, Any],
    study: dict[str, Any],
    series: dict[str, Any],
    instances: int,
) -> dict[str, Any]:
    """A small ImageSetMetadata document of one series (instance entries without frames' pixel hashes)."""
    sop_root = series["SeriesInstanceUID"].replace(".2.", ".3.", 1)
    return {
        "SchemaVersion": "1.1",
        "DatastoreID": datastore_id,
        "ImageSetID": image_set_id,
        "Patient": {"DICOM": patient},
        "Study": {
            "DICOM": study,
            "Series": {
                series["SeriesInstanceUID"]: {
                    "DICOM": series,
                    "Instances": {
                        f"{sop_root}.{i}": {
                            "DICOM": {"SOPInstanceUID": f"{sop_root}.{i}", "InstanceNumber": str(i)},
                            "DICOMVRs": {},
                            "ImageFrames": [{"ID": uuid.uuid4().hex, "FrameSizeInBytes": 512}],
                        }
                        for i in range(1, instances + 1)
                    },
                }
            },
        },
    }


def seed_store(state_dir: Path, image_sets: int, seed: int) -> dict[str, Any]:
    """Write ``image_sets`` image sets into a fresh data store through the store's API; return what was written.

    :param state_dir: the endpoint's state folder.
    :param image_sets: how many image sets.
    :param seed: seed of the spread.
    """
    rng = random.Random(seed)
    store = Store(state_dir)
    datastore_id = Operations(store).create_datastore(
        {"clientToken": uuid.uuid4().hex, "datastoreName": "bench-search"}
    )["datastoreId"]
    store.settle()
    first_update = time.time() - 365 * 86400
    patients: list[str] = []
    series_uids: list[str] = []
    batches: list[list[ImageSetWrite]] = []
    p = planned = 0
    while planned < image_sets:
        p += 1
        patient_id = f"BENCH-{p:06d}"
        patients.append(patient_id)
        patient = {
            "PatientName": f"{rng.choice(FAMILY_NAMES)}^P{p}",
            "PatientID": patient_id,
            "PatientBirthDate": (date(1930, 1, 1) + timedelta(days=rng.randrange(365 * 80))).strftime(
                "%Y%m%d"
            ),
            "PatientSex": rng.choice(("F", "M", "O")),
        }
        for s in range(1, rng.randint(1, 4) + 1):
            study = {
                "StudyInstanceUID": f"{UID_ROOT}9.1.{seed}.{p}.{s}",
                "StudyID": str(s),
                "StudyDate": (FIRST_DAY + timedelta(days=rng.randrange(DAYS))).strftime("%Y%m%d"),
                "StudyTime": f"{rng.randrange(7, 19):02d}{rng.randrange(60):02d}{rng.randrange(60):02d}",
                "AccessionNumber": f"A{p:07d}{s:02d}",
                "StudyDescription": f"BENCH STUDY {s}",
            }
            batch: list[ImageSetWrite] = []
            for r in range(1, rng.randint(1, 6) + 1):
                modality, body_part = rng.choice(SERIES_KINDS)
                series = {
                    "SeriesInstanceUID": f"{UID_ROOT}9.2.{seed}.{p}.{s}.{r}",
                    "Modality": modality,
                    "SeriesNumber": str(r),
                    "BodyPartExamined": body_part,
                }
                image_set_id = uuid.uuid4().hex
                document = _document(datastore_id, image_set_id, patient, study, series, rng.randint(1, 4))
                tags = dicom_tags_summary(document)
                series_uids.append(series["SeriesInstanceUID"])
                batch.append(
                    ImageSetWrite(
                        image_set_id=image_set_id,
                        datastore_id=datastore_id,
                        version=1,
                        is_primary=True,
                        study_uid=study["StudyInstanceUID"],
                        series_uid=series["SeriesInstanceUID"],
                        patient_id=tags["DICOMPatientId"] or "",
                        accession_number=tags["DICOMAccessionNumber"] or "",
                        study_id=tags["DICOMStudyId"] or "",
                        study_date_time=normalize_study_date_time(
                            tags["DICOMStudyDate"], tags["DICOMStudyTime"]
                        ),
                        dicom_tags=tags,
                        metadata=document,
                    )
                )
            batches.append(batch)
            planned += len(batch)
    written = 0
    step = 365 * 86400 / len(batches)
    with store.transaction() as db:
        for index, batch in enumerate(batches):
            batch = batch[: image_sets - written]
            if not batch:
                break
            store.write_image_sets(db, batch, first_update + index * step + rng.random() * step / 2)
            written += len(batch)
    store.close()
    return {
        "datastore_id": datastore_id,
        "image_sets": written,
        "patients": patients,
        "series_uids": series_uids[:written],
        "studies": len(batches),
        "first_update": first_update,
    }


def _timed_pages(hi: Any, datastore_id: str, criteria: dict[str, Any] | None, max_pages: int) -> list[float]:
    """Page through a search (at most ``max_pages`` calls); return each call's wall milliseconds."""
    times: list[float] = []
    token: str | None = None
    while len(times) < max_pages:
        kwargs: dict[str, Any] = {"datastoreId": datastore_id, "maxResults": PAGE_SIZE}
        if criteria:
            kwargs["searchCriteria"] = criteria
        if token:
            kwargs["nextToken"] = token
        started = time.perf_counter()
        page = hi.search_image_sets(**kwargs)
        times.append((time.perf_counter() - started) * 1000)
        token = page.get("nextToken")
        if not token:
            break
    return times


def _study_dt(day: date) -> dict[str, Any]:
    return {"DICOMStudyDateAndTime": {"DICOMStudyDate": day.strftime("%Y%m%d"), "DICOMStudyTime": "000000"}}


def search_run(hi: Any, seeded: dict[str, Any], rng: random.Random) -> dict[str, list[float]]:
    """One run of every query type; returns the per-page milliseconds by query type.

    :param hi: a medical-imaging client.
    :param seeded: what :func:`seed_store` wrote.
    :param rng: picks patients, series and windows.
    """
    ds = seeded["datastore_id"]
    samples: dict[str, list[float]] = {}
    samples["default"] = _timed_pages(hi, ds, None, 200)
    samples["patient_id_equal"] = [
        t
        for pid in rng.sample(seeded["patients"], 200)
        for t in _timed_pages(
            hi, ds, {"filters": [{"values": [{"DICOMPatientId": pid}], "operator": "EQUAL"}]}, 10
        )
    ]
    windows = [FIRST_DAY + timedelta(days=rng.randrange(DAYS - 90)) for _ in range(20)]
    for name, sort in (
        ("study_date_between", None),
        ("study_date_between_sorted", {"sortField": "DICOMStudyDateAndTime", "sortOrder": "ASC"}),
    ):
        samples[name] = []
        for start in windows:
            criteria: dict[str, Any] = {
                "filters": [
                    {
                        "values": [_study_dt(start), _study_dt(start + timedelta(days=90))],
                        "operator": "BETWEEN",
                    }
                ]
            }
            if sort:
                criteria["sort"] = sort
            samples[name] += _timed_pages(hi, ds, criteria, 10)
    samples["updated_at_between_asc"] = []
    for _ in range(20):
        low = seeded["first_update"] + rng.random() * 335 * 86400
        criteria = {
            "filters": [
                {
                    "values": [
                        {"updatedAt": datetime.fromtimestamp(low, UTC)},
                        {"updatedAt": datetime.fromtimestamp(low + 30 * 86400, UTC)},
                    ],
                    "operator": "BETWEEN",
                }
            ],
            "sort": {"sortField": "updatedAt", "sortOrder": "ASC"},
        }
        samples["updated_at_between_asc"] += _timed_pages(hi, ds, criteria, 10)
    samples["series_uid_equal"] = [
        t
        for uid in rng.sample(seeded["series_uids"], 200)
        for t in _timed_pages(
            hi, ds, {"filters": [{"values": [{"DICOMSeriesInstanceUID": uid}], "operator": "EQUAL"}]}, 10
        )
    ]
    return samples


class RssSampler:
    """Samples a process's RSS every ``interval`` seconds in a thread; ``peak`` is the largest sample.

    :param endpoint: the endpoint process.
    :param interval: seconds between samples.
    """

    def __init__(self, endpoint: ServeProcess, interval: float = 0.05) -> None:
        self.endpoint = endpoint
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.endpoint.rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> int:
    """Seed, run the benchmark and record it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-sets", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--json", type=Path, default=None, help="output file (default results/...)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-search-"))
    state = work / "state"
    started = time.perf_counter()
    seeded = seed_store(state, args.image_sets, args.seed)
    seed_s = time.perf_counter() - started
    print(f"seeded {seeded['image_sets']} image sets in {seed_s:.1f} s", flush=True)
    memory: dict[str, Any] = {"state_dir_bytes_after_seed": folder_bytes(state)}
    rng = random.Random(args.seed)
    runs: list[dict[str, Any]] = []
    with ServeProcess(state, work / "endpoint.log") as endpoint:
        memory["start_s"] = endpoint.start_seconds
        memory["rss_bytes_after_start"] = endpoint.rss_bytes()
        endpoint.reset_peak_rss()
        hi = client(endpoint.url, "medical-imaging")
        with RssSampler(endpoint) as sampler:
            for run in range(1, args.runs + 1):
                samples = search_run(hi, seeded, rng)
                figures = {name: percentiles(values) for name, values in samples.items()}
                runs.append({"run": run, "per_page_ms": figures, "samples_ms": samples})
                print(
                    f"run {run}: " + ", ".join(f"{n} p95 {f['p95']:.1f} ms" for n, f in figures.items()),
                    flush=True,
                )
        memory["peak_rss_bytes_during_search_vmhwm"] = endpoint.peak_rss_bytes()
        memory["peak_rss_bytes_during_search_sampled"] = sampler.peak
        memory["rss_bytes_after_search"] = endpoint.rss_bytes()
        memory["state_dir_bytes_after_search"] = folder_bytes(state)
        if args.memory:
            s3 = client(endpoint.url, "s3")
            s3.create_bucket(Bucket=BUCKET)
            uploaded = upload(
                synthetic_study_files(10, 1, 5, 100, seed=args.seed + 100), s3, BUCKET, "input/"
            )
            memory["rss_bytes_after_upload_5000"] = endpoint.rss_bytes()
            endpoint.reset_peak_rss()
            job = run_import_job(
                hi, seeded["datastore_id"], f"s3://{BUCKET}/input/", f"s3://{BUCKET}/output/"
            )
            if job["status"] != "COMPLETED":
                raise SystemExit(f"import job ended {job['status']}; see {endpoint.log_path}")
            memory["import_files"] = uploaded.files
            memory["import_job"] = job
            memory["peak_rss_bytes_during_import_vmhwm"] = endpoint.peak_rss_bytes()
            memory["rss_bytes_after_import_5000"] = endpoint.rss_bytes()
            memory["state_dir_bytes_after_import"] = folder_bytes(state)
        memory["state_dir_breakdown_bytes"] = {
            "sqlite": sum(p.stat().st_size for p in state.glob("healthimaging.sqlite3*")),
            "s3": folder_bytes(state / "s3"),
        }

    names = list(runs[0]["per_page_ms"])
    medians = {
        name: {
            q: float(sorted(r["per_page_ms"][name][q] for r in runs)[len(runs) // 2])
            for q in ("p50", "p95", "p99")
        }
        for name in names
    }
    pooled = {name: percentiles([t for r in runs for t in r["samples_ms"][name]]) for name in names}
    result: dict[str, Any] = {
        "benchmark": "search_latency",
        "command": command_line(),
        "machine": machine(),
        "endpoint_command": " ".join(endpoint.command),
        "set_up": {
            "image_sets": seeded["image_sets"],
            "patients": len(seeded["patients"]),
            "studies": seeded["studies"],
            "seed_s": seed_s,
            "page_size": PAGE_SIZE,
            "timing": "client wall time of each stock boto3 search_image_sets call over HTTP (one page)",
        },
        "runs": [{"run": r["run"], "per_page_ms": r["per_page_ms"]} for r in runs],
        "median_over_runs_ms": medians,
        "pooled_ms": pooled,
        "target_p95_ms_at_most": TARGET_P95_MS,
        "passed": all(m["p95"] <= TARGET_P95_MS for m in medians.values()),
        "memory": memory,
    }
    write_result("search_latency", result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
