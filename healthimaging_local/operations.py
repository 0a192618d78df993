"""Data store and image set operations (everything except import jobs and search)."""

from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING, Any

from healthimaging_local.events import EventPublisher, ImageSetChange
from healthimaging_local.model import (
    ConflictException,
    ResourceNotFoundException,
    datastore_arn,
    image_set_arn,
    max_results_default,
)
from healthimaging_local.search import search_image_sets

if TYPE_CHECKING:
    import sqlite3

    from healthimaging_local.store import Store


def require_datastore(store: Store, datastore_id: str, *, active: bool = False) -> sqlite3.Row:
    """The data store row, or the modelled error.

    :param store: the persistence layer.
    :param datastore_id: the data store id.
    :param active: require status ACTIVE (409 otherwise).
    :raises ResourceNotFoundException: unknown or deleted data store.
    :raises ConflictException: not ACTIVE when ``active`` is set.
    """
    row = store.query_one("SELECT * FROM datastores WHERE id=?", (datastore_id,))
    if row is None or row["status"] == "DELETED":
        raise ResourceNotFoundException(f"Datastore {datastore_id} does not exist")
    if active and row["status"] != "ACTIVE":
        raise ConflictException(f"Datastore {datastore_id} is {row['status']}, not ACTIVE")
    return row


def page_after(store: Store, scope: str, params: dict[str, Any]) -> tuple[list[Any] | None, int]:
    """Decode the keyset position and page size of a list operation.

    :param store: the persistence layer (token codec).
    :param scope: what the token must have been issued for.
    :param params: the operation input (``nextToken``, ``maxResults``).
    """
    limit = params.get("maxResults") or max_results_default()
    token = params.get("nextToken")
    return (store.decode_token(token, scope) if token else None), limit


