"""SQS and EventBridge from moto's server, on the endpoint's URL, with their state kept under ``<state-dir>``.

What survives a restart of the endpoint (``<state-dir>/messaging.json``): SQS queues (attributes and tags) and
EventBridge custom buses, rules (pattern or schedule, state, description) and targets, written after every request
that may change them; and the messages still in each queue, written when the endpoint stops cleanly (SIGINT or
SIGTERM). A message received but not yet deleted is visible again after a restart, with a new message id and
receipt handle (at-least-once, as SQS promises). An endpoint killed with SIGKILL loses the messages sent since it
started; queues and rules are kept either way.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import TYPE_CHECKING, Any

from moto.moto_server.werkzeug_app import create_backend_app

from healthimaging_local.model import ACCOUNT_ID, REGION
from healthimaging_local.wsgi import answer_of

if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path

log = logging.getLogger(__name__)

StartResponse = Any
SERVICES = ("sqs", "events")
# Requests that never change queues, buses, rules or targets (so they need no snapshot).
_MESSAGE_TRAFFIC = frozenset(
    f"{prefix}.{action}"
    for prefix, actions in (
        (
            "AmazonSQS",
            (
                "SendMessage",
                "SendMessageBatch",
                "ReceiveMessage",
                "DeleteMessage",
                "DeleteMessageBatch",
                "ChangeMessageVisibility",
                "ChangeMessageVisibilityBatch",
                "GetQueueUrl",
                "GetQueueAttributes",
                "ListQueues",
                "ListQueueTags",
                "ListDeadLetterSourceQueues",
            ),
        ),
        (
            "AWSEvents",
            (
                "PutEvents",
                "ListRules",
                "ListTargetsByRule",
                "ListEventBuses",
                "DescribeRule",
                "DescribeEventBus",
                "ListRuleNamesByTarget",
                "TestEventPattern",
            ),
        ),
    )
    for action in actions
)
_QUEUE_ATTRIBUTES = (
    "DelaySeconds",
    "MaximumMessageSize",
    "MessageRetentionPeriod",
    "Policy",
    "ReceiveMessageWaitTimeSeconds",
    "RedrivePolicy",
    "VisibilityTimeout",
    "ContentBasedDeduplication",
    "DeduplicationScope",
    "FifoQueue",
    "FifoThroughputLimit",
    "KmsMasterKeyId",
    "KmsDataKeyReusePeriodSeconds",
)


def _sqs() -> Any:
    from moto.sqs.models import sqs_backends

    return sqs_backends[ACCOUNT_ID][REGION]


def _events() -> Any:
    from moto.events.models import events_backends

    return events_backends[ACCOUNT_ID][REGION]


class MessagingStorage:
    """Snapshots of moto's SQS and EventBridge state in one JSON file.

    :param path: the file (``<state-dir>/messaging.json``).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    @staticmethod
    def _queues(with_messages: bool) -> list[dict[str, Any]]:
        queues = []
        for queue in list(_sqs().queues.values()):
            attributes = queue.attributes
            entry: dict[str, Any] = {
                "name": queue.name,
                "attributes": {
                    k: str(attributes[k]) for k in _QUEUE_ATTRIBUTES if attributes.get(k) is not None
                },
                "tags": dict(queue.tags),
            }
            if with_messages:
                entry["messages"] = [
                    {
                        "body": message.body,
                        "attributes": message.message_attributes,
                        "group_id": message.group_id,
                        "deduplication_id": message.deduplication_id,
                    }
                    for message in list(queue._messages)
                ]
            queues.append(entry)
        return queues

    @staticmethod
    def _rules() -> dict[str, Any]:
        events = _events()
        buses = [name for name in events.event_buses if name != "default"]
        rules = []
        for bus_name, bus in list(events.event_buses.items()):
            for rule in list(bus.rules.values()):
                rules.append(
                    {
                        "name": rule.name,
                        "bus": bus_name,
                        "description": rule.description,
                        "event_pattern": rule.event_pattern._raw_pattern,
                        "schedule": rule.scheduled_expression,
                        "role_arn": rule.role_arn,
                        "state": rule.state,
                        "targets": list(rule.targets),
                    }
                )
        return {"buses": buses, "rules": rules}

    def save(self, with_messages: bool = False) -> None:
        """Write the current queues and rules (and, when asked, every queue's messages).

        :param with_messages: also keep the messages (done when the endpoint stops).
        """
        with self._lock:
            previous = self._read()
            state = {"queues": self._queues(with_messages), **self._rules()}
            if not with_messages:  # keep messages saved at the last stop until the next stop replaces them
                saved = {q["name"]: q.get("messages", []) for q in previous.get("queues", [])}
                for queue in state["queues"]:
                    if saved.get(queue["name"]):
                        queue["messages"] = saved[queue["name"]]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(state))
            os.replace(tmp, self.path)

    def _read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {}
        data: dict[str, Any] = json.loads(self.path.read_text())
        return data

    def load(self) -> None:
        """Replace moto's SQS and EventBridge state with what was saved (nothing saved: empty state)."""
        with self._lock:
            sqs, events = _sqs(), _events()
            sqs.reset()
            events.reset()
            sqs, events = _sqs(), _events()
            state = self._read()
            for queue in state.get("queues", []):
                sqs.create_queue(queue["name"], tags=queue.get("tags") or None, **queue["attributes"])
            for queue in state.get("queues", []):
                for message in queue.get("messages", []):
                    sqs.send_message(
                        queue["name"],
                        message["body"],
                        message_attributes=message.get("attributes") or None,
                        deduplication_id=message.get("deduplication_id"),
                        group_id=message.get("group_id"),
                    )
            for bus in state.get("buses", []):
                events.create_event_bus(bus)
            for rule in state.get("rules", []):
                events.put_rule(
                    rule["name"],
                    description=rule.get("description"),
                    event_bus_arn=rule["bus"],
                    event_pattern=rule.get("event_pattern"),
                    role_arn=rule.get("role_arn"),
                    scheduled_expression=rule.get("schedule"),
                    state=rule.get("state"),
                )
                if rule.get("targets"):
                    events.put_targets(rule["name"], rule["bus"], rule["targets"])


class PersistentMessagingApp:
    """moto's server app of one service (``sqs`` or ``events``), snapshotting its definitions after changes.

    :param service: ``sqs`` or ``events``.
    :param storage: where the snapshots go.
    """

    def __init__(self, service: str, storage: MessagingStorage) -> None:
        self.service = service
        self.storage = storage
        self.app = create_backend_app(service)  # type: ignore[arg-type]

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        status, body = answer_of(self.app, environ, start_response)
        if status < 300 and environ.get("HTTP_X_AMZ_TARGET") not in _MESSAGE_TRAFFIC:
            try:
                self.storage.save()
            except Exception:
                log.exception("Could not save the %s state", self.service)
        return [body]
