"""Trust-tier limits (pure)."""

from __future__ import annotations

from ussycode.errors import QuotaExceeded
from ussycode.types import TIER_LIMITS, Limits, TrustLevel


def limits_for(level: TrustLevel) -> Limits:
    return TIER_LIMITS[level]


def check_size(level: TrustLevel, cpu: int, memory_mb: int, disk_gb: int) -> None:
    lim = limits_for(level)
    for what, value, limit, unit in (
        ("vCPU", cpu, lim.cpu, ""),
        ("memory", memory_mb, lim.memory_mb, " MB"),
        ("disk", disk_gb, lim.disk_gb, " GB"),
    ):
        if limit is not None and value > limit:
            raise QuotaExceeded(
                f"{what} limit exceeded: {value}{unit} requested, the {level} tier allows {limit}{unit} per VM"
            )


def check_count(level: TrustLevel, current: int, adding: int = 1) -> None:
    limit = limits_for(level).vms
    if limit is not None and current + adding > limit:
        raise QuotaExceeded(
            f"VM limit reached: you have {current} of {limit} VMs allowed for the {level} tier; "
            "remove one with 'rm <vm> --yes'"
        )
