"""Shared fixtures: ``endpoint`` is a running local HealthImaging + S3 endpoint on a fresh state dir."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from healthimaging_local.server import LocalEndpoint


@pytest.fixture
def endpoint(tmp_path: Path) -> Iterator[LocalEndpoint]:
    """A running :class:`LocalEndpoint` (127.0.0.1, free port) on ``tmp_path / "state"``; stopped afterwards."""
    with LocalEndpoint(tmp_path / "state") as running:
        yield running
