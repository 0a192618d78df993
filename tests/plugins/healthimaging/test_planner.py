"""The import planner on synthetic listings: edge shapes, packing, staging, refusal, determinism, properties."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from healthimaging import planner
from healthimaging.planner import (
    EmptyPrefixError,
    ImportLimits,
    Plan,
    PlanError,
    PlanSettings,
    S3Object,
    StagingRequiredError,
    content_digest,
    list_objects,
    nested_folders,
    read_plan,
    write_plan,
)

ROOT = Path(__file__).resolve().parents[3]
INPUT = "s3://input-bucket/day/"
STAGING = "s3://staging-bucket/stage/"
GB = 1000**3


def make_plan(listing: list[S3Object], uri: str = INPUT, **settings: Any) -> Plan:
    return planner.plan_objects(listing, uri, PlanSettings(**settings))


def obj(key: str, size: int = 100) -> S3Object:
    return S3Object(key, size, f"etag-{abs(hash(key)) % 10**8:08d}")


def folder(path: str, files: int, size: int = 100) -> list[S3Object]:
    return [obj(f"{path}f{i:05d}.dcm", size) for i in range(files)]


def check(plan: Plan, listing: list[S3Object]) -> None:
    """An independent check (plain ``startswith`` over the listing) that the plan covers it exactly."""
    keys = sorted(o.key for o in listing if not o.key.endswith("/"))
    placed: list[str] = []
    limits = plan.limits
    for chunk in plan.chunks:
        chunk_keys = [o.key for o in chunk.objects]
        assert chunk_keys == sorted(chunk_keys)
        placed += chunk_keys
        job_prefix = chunk.input_s3_uri.split("/", 3)[3]
        if chunk.staged:
            assert chunk.input_s3_uri.startswith(plan.staging_s3_uri or "-")
            job_keys = [chunk.staged_key(k) for k in chunk_keys]
            assert all(k.startswith(job_prefix) for k in job_keys)
        else:
            job_keys = [k for k in keys if k.startswith(job_prefix)]
            assert job_keys == chunk_keys, f"{chunk.input_s3_uri} holds other objects"
        # The local endpoint's own count (folders that hold files) is never above the planner's.
        endpoint_count = len({k[len(job_prefix) :].rpartition("/")[0] for k in job_keys} - {""})
        assert endpoint_count <= nested_folders(job_keys, job_prefix) == chunk.folders
        assert chunk.files <= limits.max_files_per_job
        assert chunk.bytes <= limits.max_bytes_per_job
        assert chunk.folders <= limits.max_folders_per_job
        assert chunk.digest == content_digest(chunk.objects)
        assert chunk.id.endswith(chunk.digest[:10])
    refused = [r.key for r in plan.refused]
    assert sorted(placed + refused) == sorted(keys), "every object in exactly one chunk or refused"
    for r in plan.refused:
        assert r.size > min(limits.max_file_bytes, limits.max_bytes_per_job)


def prefixes(plan: Plan) -> list[str]:
    return [c.input_s3_uri for c in plan.chunks]


# ------------------------------------------------------------------------------------------- shapes


def test_a_prefix_that_fits_is_one_chunk_with_the_prefix_itself() -> None:
    listing = folder("day/P1/s1/", 10) + folder("day/P2/s1/", 10)
    plan = make_plan(listing, INPUT)
    check(plan, listing)
    assert prefixes(plan) == [INPUT]
    assert plan.chunks[0].label == "(whole prefix)"
    assert plan.chunks[0].folders == 4  # P1/, P1/s1/, P2/, P2/s1/


def test_one_huge_folder_of_loose_files_is_staged_in_quota_sized_chunks() -> None:
    listing = folder("day/flat/", 12_000)
    plan = make_plan(listing, INPUT, staging_s3_uri=STAGING, run_scope="run-1")
    check(plan, listing)
    assert [c.files for c in plan.chunks] == [5000, 5000, 2000]
    assert all(c.staged for c in plan.chunks)
    assert all(c.input_s3_uri == f"{STAGING}run-1/{c.id}/" for c in plan.chunks)
    assert [c.label for c in plan.chunks] == ["staged 1/3", "staged 2/3", "staged 3/3"]
    first = plan.chunks[0]
    # The staged copy keeps its original key below the chunk prefix, and maps back.
    assert first.staged_key("day/flat/f00000.dcm") == f"stage/run-1/{first.id}/day/flat/f00000.dcm"
    assert first.original_key(f"stage/run-1/{first.id}/day/flat/f00000.dcm") == "day/flat/f00000.dcm"
    assert first.original_key(f"s3://staging-bucket/stage/run-1/{first.id}/day/x.dcm") == "day/x.dcm"


def test_more_loose_files_than_one_job_takes_without_staging_is_a_clear_error() -> None:
    listing = folder("day/flat/", 5001)
    with pytest.raises(StagingRequiredError) as error:
        make_plan(listing, INPUT)
    message = str(error.value)
    assert "5001 file(s) in 1 folder(s)" in message
    assert (
        "s3://input-bucket/day/flat/: 5001 file(s), 500100 bytes: more loose files than one job takes"
        in message
    )
    assert "Set staging_s3_uri" in message
    assert "f00000" not in message  # folders and counts, never object keys
    assert error.value.folders[0].s3_uri == "s3://input-bucket/day/flat/"
    with pytest.raises(StagingRequiredError, match="Set \\[healthimaging\\] staging_s3_uri"):
        make_plan(listing, INPUT, staging_setting="[healthimaging] staging_s3_uri")


def test_loose_files_beside_folders_of_a_folder_over_quota_are_staged() -> None:
    listing = folder("day/P1/", 3000) + folder("day/P2/", 3000) + [obj("day/notes.txt"), obj("day/P.txt")]
    with pytest.raises(StagingRequiredError) as error:
        make_plan(listing, INPUT)
    assert error.value.folders == [
        planner.UnreachableFolder(
            "s3://input-bucket/day/",
            2,
            200,
            "loose files beside the sub-folders of a folder that does not fit one job",
        )
    ]
    plan = make_plan(listing, INPUT, staging_s3_uri=STAGING)
    check(plan, listing)
    # "day/P" would also hold the loose day/P.txt, so P1/ and P2/ get prefixes of their own.
    assert prefixes(plan)[:2] == ["s3://input-bucket/day/P1/", "s3://input-bucket/day/P2/"]
    assert [sorted(o.key for o in c.objects) for c in plan.staged_chunks] == [["day/P.txt", "day/notes.txt"]]
    assert plan.run_scope == f"plan-{plan.listing_digest[:16]}"


def test_deep_trees_descend_to_the_level_that_fits() -> None:
    chain = "day/" + "".join(f"d{i}/" for i in range(40))
    listing = folder(chain + "a/", 4000) + folder(chain + "b/", 4000) + folder("day/other/x/y/", 10)
    plan = make_plan(listing, INPUT)
    check(plan, listing)
    assert prefixes(plan) == [
        f"s3://input-bucket/{chain}a/",
        f"s3://input-bucket/{chain}b/",
        f"{INPUT}other/",
    ]
    assert plan.chunks[2].folders == 2


def test_a_deep_chain_that_fits_counts_every_nested_folder() -> None:
    chain = "day/" + "".join(f"d{i}/" for i in range(300))
    listing = folder(chain, 2)
    plan = make_plan(listing, INPUT)
    check(plan, listing)
    assert plan.chunks[0].folders == 300


def test_many_tiny_folders_are_packed_into_the_fewest_prefixes() -> None:
    listing = [o for n in range(1000) for o in folder(f"day/S{n:04d}/", 3)]
    plan = make_plan(listing, INPUT, limits=ImportLimits(max_files_per_job=100))
    check(plan, listing)
    # 10 folders (30 files) share each "day/S0xy" prefix; 100 folders would be 300 files, over the limit.
    assert prefixes(plan) == [f"s3://input-bucket/day/S0{n:02d}" for n in range(100)]
    assert {c.folders for c in plan.chunks} == {10}
    assert plan.chunks[0].label == "S000*"


def test_string_prefix_trap_p1_also_matches_p10() -> None:
    listing = folder("day/P1/", 3) + folder("day/P10/", 3) + folder("day/P2/", 3)
    tight = make_plan(listing, INPUT, limits=ImportLimits(max_files_per_job=5))
    check(tight, listing)
    assert prefixes(tight) == [f"{INPUT}P1/", f"{INPUT}P10/", f"{INPUT}P2/"]  # never "day/P1" for P1 alone

    roomy = make_plan(listing, INPUT, limits=ImportLimits(max_files_per_job=6))
    check(roomy, listing)
    assert prefixes(roomy) == [f"{INPUT}P1", f"{INPUT}P2/"]  # "day/P1" holds exactly P1/ and P10/
    assert roomy.chunks[0].files == 6
    assert roomy.chunks[0].folders == 2


def test_a_sibling_over_quota_splits_its_string_prefix() -> None:
    listing = folder("day/P1/", 3) + folder("day/P10/a/", 4) + folder("day/P10/b/", 4)
    plan = make_plan(listing, INPUT, limits=ImportLimits(max_files_per_job=5))
    check(plan, listing)
    assert prefixes(plan) == [f"{INPUT}P1/", f"{INPUT}P10/a/", f"{INPUT}P10/b/"]


def test_a_file_over_the_per_file_limit_is_refused_and_no_prefix_holds_it() -> None:
    big = obj("day/P1/s1/big.dcm", 11 * GB)
    listing = [*folder("day/P1/s1/", 5), big, *folder("day/P1/s2/", 5), *folder("day/P2/", 5)]
    with pytest.raises(StagingRequiredError, match="beside a file refused as larger than 10000000000 bytes"):
        make_plan(listing, INPUT)
    plan = make_plan(listing, INPUT, staging_s3_uri=STAGING)
    check(plan, listing)
    assert plan.refused == [planner.RefusedObject(big.key, big.size, big.etag, "FILE_TOO_LARGE")]
    # P1/ and P1/s1/ hold the refused file: s1's other files are staged, s2/ and P2/ keep their prefixes.
    assert prefixes(plan) == [f"{INPUT}P1/s2/", f"{INPUT}P2/", plan.staged_chunks[0].input_s3_uri]
    assert [o.key for o in plan.staged_chunks[0].objects] == [f"day/P1/s1/f{i:05d}.dcm" for i in range(5)]
    totals = plan.totals()
    assert (totals["refused_files"], totals["refused_bytes"], totals["files"]) == (1, 11 * GB, 15)


def test_a_refused_file_alone_in_its_folder_needs_no_staging() -> None:
    listing = [obj("day/P1/big.dcm", 11 * GB), *folder("day/P2/", 5), *folder("day/P3/", 5)]
    plan = make_plan(listing, INPUT)
    check(plan, listing)
    assert prefixes(plan) == [f"{INPUT}P2/", f"{INPUT}P3/"]  # "day/P" would hold the refused file
    assert [r.key for r in plan.refused] == ["day/P1/big.dcm"]


def test_the_older_4_gb_per_file_limit_is_a_setting() -> None:
    listing = [obj("day/a/x.dcm", 5 * GB), obj("day/b/y.dcm", 3 * GB)]
    assert make_plan(listing, INPUT).refused == []
    plan = make_plan(listing, INPUT, limits=ImportLimits(max_file_bytes=4 * GB))
    check(plan, listing)
    assert [r.key for r in plan.refused] == ["day/a/x.dcm"]
    assert prefixes(plan) == [f"{INPUT}b/"]


def test_the_10000_nested_folder_limit() -> None:
    limits = ImportLimits(max_files_per_job=100_000)
    listing = [obj(f"day/f{n:05d}/x.dcm") for n in range(10_001)]
    plan = make_plan(listing, INPUT, limits=limits)
    check(plan, listing)
    # "day/f0" holds f00000/ .. f09999/: exactly 10,000 folders; f10000/ goes alone.
    assert prefixes(plan) == [f"{INPUT}f0", f"{INPUT}f10000/"]
    assert [c.folders for c in plan.chunks] == [10_000, 0]


def test_intermediate_folders_count_toward_the_folder_limit() -> None:
    # 3,400 patients x 1 study x 2 series: 6,800 files but 13,600 nested folders (4 per patient).
    listing = [obj(f"day/p{p:04d}/st/se{s}/i.dcm") for p in range(3400) for s in range(2)]
    plan = make_plan(listing, INPUT, limits=ImportLimits(max_files_per_job=50_000))
    check(plan, listing)
    # "day/p0" .. "day/p2" hold 1,000 patients each; no string prefix holds two of them without "day/p".
    assert prefixes(plan) == [f"{INPUT}p0", f"{INPUT}p1", f"{INPUT}p2", f"{INPUT}p3"]
    assert [c.folders for c in plan.chunks] == [4000, 4000, 4000, 1600]


def test_the_bytes_limit_packs_only_what_a_prefix_can_hold() -> None:
    listing = folder("day/x1/", 4, GB) + folder("day/x2/", 4, GB) + folder("day/y/", 4, GB)
    plan = make_plan(listing, INPUT)
    check(plan, listing)
    assert prefixes(plan) == [f"{INPUT}x", f"{INPUT}y/"]
    assert [c.bytes for c in plan.chunks] == [8 * GB, 4 * GB]


def test_an_empty_prefix_is_its_own_outcome() -> None:
    with pytest.raises(EmptyPrefixError, match="The input prefix s3://input-bucket/day/ holds no objects"):
        make_plan([], INPUT)
    with pytest.raises(EmptyPrefixError):
        make_plan([S3Object("day/folder/", 0, "d41d8cd98f00b204e9800998ecf8427e")], INPUT)
    plan = make_plan([S3Object("day/folder/", 0, "x")], INPUT, allow_empty=True)
    assert plan.empty
    assert plan.chunks == []
    assert plan.totals()["folder_markers"] == 1
    assert not make_plan([obj("day/big", 11 * GB)], INPUT).empty  # all refused is not empty


def test_folder_markers_are_not_imported_and_do_not_count_as_files() -> None:
    listing = [S3Object("day/", 0, "m"), S3Object("day/P1/", 0, "m"), *folder("day/P1/", 2)]
    plan = make_plan(listing, INPUT)
    check(plan, listing)
    assert plan.totals()["files"] == 2
    assert plan.folder_markers == 2


def test_an_input_prefix_without_a_trailing_slash_is_a_string_prefix() -> None:
    listing = folder("day/a/", 3) + folder("day2/b/", 3) + [obj("dayx.dcm")]
    limits = ImportLimits(max_files_per_job=4)
    plan = make_plan(listing, "s3://input-bucket/day", limits=limits, staging_s3_uri=STAGING)
    check(plan, listing)
    assert prefixes(plan)[:2] == ["s3://input-bucket/day/", "s3://input-bucket/day2/"]
    assert [c.label for c in plan.chunks] == ["/", "2/", "staged 1/1"]
    assert [o.key for o in plan.chunks[2].objects] == ["dayx.dcm"]
    by_name = make_plan(listing, "s3://input-bucket/day", limits=limits, loose_file_prefixes=True)
    check(by_name, listing)
    assert prefixes(by_name) == [
        "s3://input-bucket/day/",
        "s3://input-bucket/day2/",
        "s3://input-bucket/dayx.dcm",
    ]


def test_loose_file_prefixes_reach_loose_files_by_name_instead_of_staging() -> None:
    listing = folder("day/flat/", 12_000) + folder("day/P1/", 10)
    plan = make_plan(listing, INPUT, loose_file_prefixes=True)
    check(plan, listing)
    assert not plan.staged_chunks
    # f00000-f09999 is 10,000 files, so "flat/f0" splits into f00..f09; "flat/f1" holds the other 2,000.
    assert prefixes(plan) == [f"{INPUT}P1/"] + [f"{INPUT}flat/f0{d}" for d in range(10)] + [f"{INPUT}flat/f1"]


def test_loose_file_prefixes_stage_a_file_whose_name_only_a_crowded_prefix_holds() -> None:
    listing = [obj("day/a"), *folder("day/a", 5), *folder("day/b/", 9)]  # "day/a" is a file and a name prefix
    plan = make_plan(
        listing,
        INPUT,
        limits=ImportLimits(max_files_per_job=5),
        loose_file_prefixes=True,
        staging_s3_uri=STAGING,
    )
    check(plan, listing)
    assert [o.key for c in plan.staged_chunks for o in c.objects] == ["day/a"]


# ------------------------------------------------------------------------------------------- bad input


def test_bad_input_is_refused_before_anything_starts() -> None:
    with pytest.raises(PlanError, match="must be an s3://bucket/prefix URI"):
        make_plan([], "input-bucket/day/")
    with pytest.raises(PlanError, match="outside the prefix"):
        make_plan([obj("night/x.dcm")], INPUT)
    with pytest.raises(PlanError, match="repeated key"):
        make_plan([obj("day/x.dcm"), obj("day/x.dcm")], INPUT)
    loose = folder("day/flat/", 6)
    limits = ImportLimits(max_files_per_job=5)
    for staging, scope in (
        ("s3://input-bucket/day/stage/", "r"),
        ("s3://input-bucket/", "day"),
        ("s3://input-bucket/day", "r"),
    ):
        with pytest.raises(PlanError, match="overlaps the input prefix"):
            make_plan(loose, INPUT, limits=limits, staging_s3_uri=staging, run_scope=scope)
    make_plan(loose, INPUT, limits=limits, staging_s3_uri="s3://input-bucket/staging/")  # a sibling is fine
    make_plan(loose, INPUT, limits=limits, staging_s3_uri="s3://input-bucket/da", run_scope="day")  # da/day/
    with pytest.raises(PlanError, match="run_scope must match"):
        make_plan(loose, INPUT, limits=limits, staging_s3_uri=STAGING, run_scope="a/b")
    with pytest.raises(PlanError, match="would have keys of 1049 bytes, more than S3's 1024"):
        make_plan(
            [obj("day/" + "k" * 1000 + f"{i}") for i in range(6)],
            INPUT,
            limits=limits,
            staging_s3_uri=STAGING,
        )
    with pytest.raises(PlanError, match="one would sit 3 folders deep, more than max_folders_per_job=2"):
        make_plan(
            folder("day/a/b/", 3),
            INPUT,
            limits=ImportLimits(max_files_per_job=2, max_folders_per_job=2),
            staging_s3_uri=STAGING,
        )
    with pytest.raises(ValueError, match="max_files_per_job must be a positive integer"):
        ImportLimits(max_files_per_job=0)


def test_verify_plan_catches_a_plan_that_misses_or_repeats_objects() -> None:
    listing = folder("day/a/", 3) + folder("day/b/", 3)
    plan = make_plan(listing, INPUT, limits=ImportLimits(max_files_per_job=3))
    with pytest.raises(PlanError, match="0 object\\(s\\) in more than one chunk, 1 in none"):
        planner.verify_plan(plan, [*listing, obj("day/c.dcm")])
    plan.chunks.append(plan.chunks[0])
    with pytest.raises(PlanError, match="3 object\\(s\\) in more than one chunk"):
        planner.verify_plan(plan, listing)


# ------------------------------------------------------------------------------------------- determinism, documents


def test_the_same_listing_in_another_order_gives_the_same_plan() -> None:
    listing = (
        folder("day/P1/", 3000) + folder("day/P10/", 10) + folder("day/flat/", 7000) + [obj("day/n.txt")]
    )
    shuffled = listing[:]
    random.Random(7).shuffle(shuffled)
    first = make_plan(listing, INPUT, staging_s3_uri=STAGING)
    second = make_plan(shuffled, INPUT, staging_s3_uri=STAGING)
    assert first.summary() == second.summary()
    assert json.dumps(materialise(first.document())) == json.dumps(materialise(second.document()))
    assert prefixes(first)[0] == f"{INPUT}P1"  # P1/ and P10/ together, then two staged chunks
    assert [c.id for c in first.chunks] == [f"{n:04d}-{c.digest[:10]}" for n, c in enumerate(first.chunks, 1)]
    assert len(first.chunks) == 3


def materialise(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: materialise(v) for k, v in value.items()}
    if isinstance(value, list | tuple) or hasattr(value, "__next__"):
        return [materialise(v) for v in value]
    return value


def test_the_summary_names_prefixes_and_counts_but_no_object_key() -> None:
    listing = folder("day/DOE^JANE/", 3000) + folder("day/ROE^JOHN/", 3000) + [obj("day/SMITH.dcm")]
    plan = make_plan(listing, INPUT, staging_s3_uri=STAGING)
    text = json.dumps(plan.summary())
    assert "SMITH" not in text
    assert "f00000" not in text
    assert set(plan.summary()["chunks"][0]) == {
        "id",
        "input_s3_uri",
        "label",
        "files",
        "bytes",
        "folders",
        "staged",
        "digest",
    }
    assert plan.summary()["totals"] == {
        "files": 6001,
        "bytes": 600100,
        "chunks": 3,
        "staged_chunks": 1,
        "staged_files": 1,
        "staged_bytes": 100,
        "refused_files": 0,
        "refused_bytes": 0,
        "folder_markers": 0,
    }


@pytest.mark.parametrize("name", ["plans/plan.json", "plans/plan.json.gz"])
def test_the_plan_document_round_trips_through_s3(s3: Any, name: str) -> None:
    listing = folder("day/P1/", 4000) + folder("day/P2/", 4000) + [obj("day/x.dcm"), obj("day/big", 11 * GB)]
    plan = make_plan(listing, INPUT, staging_s3_uri=STAGING, run_scope="r1")
    uri = write_plan(s3, plan, f"s3://output-bucket/{name}")
    body = s3.get_object(Bucket="output-bucket", Key=name)["Body"].read()
    document = json.loads(gzip.decompress(body) if name.endswith(".gz") else body)
    assert document["format"] == "healthimaging-import-plan/1"
    assert document["chunks"][0]["objects"][0] == ["day/P1/f00000.dcm", listing[0].etag, 100]
    assert document["refused"] == [["day/big", listing[-1].etag, 11 * GB, "FILE_TOO_LARGE"]]
    again = read_plan(s3, uri)
    assert again.summary() == plan.summary()
    assert again.chunks == plan.chunks
    assert again.refused == plan.refused
    with pytest.raises(PlanError, match="Not a plan document"):
        Plan.from_document({"format": "other"})


def test_list_objects_streams_pages_and_keeps_key_size_and_etag_only() -> None:
    calls: list[dict[str, Any]] = []

    class Paginator:
        def paginate(self, **kwargs: Any) -> Any:
            calls.append(kwargs)
            yield {"Contents": [{"Key": "day/a", "Size": 3, "ETag": '"abc"', "StorageClass": "STANDARD"}]}
            yield {"KeyCount": 0}
            yield {"Contents": [{"Key": "day/b", "Size": 4, "ETag": '"def-2"'}]}

    class Client:
        def get_paginator(self, name: str) -> Paginator:
            assert name == "list_objects_v2"
            return Paginator()

    assert list(list_objects(Client(), "s3://input-bucket/day/", page_size=500)) == [
        S3Object("day/a", 3, "abc"),
        S3Object("day/b", 4, "def-2"),
    ]
    assert calls == [{"Bucket": "input-bucket", "Prefix": "day/", "PaginationConfig": {"PageSize": 500}}]


def test_listing_leaves_timestamps_unparsed_while_it_runs_only(s3: Any) -> None:
    """LastModified stays text during the planner's listing (it is never read) and is parsed again after."""
    from datetime import datetime

    for n in range(3):
        s3.put_object(Bucket="input-bucket", Key=f"day/{n}.dcm", Body=b"x")
    listing = list_objects(s3, "s3://input-bucket/day/", page_size=1)
    first = next(listing)
    assert (first.key, first.size) == ("day/0.dcm", 1)
    during = s3.list_objects_v2(Bucket="input-bucket", Prefix="day/")["Contents"][0]["LastModified"]
    assert isinstance(during, str)
    assert [o.key for o in listing] == ["day/1.dcm", "day/2.dcm"]
    after = s3.list_objects_v2(Bucket="input-bucket", Prefix="day/")["Contents"][0]["LastModified"]
    assert isinstance(after, datetime)


