"""SQLite persistence of data stores, import jobs, image sets and their versions."""

from __future__ import annotations

import base64
import gzip
import hashlib
import hmac
import json
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from healthimaging_local.model import ValidationException

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS datastores (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, status TEXT NOT NULL, client_token TEXT NOT NULL,
    kms_key_arn TEXT, lambda_authorizer_arn TEXT, lossless_storage_format TEXT, tags TEXT NOT NULL,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, settle_at REAL
);
CREATE INDEX IF NOT EXISTS datastores_by_created ON datastores (created_at, id);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, datastore_id TEXT NOT NULL, client_token TEXT NOT NULL, request TEXT NOT NULL,
    name TEXT, status TEXT NOT NULL, role_arn TEXT NOT NULL, input_s3_uri TEXT NOT NULL,
    output_s3_uri TEXT NOT NULL, import_configuration TEXT, submitted_at REAL NOT NULL, ended_at REAL,
    message TEXT, UNIQUE (datastore_id, client_token)
);
CREATE INDEX IF NOT EXISTS jobs_by_datastore ON jobs (datastore_id, submitted_at, id);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status);
CREATE TABLE IF NOT EXISTS image_sets (
    id TEXT PRIMARY KEY, datastore_id TEXT NOT NULL, version INTEGER NOT NULL, state TEXT NOT NULL,
    workflow_status TEXT NOT NULL, is_primary INTEGER NOT NULL, created_at REAL NOT NULL,
    updated_at REAL NOT NULL, deleted_at REAL, settle_at REAL, message TEXT,
    study_uid TEXT NOT NULL, series_uid TEXT NOT NULL, patient_id TEXT NOT NULL DEFAULT '',
    accession_number TEXT NOT NULL DEFAULT '', study_id TEXT NOT NULL DEFAULT '',
    study_date_time TEXT NOT NULL DEFAULT '', dicom_tags TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sets_updated ON image_sets (datastore_id, state, updated_at, id);
CREATE INDEX IF NOT EXISTS sets_created ON image_sets (datastore_id, state, created_at, id);
CREATE INDEX IF NOT EXISTS sets_study_dt ON image_sets (datastore_id, state, study_date_time, id);
CREATE INDEX IF NOT EXISTS sets_patient ON image_sets (datastore_id, patient_id);
CREATE INDEX IF NOT EXISTS sets_accession ON image_sets (datastore_id, accession_number);
CREATE INDEX IF NOT EXISTS sets_study_id ON image_sets (datastore_id, study_id);
CREATE INDEX IF NOT EXISTS sets_study_uid ON image_sets (datastore_id, study_uid);
CREATE INDEX IF NOT EXISTS sets_series ON image_sets (datastore_id, series_uid, is_primary);
CREATE INDEX IF NOT EXISTS sets_settle ON image_sets (settle_at) WHERE settle_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS image_set_versions (
    image_set_id TEXT NOT NULL, version INTEGER NOT NULL, state TEXT NOT NULL, workflow_status TEXT NOT NULL,
    is_primary INTEGER NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL, deleted_at REAL,
    message TEXT, metadata BLOB NOT NULL, PRIMARY KEY (image_set_id, version)
);
CREATE TABLE IF NOT EXISTS settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

ACTIVE_JOB_STATUSES = ("SUBMITTED", "IN_PROGRESS")


@dataclass(frozen=True)
class ImageSetWrite:
    """One image set created or updated by an import job (committed with the job's terminal status)."""

    image_set_id: str
    datastore_id: str
    version: int
    is_primary: bool
    study_uid: str
    series_uid: str
    patient_id: str
    accession_number: str
    study_id: str
    study_date_time: str
    dicom_tags: dict[str, Any]
    metadata: dict[str, Any]


@dataclass
class Settled:
    """What one :meth:`Store.settle` call changed.

    :param datastores: ``id``, ``name``, new ``status`` and ``settle_at`` of each data store that changed.
    :param image_sets: ``id``, ``datastore_id``, ``version``, ``is_primary`` and ``settle_at`` of each image set
        that became DELETED.
    """

    datastores: list[dict[str, Any]] = field(default_factory=list)
    image_sets: list[dict[str, Any]] = field(default_factory=list)


def normalize_study_date_time(date: str | None, time_: str | None) -> str:
    """A sortable ``YYYYMMDDHHMMSS.FFFFFF`` string from DICOM DA and TM values ('' when there is no date).

    :param date: DICOM StudyDate (``YYYYMMDD``).
    :param time_: DICOM StudyTime (``HHMMSS[.FFFFFF]``, may be shortened or absent).
    """
    if not date:
        return ""
    whole, _, fraction = (time_ or "").strip().replace(":", "").partition(".")
    return f"{date.strip()[:8]}{whole[:6].ljust(6, '0')}.{fraction[:6].ljust(6, '0')}"


class Store:
    """Thread-safe access to the emulator's SQLite database.

    :param state_dir: folder holding ``healthimaging.sqlite3``.
    """

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(
            state_dir / "healthimaging.sqlite3", check_same_thread=False, isolation_level=None
        )
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(SCHEMA)
            row = self._conn.execute("SELECT value FROM settings WHERE name='token_key'").fetchone()
            if row is None:
                self._conn.execute("INSERT INTO settings VALUES ('token_key', ?)", (secrets.token_hex(32),))
                row = self._conn.execute("SELECT value FROM settings WHERE name='token_key'").fetchone()
        self._token_key = bytes.fromhex(row["value"])

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A serialised write transaction (committed on success, rolled back on error)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """Run a read query.

        :param sql: the statement.
        :param params: its parameters.
        """
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def query_one(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        """Run a read query returning at most one row.

        :param sql: the statement.
        :param params: its parameters.
        """
        rows = self.query(sql, params)
        return rows[0] if rows else None

    # ------------------------------------------------------------------------------------ tokens

    def encode_token(self, scope: str, key: Sequence[Any]) -> str:
        """An opaque, tamper-evident pagination token.

        :param scope: what the token is valid for (operation, data store, criteria hash).
        :param key: the keyset position (sort values of the last row returned).
        """
        payload = json.dumps([scope_digest(scope), list(key)], separators=(",", ":")).encode()
        mac = hmac.new(self._token_key, payload, hashlib.sha256).digest()[:16]
        return base64.urlsafe_b64encode(mac + payload).decode().rstrip("=")

    def decode_token(self, token: str, scope: str) -> list[Any]:
        """Check and open a pagination token.

        :param token: the token sent by the client.
        :param scope: the scope it must have been issued for.
        :raises ValidationException: if tampered with or issued for other criteria.
        """
        invalid = ValidationException(
            "Invalid nextToken: it was tampered with or issued for other parameters"
        )
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            mac, payload = raw[:16], raw[16:]
            if not hmac.compare_digest(mac, hmac.new(self._token_key, payload, hashlib.sha256).digest()[:16]):
                raise invalid
            digest, key = json.loads(payload)
        except (ValueError, TypeError) as exc:
            raise invalid from exc
        if digest != scope_digest(scope) or not isinstance(key, list):
            raise invalid
        return key

    # ------------------------------------------------------------------------------------ lazy transitions

    def settle(self, now: float | None = None) -> Settled:
        """Finish time-based transitions whose moment has come (CREATING->ACTIVE, DELETING->DELETED).

        Each transition is reported to exactly one caller, even when several settle at once.

        :param now: the current epoch time (default: now).
        :return: the data stores and image sets that changed.
        """
        now = time.time() if now is None else now
        settled = Settled()
        pending = self.query_one(
            "SELECT 1 FROM datastores WHERE settle_at <= ? UNION ALL"
            " SELECT 1 FROM image_sets WHERE settle_at IS NOT NULL AND settle_at <= ? LIMIT 1",
            (now, now),
        )
        if pending is None:
            return settled
        with self.transaction() as db:
            settled.datastores = [
                dict(row)
                for row in db.execute(
                    "SELECT id, name, CASE status WHEN 'CREATING' THEN 'ACTIVE' ELSE 'DELETED' END AS status,"
                    " settle_at FROM datastores WHERE settle_at IS NOT NULL AND settle_at <= ?",
                    (now,),
                )
            ]
            db.execute(
                "UPDATE datastores SET status = CASE status WHEN 'CREATING' THEN 'ACTIVE' ELSE 'DELETED' END,"
                " updated_at = settle_at, settle_at = NULL WHERE settle_at IS NOT NULL AND settle_at <= ?",
                (now,),
            )
            due = db.execute(
                "SELECT id, datastore_id, version, is_primary, settle_at FROM image_sets"
                " WHERE settle_at IS NOT NULL AND settle_at <= ?",
                (now,),
            ).fetchall()
            for row in due:
                db.execute(
                    "UPDATE image_sets SET state='DELETED', workflow_status='DELETED', deleted_at=settle_at,"
                    " updated_at=settle_at, settle_at=NULL WHERE id=?",
                    (row["id"],),
                )
                db.execute(
                    "UPDATE image_set_versions SET state='DELETED', workflow_status='DELETED', deleted_at=?,"
                    " updated_at=? WHERE image_set_id=? AND version=?",
                    (row["settle_at"], row["settle_at"], row["id"], row["version"]),
                )
            settled.image_sets = [dict(row) for row in due]
        return settled

    # ------------------------------------------------------------------------------------ image sets

    def write_image_sets(self, db: sqlite3.Connection, writes: Sequence[ImageSetWrite], now: float) -> None:
        """Insert or update image sets with a new version each (inside the caller's transaction).

        :param db: the connection of an open transaction.
        :param writes: image sets to write.
        :param now: the commit time.
        """
        for w in writes:
            tags = json.dumps(w.dicom_tags)
            blob = gzip.compress(json.dumps(w.metadata, separators=(",", ":")).encode(), compresslevel=5)
            status = "CREATED" if w.version == 1 else "UPDATED"
            if w.version == 1:
                db.execute(
                    "INSERT INTO image_sets (id, datastore_id, version, state, workflow_status, is_primary,"
                    " created_at, updated_at, study_uid, series_uid, patient_id, accession_number, study_id,"
                    " study_date_time, dicom_tags) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        w.image_set_id,
                        w.datastore_id,
                        1,
                        "ACTIVE",
                        status,
                        int(w.is_primary),
                        now,
                        now,
                        w.study_uid,
                        w.series_uid,
                        w.patient_id,
                        w.accession_number,
                        w.study_id,
                        w.study_date_time,
                        tags,
                    ),
                )
                created = now
            else:
                db.execute(
                    "UPDATE image_sets SET version=?, workflow_status=?, updated_at=?, patient_id=?,"
                    " accession_number=?, study_id=?, study_date_time=?, dicom_tags=? WHERE id=?",
                    (
                        w.version,
                        status,
                        now,
                        w.patient_id,
                        w.accession_number,
                        w.study_id,
                        w.study_date_time,
                        tags,
                        w.image_set_id,
                    ),
                )
                created = db.execute(
                    "SELECT created_at FROM image_sets WHERE id=?", (w.image_set_id,)
                ).fetchone()[0]
            db.execute(
                "INSERT INTO image_set_versions (image_set_id, version, state, workflow_status, is_primary,"
                " created_at, updated_at, metadata) VALUES (?,?,?,?,?,?,?,?)",
                (w.image_set_id, w.version, "ACTIVE", status, int(w.is_primary), created, now, blob),
            )

    def metadata_blob(self, image_set_id: str, version: int) -> bytes | None:
        """The gzip metadata document of one image set version.

        :param image_set_id: the image set.
        :param version: the version number.
        """
        row = self.query_one(
            "SELECT metadata FROM image_set_versions WHERE image_set_id=? AND version=?",
            (image_set_id, version),
        )
        return bytes(row["metadata"]) if row else None

    def metadata_document(self, image_set_id: str, version: int) -> dict[str, Any] | None:
        """The decoded metadata document of one image set version.

        :param image_set_id: the image set.
        :param version: the version number.
        """
        blob = self.metadata_blob(image_set_id, version)
        return json.loads(gzip.decompress(blob)) if blob is not None else None


def scope_digest(scope: str) -> str:
    """A short digest of a pagination scope.

    :param scope: the scope text.
    """
    return hashlib.sha256(scope.encode()).hexdigest()[:16]