class Operations:
    """Handlers of the data store and image set operations.

    :param store: the persistence layer.
    :param datastore_seconds: how long a new data store stays CREATING (and a deleted one DELETING).
    :param delete_seconds: how long a deleted image set stays LOCKED/DELETING.
    :param events: where state changes are announced (default: the embedded EventBridge).
    """

    def __init__(
        self,
        store: Store,
        datastore_seconds: float = 0.0,
        delete_seconds: float = 0.5,
        events: EventPublisher | None = None,
    ) -> None:
        self.store = store
        self.datastore_seconds = datastore_seconds
        self.delete_seconds = delete_seconds
        self.events = events or EventPublisher()

    def settle(self) -> None:
        """Finish due time-based transitions and announce each (Data Store Created/Deleted, Image Set Deleted)."""
        settled = self.store.settle()
        for datastore in settled.datastores:
            self.events.datastore(
                datastore["id"], datastore["name"], datastore["status"], datastore["settle_at"]
            )
        for image_set in settled.image_sets:
            change = ImageSetChange(
                image_set["datastore_id"],
                image_set["id"],
                image_set["version"],
                "DELETED",
                "DELETED",
                bool(image_set["is_primary"]),
            )
            self.events.image_set(change, image_set["settle_at"])

    # ------------------------------------------------------------------------------------ data stores

    def create_datastore(self, params: dict[str, Any]) -> dict[str, Any]:
        """CreateDatastore (idempotent on clientToken with the same name)."""
        now = time.time()
        with self.store.transaction() as db:
            existing = db.execute(
                "SELECT * FROM datastores WHERE client_token=? AND status != 'DELETED'",
                (params["clientToken"],),
            ).fetchone()
            if existing is not None:
                if existing["name"] != params.get("datastoreName", existing["name"]):
                    raise ConflictException("clientToken was already used with different parameters")
                return {"datastoreId": existing["id"], "datastoreStatus": existing["status"]}
            datastore_id = uuid.uuid4().hex
            db.execute(
                "INSERT INTO datastores (id, name, status, client_token, kms_key_arn, lambda_authorizer_arn,"
                " lossless_storage_format, tags, created_at, updated_at, settle_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    datastore_id,
                    params.get("datastoreName") or datastore_id,
                    "CREATING",
                    params["clientToken"],
                    params.get("kmsKeyArn"),
                    params.get("lambdaAuthorizerArn"),
                    params.get("losslessStorageFormat", "HTJ2K"),
                    json.dumps(params.get("tags") or {}),
                    now,
                    now,
                    now + self.datastore_seconds,
                ),
            )
            name = db.execute("SELECT name FROM datastores WHERE id=?", (datastore_id,)).fetchone()[0]
        self.events.datastore(datastore_id, name, "CREATING", now)
        return {"datastoreId": datastore_id, "datastoreStatus": "CREATING"}

    @staticmethod
    def _datastore_summary(row: sqlite3.Row) -> dict[str, Any]:
        return {
            "datastoreId": row["id"],
            "datastoreName": row["name"],
            "datastoreStatus": row["status"],
            "datastoreArn": datastore_arn(row["id"]),
            "createdAt": row["created_at"],
            "updatedAt": row["updated_at"],
        }

    def get_datastore(self, params: dict[str, Any]) -> dict[str, Any]:
        """GetDatastore (a deleted data store is still reported, as DELETED)."""
        row = self.store.query_one("SELECT * FROM datastores WHERE id=?", (params["datastoreId"],))
        if row is None:
            raise ResourceNotFoundException(f"Datastore {params['datastoreId']} does not exist")
        properties = self._datastore_summary(row)
        properties.update(
            kmsKeyArn=row["kms_key_arn"],
            lambdaAuthorizerArn=row["lambda_authorizer_arn"],
            losslessStorageFormat=row["lossless_storage_format"],
        )
        return {"datastoreProperties": properties}

    def list_datastores(self, params: dict[str, Any]) -> dict[str, Any]:
        """ListDatastores, oldest first, optional ``datastoreStatus`` filter."""
        status = params.get("datastoreStatus")
        scope = json.dumps(["ListDatastores", status])
        after, limit = page_after(self.store, scope, params)
        sql, args = "SELECT * FROM datastores WHERE 1=1", []
        if status:
            sql += " AND status=?"
            args.append(status)
        if after:
            sql += " AND (created_at, id) > (?, ?)"
            args.extend(after)
        rows = self.store.query(sql + " ORDER BY created_at, id LIMIT ?", [*args, limit + 1])
        output: dict[str, Any] = {"datastoreSummaries": [self._datastore_summary(r) for r in rows[:limit]]}
        if len(rows) > limit:
            output["nextToken"] = self.store.encode_token(
                scope, [rows[limit - 1]["created_at"], rows[limit - 1]["id"]]
            )
        return output

    def delete_datastore(self, params: dict[str, Any]) -> dict[str, Any]:
        """DeleteDatastore: 409 while image sets or running jobs remain."""
        datastore_id = params["datastoreId"]
        with self.store.transaction() as db:
            row = require_datastore(self.store, datastore_id)
            if row["status"] != "ACTIVE":
                raise ConflictException(f"Datastore {datastore_id} is {row['status']}")
            live = db.execute(
                "SELECT COUNT(*) FROM image_sets WHERE datastore_id=? AND state != 'DELETED'", (datastore_id,)
            ).fetchone()[0]
            if live:
                raise ConflictException(
                    f"Datastore {datastore_id} still has {live} image sets; delete them first"
                )
            running = db.execute(
                "SELECT COUNT(*) FROM jobs WHERE datastore_id=? AND status IN ('SUBMITTED','IN_PROGRESS')",
                (datastore_id,),
            ).fetchone()[0]
            if running:
                raise ConflictException(f"Datastore {datastore_id} has {running} running import jobs")
            now = time.time()
            db.execute(
                "UPDATE datastores SET status='DELETING', updated_at=?, settle_at=? WHERE id=?",
                (now, now + self.datastore_seconds, datastore_id),
            )
        self.events.datastore(datastore_id, row["name"], "DELETING", now)
        return {"datastoreId": datastore_id, "datastoreStatus": "DELETING"}

    # ------------------------------------------------------------------------------------ image sets

    def _image_set(self, params: dict[str, Any]) -> sqlite3.Row:
        require_datastore(self.store, params["datastoreId"])
        row = self.store.query_one(
            "SELECT * FROM image_sets WHERE id=? AND datastore_id=?",
            (params["imageSetId"], params["datastoreId"]),
        )
        if row is None:
            raise ResourceNotFoundException(f"Image set {params['imageSetId']} does not exist")
        return row

    def _version(self, row: sqlite3.Row, version_id: str | None) -> sqlite3.Row:
        version = int(version_id) if version_id is not None else row["version"]
        found = self.store.query_one(
            "SELECT * FROM image_set_versions WHERE image_set_id=? AND version=?", (row["id"], version)
        )
        if found is None:
            raise ResourceNotFoundException(f"Image set {row['id']} has no version {version_id}")
        return found

    @staticmethod
    def _properties(row: sqlite3.Row) -> dict[str, Any]:
        return {
            "imageSetId": row["image_set_id"],
            "versionId": str(row["version"]),
            "imageSetState": row["state"],
            "createdAt": row["created_at"],
            "updatedAt": row["updated_at"],
            "deletedAt": row["deleted_at"],
            "message": row["message"],
            "isPrimary": bool(row["is_primary"]),
        }

    def get_image_set(self, params: dict[str, Any]) -> dict[str, Any]:
        """GetImageSet (latest version, or ``version``); the latest reflects LOCKED/DELETED state."""
        current = self._image_set(params)
        row = self._version(current, params.get("versionId"))
        output = self._properties(row)
        output.update(
            datastoreId=params["datastoreId"],
            imageSetWorkflowStatus=row["workflow_status"],
            imageSetArn=image_set_arn(params["datastoreId"], current["id"]),
            lastAccessedAt=row["updated_at"],
            storageTier="FREQUENT_ACCESS",
        )
        if row["version"] == current["version"]:
            output.update(
                imageSetState=current["state"],
                imageSetWorkflowStatus=current["workflow_status"],
                updatedAt=current["updated_at"],
                deletedAt=current["deleted_at"],
            )
        return output

    def get_image_set_metadata(self, params: dict[str, Any]) -> dict[str, Any]:
        """GetImageSetMetadata: the stored gzip document, sent as is."""
        current = self._image_set(params)
        if current["state"] == "DELETED":
            raise ResourceNotFoundException(f"Image set {current['id']} was deleted")
        row = self._version(current, params.get("versionId"))
        return {
            "imageSetMetadataBlob": bytes(row["metadata"]),
            "contentType": "application/json",
            "contentEncoding": "gzip",
        }

    def list_image_set_versions(self, params: dict[str, Any]) -> dict[str, Any]:
        """ListImageSetVersions, newest first."""
        current = self._image_set(params)
        scope = json.dumps(["ListImageSetVersions", current["id"]])
        after, limit = page_after(self.store, scope, params)
        sql, args = "SELECT * FROM image_set_versions WHERE image_set_id=?", [current["id"]]
        if after:
            sql += " AND version < ?"
            args.append(after[0])
        rows = self.store.query(sql + " ORDER BY version DESC LIMIT ?", [*args, limit + 1])
        items = []
        for row in rows[:limit]:
            item = self._properties(row)
            item["ImageSetWorkflowStatus"] = row["workflow_status"]
            if row["version"] == current["version"]:
                item.update(imageSetState=current["state"], ImageSetWorkflowStatus=current["workflow_status"])
            items.append(item)
        output: dict[str, Any] = {"imageSetPropertiesList": items}
        if len(rows) > limit:
            output["nextToken"] = self.store.encode_token(scope, [rows[limit - 1]["version"]])
        return output

    def delete_image_set(self, params: dict[str, Any]) -> dict[str, Any]:
        """DeleteImageSet: LOCKED/DELETING now, DELETED after ``delete_seconds``; 409 when not ACTIVE."""
        with self.store.transaction() as db:
            row = self._image_set(params)
            if row["state"] != "ACTIVE":
                raise ConflictException(f"Image set {row['id']} is {row['state']} and cannot be deleted")
            now = time.time()
            db.execute(
                "UPDATE image_sets SET state='LOCKED', workflow_status='DELETING', updated_at=?, settle_at=?"
                " WHERE id=?",
                (now, now + self.delete_seconds, row["id"]),
            )
        change = ImageSetChange(
            row["datastore_id"], row["id"], row["version"], "LOCKED", "DELETING", bool(row["is_primary"])
        )
        self.events.image_set(change, now)
        return {
            "datastoreId": params["datastoreId"],
            "imageSetId": params["imageSetId"],
            "imageSetState": "LOCKED",
            "imageSetWorkflowStatus": "DELETING",
        }

    def search_image_sets(self, params: dict[str, Any]) -> dict[str, Any]:
        """SearchImageSets (see :mod:`healthimaging_local.search`)."""
        require_datastore(self.store, params["datastoreId"])
        return search_image_sets(self.store, params)