def test_plan_prefix_lists_moto_s3(s3: Any) -> None:
    for key in ("day/P1/a.dcm", "day/P1/b.dcm", "day/P2/c.dcm", "day/P2/"):
        s3.put_object(Bucket="input-bucket", Key=key, Body=b"x" * 10)
    plan = planner.plan_prefix(s3, INPUT, PlanSettings(ImportLimits(max_files_per_job=2)))
    assert prefixes(plan) == [f"{INPUT}P1/", f"{INPUT}P2/"]
    assert plan.chunks[0].objects[0].etag == "336311a016184326ddbdd61edd4eeb52"  # md5 of b"x" * 10, no quotes
    assert plan.folder_markers == 1


def test_modules_import_no_aws_sdk() -> None:
    code = (
        "import sys, json; import healthimaging.planner, healthimaging.staging, healthimaging.report;"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore', 'aiobotocore'))))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "plugins")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert json.loads(out.stdout) == []


# ------------------------------------------------------------------------------------------- properties

NAMES = ["P1", "P10", "P2", "a", "ab", "b", "a.dcm", "P1.dcm"]


@st.composite
def listings(draw: Any) -> list[S3Object]:
    """Random trees over names that are string prefixes of each other, with some files over the limit."""
    keys: dict[str, int] = {}

    def grow(path: str, depth: int) -> None:
        for name in draw(st.lists(st.sampled_from(NAMES), max_size=4, unique=True)):
            if depth < 3 and draw(st.booleans()):
                grow(f"{path}{name}/", depth + 1)
            else:
                keys[path + name] = draw(st.sampled_from([1, 5, 20, 60]))

    grow("day/", 0)
    return [S3Object(k, size, f"e{n}") for n, (k, size) in enumerate(sorted(keys.items()))]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    listing=listings(),
    files=st.integers(1, 8),
    size=st.integers(20, 200),
    folders=st.integers(4, 12),  # from 4: a staged copy keeps its key, up to 4 folders deep here
    loose_file_prefixes=st.booleans(),
)
def test_every_object_is_in_exactly_one_fitting_chunk_or_refused(
    listing: list[S3Object], files: int, size: int, folders: int, loose_file_prefixes: bool
) -> None:
    limits = ImportLimits(
        max_files_per_job=files, max_bytes_per_job=size, max_folders_per_job=folders, max_file_bytes=50
    )
    try:
        plan = make_plan(
            listing, INPUT, limits=limits, staging_s3_uri=STAGING, loose_file_prefixes=loose_file_prefixes
        )
    except EmptyPrefixError:
        assert not listing
        return
    check(plan, listing)


