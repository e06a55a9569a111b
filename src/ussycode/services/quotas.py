"""Trust-tier limits and per-user overrides (pure)."""

from __future__ import annotations

from dataclasses import replace

from ussycode.errors import QuotaExceeded
from ussycode.store.users import User
from ussycode.types import TIER_LIMITS, Limits, TrustLevel


def limits_for(level: TrustLevel) -> Limits:
    return TIER_LIMITS[level]


def effective_limits(user: User) -> Limits:
    """The tier's limits with the user's overrides (``admin quota``) on top."""
    tier = TIER_LIMITS[user.trust_level]
    if user.quota is None:
        return tier
    return replace(tier, **{k: v for k, v in user.quota.as_json().items() if v is not None})


def _whose(user: User) -> str:
    return "your quota" if user.quota is not None else f"the {user.trust_level} tier"


def check_size(user: User, cpu: int, memory_mb: int, disk_gb: int) -> None:
    lim = effective_limits(user)
    for what, value, limit, unit in (
        ("vCPU", cpu, lim.cpu, ""),
        ("memory", memory_mb, lim.memory_mb, " MB"),
        ("disk", disk_gb, lim.disk_gb, " GB"),
    ):
        if limit is not None and value > limit:
            raise QuotaExceeded(
                f"{what} limit exceeded: {value}{unit} requested, {_whose(user)} allows {limit}{unit} per VM"
            )


def check_count(user: User, current: int, adding: int = 1) -> None:
    limit = effective_limits(user).vms
    if limit is not None and current + adding > limit:
        raise QuotaExceeded(
            f"VM limit reached: you have {current} of {limit} VMs allowed for {_whose(user)}; "
            "remove one with 'rm <vm> --yes'"
        )
