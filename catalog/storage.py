"""What a machine's disk costs: the whole bill of a stopped machine.

A stopped machine (EC2 ``stopped``, GCE ``TERMINATED``) bills no compute, but its disks
are still provisioned and billed by the GB-month until the machine is deleted. That is
what a warm pool of stopped machines costs, and what counts against the ceiling while a
machine is parked. PURE: numbers in, dollars out.

Every launch asks for one boot disk of :data:`LAUNCH_DISK_GIB` (EC2: a ``gp3`` root
volume, ``AwsConfig.root_volume_gib``; GCE: a ``pd-balanced`` boot disk,
``GcpConfig.boot_disk_gib``), which holds the image, the engine's container and the
model's weights; nothing else is attached.

Prices (USD per GB-month; a month is 730 hours, as both clouds prorate by the second):

* EC2 ``gp3``: $0.08 per GB-month in US East (N. Virginia), the region of the bundled
  catalog's EC2 offers. Source: https://aws.amazon.com/ebs/pricing/ ("General Purpose SSD
  (gp3) - Storage"), restated with the date at
  https://www.factualminds.com/blog/amazon-ebs-pricing-orphaned-volumes-snapshots/
  (2026-06: "gp3 storage at $0.08/GB-month in us-east-1"). The free baseline of 3,000
  IOPS and 125 MB/s is what we provision, so nothing else is billed.
* GCE ``pd-balanced``: $0.10 per GiB-month in the US (us-central1). Source:
  https://cloud.google.com/compute/disks-image-pricing (disk charges prorated by the
  second; the page's own US examples: a 200 GB standard disk $8.00 a month, a 200 GB SSD
  disk $34.00, i.e. pd-standard $0.04 and pd-ssd $0.17); balanced at $0.10 as quoted by
  Google's pricing calculator (a 30 GiB zonal balanced PD in Iowa: USD 3.00 a month).

Not billed while stopped: the public IPv4 address (both clouds release an ephemeral one
at stop; a new one comes at start), RAM, GPUs. Other regions price disks up to about a
third higher; the figures here are the US ones the bundled catalog is priced in.
"""

from __future__ import annotations

from catalog.model import Offer, ProviderName

__all__ = [
    "DISK_USD_PER_GB_MONTH",
    "HOURS_PER_MONTH",
    "LAUNCH_DISK_GIB",
    "disk_usd_per_hour",
    "stopped_usd_per_hour",
]

LAUNCH_DISK_GIB = 200
"""The boot disk every cloud launch asks for (image, container and weights)."""

HOURS_PER_MONTH = 730.0
"""The month both clouds divide a GB-month price by."""

DISK_USD_PER_GB_MONTH: dict[ProviderName, float] = {
    ProviderName.AWS: 0.08,  # gp3, us-east-1
    ProviderName.GCP: 0.10,  # pd-balanced, us-central1
    # The simulated cloud sells the catalog's EC2 and GCE offers under its own name; it
    # bills their disks at the EC2 rate, the lower of the two, as a stand-in.
    ProviderName.SIMULATED: 0.08,
    # This machine and the user's private workers are not bought: nothing to bill.
    ProviderName.LOCAL: 0.0,
    ProviderName.PRIVATE: 0.0,
}


def disk_usd_per_hour(provider: ProviderName, disk_gb: float) -> float:
    """The hourly price of ``disk_gb`` of the boot disk type ``provider``'s launches use."""
    if disk_gb < 0:
        raise ValueError(f"a disk cannot be {disk_gb} GB")
    return DISK_USD_PER_GB_MONTH[provider] * disk_gb / HOURS_PER_MONTH


def stopped_usd_per_hour(
    offer_or_provider: Offer | ProviderName, disk_gb: float = LAUNCH_DISK_GIB
) -> float:
    """What a stopped machine of this offer (or provider) costs an hour: its disk only.

    200 GB (the launch default): EC2 $0.0219/h, GCE $0.0274/h, against $1.006/h for a
    running g5.xlarge.
    """
    provider = (
        offer_or_provider.provider if isinstance(offer_or_provider, Offer) else offer_or_provider
    )
    return disk_usd_per_hour(provider, disk_gb)