@st.composite
def sibling_folders(draw: Any) -> dict[str, int]:
    names = draw(
        st.lists(
            st.text("ab1/", min_size=1, max_size=3).filter(lambda n: "/" not in n),
            min_size=1,
            max_size=6,
            unique=True,
        )
    )
    return {name: draw(st.integers(1, 4)) for name in names}


@settings(max_examples=200, deadline=None)
@given(siblings=sibling_folders(), limit=st.integers(4, 8))
def test_packing_takes_the_fewest_prefixes(siblings: dict[str, int], limit: int) -> None:
    listing = [o for name, count in siblings.items() for o in folder(f"day/{name}/", count)]
    plan = make_plan(listing, INPUT, limits=ImportLimits(max_files_per_job=limit))
    check(plan, listing)
    assert len(plan.chunks) == fewest_prefixes(siblings, limit)


def fewest_prefixes(siblings: dict[str, int], limit: int) -> int:
    """Brute force: the smallest set of string prefixes that hold the sibling folders, each set within ``limit``."""
    if sum(siblings.values()) <= limit:
        return 1
    entries = [f"{name}/" for name in siblings]
    candidates = {
        frozenset(e for e in entries if e.startswith(p))
        for e in entries
        for p in (e[:n] for n in range(len(e) + 1))
    }
    fitting = [c for c in candidates if sum(siblings[e[:-1]] for e in c) <= limit]
    for size in range(1, len(entries) + 1):
        for choice in itertools.combinations(fitting, size):
            if sum(len(c) for c in choice) == len(entries) and frozenset().union(*choice) == set(entries):
                return size
    raise AssertionError("unreachable: every folder fits alone")
