"""Where and how the EC2 provider launches: its configuration, without the AWS SDK.

Kept apart from :mod:`providers.aws` so that reading a configuration (``autoscaler run``
with no cloud configured, ``autoscaler apply``) does not import aioboto3 and botocore:
about a second of start-up and most of the idle controller's memory. The SDK loads only
when an EC2 provider is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from catalog.storage import LAUNCH_DISK_GIB

DLAMI_PARAMETER = (
    "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
)


@dataclass(frozen=True, slots=True)
class AwsConfig:
    """Where and how to launch on EC2.

    ``subnets`` maps a zone to the subnet to launch in (zones not listed use the default
    VPC). ``security_group_id`` uses that group instead of one managed per cluster.
    ``ami_overrides`` maps a CUDA pin ("12.4", or "default" for any) to an AMI id and
    wins over the SSM ``ami_parameter``.
    """

    regions: tuple[str, ...] = ("us-east-1",)
    subnets: Mapping[str, str] = field(default_factory=dict)
    security_group_id: str | None = None
    gateway_cidr: str = "0.0.0.0/0"
    ami_parameter: str = DLAMI_PARAMETER
    ami_overrides: Mapping[str, str] = field(default_factory=dict)
    root_volume_gib: int = LAUNCH_DISK_GIB
    """The gp3 root volume: image, engine container and weights; billed while stopped."""
    endpoint_url: str | None = None
    max_attempts: int = 4
    retry_wait_seconds: float = 1.0
    throttle_retry_after: float = 5.0
    interruption_queue_url: str | None = None
    """An SQS queue that EventBridge fills with EC2 Spot Instance Interruption Warnings
    (one queue per cluster: every message read is deleted)."""
    sqs_endpoint_url: str | None = None

    def __post_init__(self) -> None:
        if not self.regions:
            raise ValueError("AwsConfig.regions must name at least one region")
        if self.max_attempts < 1:
            raise ValueError(f"AwsConfig.max_attempts must be >= 1, got {self.max_attempts}")


__all__ = ["DLAMI_PARAMETER", "AwsConfig"]
