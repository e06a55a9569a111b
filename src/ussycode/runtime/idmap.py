"""Container VMs' private host id ranges (pure).

Each VM's user namespace maps guest ids 0..65535 to its own block of host ids: block ``slot`` starts at
``FIRST_HOST_ID + slot * RANGE``. Blocks never overlap and lie far above any host account (and above the
``/etc/subuid`` ranges tools hand out from 100000). The server allocates the lowest free slot when a VM is made and
records the base in the DB; a slot is reused only after its VM and disk are gone.
"""

from __future__ import annotations

from collections.abc import Iterable

RANGE = 65536
FIRST_HOST_ID = 2**24  # 16777216
MAX_SLOTS = (2**32 - 2 - FIRST_HOST_ID) // RANGE  # ids up to 4294967294 (-1 is "no id")


def base_of_slot(slot: int) -> int:
    if not 0 <= slot < MAX_SLOTS:
        raise ValueError(f"id range slot {slot} out of bounds")
    return FIRST_HOST_ID + slot * RANGE


def slot_of_base(base: int) -> int:
    slot, rest = divmod(base - FIRST_HOST_ID, RANGE)
    if rest or not 0 <= slot < MAX_SLOTS:
        raise ValueError(f"{base} is not the start of an id range")
    return slot


def first_free_base(used: Iterable[int | None]) -> int:
    """The lowest range base not in ``used`` (pure)."""
    taken = {slot_of_base(b) for b in used if b is not None}
    for slot in range(MAX_SLOTS):
        if slot not in taken:
            return base_of_slot(slot)
    raise ValueError("every host id range is in use")
