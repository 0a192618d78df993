"""
The AWS connection arguments and the lazily built hook shared by this package's operators and sensor.

The Amazon provider's ``AwsBaseOperator``/``AwsBaseSensor`` live in modules that import boto3 and botocore
(``airflow.providers.amazon.aws.utils.mixins`` imports the hook). This mixin keeps the part of their interface we
use (``aws_conn_id``, ``region_name``, ``verify``, ``botocore_config``, ``hook``, ``aws_template_fields``) and
imports the hook, hence boto3, only when a task runs.

Why not ``AwsBaseOperator[HealthImagingHook]``: the dag-processor pre-imports, in its parent, only the ``airflow.*``
modules that the DAG file itself names; a DAG file names ``healthimaging.operators``, so with the provider's base
every parse imports boto3 and botocore again. Measured with ``benchmarks/dag_parse.py --rounds 15`` (ratio of
medians to an empty DAG, DagBag / the dag-processor's whole child; 2 loaded cores; three runs each,
``benchmarks/results/dag_parse_params_and_operator_base.json``):

- this mixin: 2.20 / 3.36;
- the provider's bases, the DAG file also naming ``airflow.providers.amazon.aws.{operators,sensors,hooks}.base_aws``
  so that the parent pre-imports them: 2.14 / 3.46, a tie, paid for by an import line in every DAG file that uses
  the operators and boto3 in the dag-processor's parent;
- the provider's bases with a DAG file that names only ``healthimaging.*``, as a user's would: 6.7 / 7.0 (boto3 and
  botocore imported in every parse).

So the mixin stays: it is never slower, and costs nothing whatever a DAG file imports.
"""

from __future__ import annotations

from functools import cache, cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk.bases.operator import BaseOperatorMeta

if TYPE_CHECKING:
    from healthimaging.hooks import HealthImagingHook


@cache
def aws_template_fields(*template_fields: str) -> tuple[str, ...]:
    """
    Merge ``template_fields`` with the AWS connection arguments, sorted (as the Amazon provider does).

    :param template_fields: the operator's own templated arguments
    """
    if not all(isinstance(field, str) for field in template_fields):
        raise TypeError(f"Expected strings, got {', '.join(map(repr, template_fields))}.")
    return tuple(sorted({"aws_conn_id", "region_name", "verify"} | set(template_fields)))


class HealthImagingAwsMixin(metaclass=BaseOperatorMeta):
    """
    AWS connection arguments and a ``hook`` (a :class:`~healthimaging.hooks.HealthImagingHook`) built on first use.

    Put it before ``BaseOperator``/``BaseSensorOperator`` in the bases. Its ``__init__`` is wrapped by Airflow's
    operator metaclass like any operator's, so ``default_args`` fill these arguments and ``.partial()`` accepts them.

    :param aws_conn_id: the Airflow connection used for AWS credentials; None or empty: boto3's default chain
    :param region_name: AWS region name; if None, the connection's or boto3's default
    :param verify: whether to verify SSL certificates (or a CA bundle path)
    :param botocore_config: botocore client configuration (dict)
    """

    def __init__(
        self,
        *,
        aws_conn_id: str | None = "aws_default",
        region_name: str | None = None,
        verify: bool | str | None = None,
        botocore_config: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.aws_conn_id = aws_conn_id
        self.region_name = region_name
        self.verify = verify
        self.botocore_config = botocore_config

    @property
    def _hook_parameters(self) -> dict[str, Any]:
        return {
            "aws_conn_id": self.aws_conn_id,
            "region_name": self.region_name,
            "verify": self.verify,
            "config": self.botocore_config,
        }

    @cached_property
    def hook(self) -> HealthImagingHook:
        """The HealthImaging hook for this task's connection, region, verify and botocore config."""
        from healthimaging.hooks import HealthImagingHook

        return HealthImagingHook(**self._hook_parameters)
