"""
Settings of the ``[healthimaging]`` section of Airflow's configuration.

Declared in :func:`provider_config` (``get_provider_info()["config"]``), so ``airflow config list --section
healthimaging`` shows them with their descriptions and defaults; set them in ``airflow.cfg`` or as
``AIRFLOW__HEALTHIMAGING__<NAME>``. Each accessor reads the value when it is called, never at import. The
environment variables of 0.1 (``HEALTHIMAGING_POKE_INTERVAL`` ...) still work for this release, with a
``DeprecationWarning``; a setting of the section wins over them.
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable

T = TypeVar("T")

SECTION = "healthimaging"
VERSION_ADDED = "0.2.0"

#: option -> (type, default as the config file spells it, description).
OPTIONS: dict[str, tuple[str, str, str]] = {
    "poll_interval": (
        "float",
        "30",
        "Seconds between GetDICOMImportJob polls of the import DAG's sensor (read when the DAG file is parsed). "
        "Polls from every sensor count against the service's 25 calls per second per account.",
    ),
    "import_pool": (
        "string",
        "default_pool",
        "Airflow pool of the import pipeline's wait tasks (read when the DAG file is parsed). "
        "Create it with deferred tasks counted, so that deferred waits hold their slots.",
    ),
    "max_active_runs": (
        "integer",
        "8",
        "Parallel runs (nightly, backfill, manual) of the import DAG (read when the DAG file is parsed).",
    ),
    "triggerer_max_polls_per_second": (
        "float",
        "20",
        "GetDICOMImportJob calls per second of one triggerer process, shared by all its deferred sensors (the "
        "service allows 25 per second per account); 0 turns the limit off.",
    ),
    "console_url": (
        "string",
        "https://{region_name}.console.{aws_domain}/medical-imaging/home?region={region_name}",
        "Base URL of the HealthImaging console behind the data store and import job extra links; "
        "``#/data-stores/<id>`` and ``/import-jobs/<id>`` are appended. ``{region_name}`` and ``{aws_domain}`` "
        "(the console domain of the connection's partition) are filled in. Point it elsewhere for another "
        "partition's or an offline console.",
    ),
    "max_files_per_job": (
        "integer",
        "5000",
        "Most files one StartDICOMImportJob is given (the service's default quota, adjustable as L-685AAB3A).",
    ),
    "start_rate": (
        "float",
        "0.25",
        "StartDICOMImportJob calls per second. 0.25 is the conservative documented figure (an older copy of the "
        "throttling page; the current one gives 1 per second, burst 2): raise it if your account's limit is higher.",
    ),
    "max_imports_in_flight": (
        "integer",
        "100",
        "Most import jobs running at once per data store (the service's default quota of 100 concurrent import "
        "jobs, adjustable as L-23763099; 20 in ap-southeast-2).",
    ),
    "max_failed_files": (
        "integer",
        "",
        "Default most failed files a COMPLETED import job may have before its wait fails, when a run names none "
        "(param max_failed_files); empty only warns.",
    ),
    "aws_conn_id": (
        "string",
        "aws_default",
        "Airflow connection of every AWS call of the import pipeline (planning, staging, starts, waits, searches, "
        "the report).",
    ),
}

#: The environment variables these options replace (deprecated; read for one more release).
DEPRECATED_ENV = {
    "poll_interval": "HEALTHIMAGING_POKE_INTERVAL",
    "import_pool": "HEALTHIMAGING_IMPORT_POOL",
    "max_active_runs": "HEALTHIMAGING_MAX_ACTIVE_RUNS",
    "triggerer_max_polls_per_second": "HEALTHIMAGING_TRIGGERER_MAX_POLLS_PER_SECOND",
}


def provider_config() -> dict[str, Any]:
    """The ``config`` entry of ``get_provider_info()``: the ``[healthimaging]`` section and its options."""
    return {
        SECTION: {
            "description": "Settings of the AWS HealthImaging DICOM import package.",
            "options": {
                name: {
                    "description": description,
                    "version_added": VERSION_ADDED,
                    "type": kind,
                    "example": None,
                    "default": default or None,
                }
                for name, (kind, default, description) in OPTIONS.items()
            },
        }
    }


def get(name: str) -> str:
    """
    Read one option as text: ``[healthimaging] <name>``, else its deprecated environment variable, else the default.

    :param name: an option of :data:`OPTIONS`
    """
    from airflow.sdk import conf

    default = OPTIONS[name][1]
    old = DEPRECATED_ENV.get(name)
    if old and old in os.environ:
        new = f"[{SECTION}] {name} (AIRFLOW__{SECTION.upper()}__{name.upper()})"
        warnings.warn(f"{old} is deprecated; set {new} instead", DeprecationWarning, stacklevel=3)
        if not _is_set(conf, name):
            return os.environ[old]
    return str(conf.get(SECTION, name, fallback=default) or default)


def _is_set(conf: Any, name: str) -> bool:
    """Whether the option is set in the environment or airflow.cfg, not only defaulted by the provider's section."""
    if f"AIRFLOW__{SECTION.upper()}__{name.upper()}" in os.environ:
        return True
    return conf.has_option(SECTION, name) and conf.get(SECTION, name, fallback=None) not in (
        None,
        OPTIONS[name][1],
    )


def _optional_int(text: str) -> int | None:
    return int(text) if text.strip() else None


def _accessor(name: str, kind: Callable[[str], T]) -> Callable[[], T]:
    """A function that reads option ``name`` when called and converts it with ``kind``; its docstring is the description."""

    def read() -> T:
        return kind(get(name))

    read.__name__ = read.__qualname__ = name
    read.__doc__ = OPTIONS[name][2]
    return read


poll_interval = _accessor("poll_interval", float)
import_pool = _accessor("import_pool", str)
max_active_runs = _accessor("max_active_runs", int)
triggerer_max_polls_per_second = _accessor("triggerer_max_polls_per_second", float)
console_url = _accessor("console_url", str)
max_files_per_job = _accessor("max_files_per_job", int)
start_rate = _accessor("start_rate", float)
max_imports_in_flight = _accessor("max_imports_in_flight", int)
max_failed_files = _accessor("max_failed_files", _optional_int)
aws_conn_id = _accessor("aws_conn_id", str)
