"""The how-to pages under docs/howto include every snippet the code marks, as the code has it now."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _sync_module():
    spec = importlib.util.spec_from_file_location(
        "sync_howto_snippets", ROOT / "scripts" / "sync_howto_snippets.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_every_snippet_has_a_page_and_every_page_is_current() -> None:
    sync = _sync_module()
    code = sync.snippets()
    assert {
        "howto_operator_start_dicom_import",
        "howto_sensor_dicom_import_job",
        "howto_operator_search_image_sets",
    } <= set(code)
    included = {}
    for page in sync.PAGES:
        text = page.read_text()
        for match in sync.PAGE_MARKER.finditer(text):
            included[match[2]] = page.name
        assert sync.synced(text, code) == text, f"{page.name} is stale: run scripts/sync_howto_snippets.py"
    assert set(code) <= set(included), (
        f"snippets no how-to page includes: {sorted(set(code) - set(included))}"
    )


def test_a_changed_snippet_makes_the_page_stale() -> None:
    sync = _sync_module()
    code = sync.snippets()
    page = next(p for p in sync.PAGES if "howto_operator_start_dicom_import" in p.read_text())
    changed = {**code, "howto_operator_start_dicom_import": "start = StartDICOMImportOperator(task_id='x')\n"}
    assert sync.synced(page.read_text(), changed) != page.read_text()
