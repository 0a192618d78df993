"""
Wait until an S3 folder has been quiet for a settle period: the Amazon provider's deferrable
``S3KeysUnchangedSensor``, with one defect of its trigger mended.

The defect (apache-airflow-providers-amazon 9.39.0): ``S3KeysUnchangedTrigger`` sets ``polling_period_seconds``
to 0 in ``__init__`` whatever it is given, and its ``serialize`` writes the value back as a keyword that the
constructor folds into ``hook_params``. So in the triggerer it lists the prefix in a loop with
``asyncio.sleep(0)``: one ListObjectsV2 after another for every settling folder, for the whole settle period,
and the sensor's ``poke_interval`` is never used. :class:`S3PrefixSettledTrigger` takes the polling period and
keeps it through serialization; :class:`S3PrefixSettledSensor` defers with it, polling every ``poke_interval``.
Everything else (first listing on the worker, the settle rule on key counts, ``min_objects``, deletions) is the
provider's.

The provider logs the listed path (``bucket/prefix``) at INFO when it sees new objects. Where folder names are
patient ids, raise the level of the logger ``airflow.providers.amazon.aws.hooks.s3`` to WARNING.

This module imports the provider's S3 modules (boto3): import it from task code or from DAG files that already
pay for boto3 at parse (the arrival DAG does, for its message-queue trigger).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow.providers.amazon.aws.sensors.s3 import S3KeysUnchangedSensor
from airflow.providers.amazon.aws.triggers.s3 import S3KeysUnchangedTrigger
from airflow.sdk.exceptions import AirflowFailException

if TYPE_CHECKING:
    from collections.abc import Sequence
    from datetime import timedelta

    from airflow.sdk import Context
    from airflow.triggers.base import BaseTrigger


class S3PrefixSettledTrigger(S3KeysUnchangedTrigger):
    """
    ``S3KeysUnchangedTrigger`` that waits ``polling_period_seconds`` between listings.

    :param polling_period_seconds: seconds between two listings of the prefix (at least 1)
    """

    def __init__(self, *args: Any, polling_period_seconds: float = 60.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.polling_period_seconds = max(1.0, float(polling_period_seconds))  # type: ignore[assignment]

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """Serialize as the provider does, under this class's path."""
        _, kwargs = super().serialize()
        return f"{type(self).__module__}.{type(self).__qualname__}", kwargs


class S3PrefixSettledSensor(S3KeysUnchangedSensor):
    """
    ``S3KeysUnchangedSensor`` whose deferred wait lists the prefix every ``poke_interval`` seconds.

    ``inactivity_period`` is also templated, so a mapped task group can pass the settle period it read at run
    time (the provider compares it with 0 in ``__init__``, which a mapped argument cannot take; it is checked
    here when the task runs).

    :param inactivity_period: seconds with no new object before the folder counts as settled (templated).
    """

    template_fields: Sequence[str] = (*S3KeysUnchangedSensor.template_fields, "inactivity_period")

    def __init__(self, *, inactivity_period: Any = 60 * 60, **kwargs: Any) -> None:
        super().__init__(inactivity_period=0, **kwargs)
        self.inactivity_period = inactivity_period

    def execute(self, context: Context) -> None:
        """Check the rendered settle period, then wait as the provider does."""
        try:
            self.inactivity_period = float(self.inactivity_period)
        except (TypeError, ValueError):
            raise AirflowFailException("inactivity_period must be a number of seconds.") from None
        if self.inactivity_period < 0:
            raise AirflowFailException("inactivity_period must be non-negative.")
        super().execute(context)

    def defer(
        self,
        *,
        trigger: BaseTrigger,
        method_name: str,
        kwargs: dict[str, Any] | None = None,
        timeout: timedelta | int | float | None = None,
    ) -> Any:
        """
        Defer with :class:`S3PrefixSettledTrigger` in place of the provider's trigger.

        :param trigger: the trigger the provider built.
        :param method_name: the method to resume in.
        :param kwargs: keyword arguments for that method.
        :param timeout: the deferral timeout.
        """
        if type(trigger) is S3KeysUnchangedTrigger:
            _, serialized = trigger.serialize()
            serialized.pop("polling_period_seconds", None)
            hook_params = serialized.pop("hook_params", None) or {}
            trigger = S3PrefixSettledTrigger(
                **serialized, **hook_params, polling_period_seconds=float(self.poke_interval)
            )
        return super().defer(trigger=trigger, method_name=method_name, kwargs=kwargs, timeout=timeout)
