"""QEMU boot benchmark: boot → SSH-ready with QemuRuntime vs the floor (same kernel + initramfs to a trivial
init that powers off), and host memory per running VM beyond the guest RAM it touched.

Runs one guest at a time. Writes bench/results/qemu_boot.json and prints a table.
Usage: .venv/bin/python bench/bench_qemu_boot.py [--runs N] [--memory-mb M]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from ussycode.runtime import kernel
from ussycode.runtime.images import ImageStore
from ussycode.runtime.kvm import boot_probe, kvm_verdict, probe_argv
from ussycode.runtime.qemu import QemuRuntime
from ussycode.types import VmSpec

RESULTS = Path(__file__).parent / "results" / "qemu_boot.json"
IMAGES = Path("/var/tmp/ussycode-test-images")


def qemu_memory(pid: int, guest_mb: int) -> dict[str, float]:
    """RSS/PSS of the QEMU process and the resident part of its guest-RAM mapping (MiB)."""
    rollup = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        rollup[key] = int(rest.split()[0]) / 1024
    guest_rss = 0.0
    size_kb = rss_kb = 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if line.startswith("Size:"):
            size_kb = int(line.split()[1])
        elif line.startswith("Rss:"):
            rss_kb = int(line.split()[1])
            # The guest RAM block: one anonymous mapping of exactly that size. Not ">=": TCG's translation-block
            # cache is another big anonymous mapping (1 GiB by default in QEMU 7.2), and counting it as guest RAM
            # hid it from the overhead (62.5 MiB "beyond guest RAM" was really ~160 MiB).
            if size_kb == guest_mb * 1024:
                guest_rss += rss_kb / 1024
    return {
        "rss_mib": round(rollup["Rss"], 1),
        "pss_mib": round(rollup["Pss"], 1),
        "guest_ram_touched_mib": round(guest_rss, 1),
        "overhead_mib": round(rollup["Rss"] - guest_rss, 1),
    }


async def main(runs: int, memory_mb: int) -> dict[str, object]:
    guest = kernel.find_kernel()
    work = Path(tempfile.mkdtemp(prefix="ussy-bench-"))
    initrd = kernel.build_initramfs(work / "cache", guest)
    verdict = kvm_verdict(work / "cache")
    accel = "kvm" if verdict.usable else "tcg"

    floor = []
    for _ in range(runs):
        ok, tail, secs = boot_probe(probe_argv("qemu-system-x86_64", guest.vmlinuz, initrd, accel), 120)
        if not ok:
            raise SystemExit(f"floor boot failed:\n{tail}")
        floor.append(secs)

    store = ImageStore(IMAGES)
    await store.ensure_built("ussyuntu-mini")
    rt = QemuRuntime(work, store, run_dir=Path("/run/ussycode-bench/qemu"), egress=False)
    spec = VmSpec(id="benchvm", name="bench", image="ussyuntu-mini", cpu=1, memory_mb=memory_mb, disk_gb=2)
    first: float | None = None
    restarts: list[float] = []
    mem: dict[str, float] = {}
    try:
        await rt.create(spec)
        for i in range(runs + 1):
            t = time.monotonic()
            await rt.start(spec)
            secs = time.monotonic() - t
            if i == 0:
                first = secs  # includes host-key generation on the VM's first boot
            else:
                restarts.append(secs)
            if i == runs:
                await asyncio.sleep(3)
                pid = rt.get_state(spec.id)["pid"]
                mem = qemu_memory(int(pid), memory_mb)
            await rt.stop(spec.id, timeout=30)
    finally:
        await rt.destroy(spec.id)
        await rt.close()
        shutil.rmtree(work, ignore_errors=True)

    floor_med = statistics.median(floor)
    restart_med = statistics.median(restarts)
    result: dict[str, object] = {
        "host": platform.node(),
        "accel": accel,
        "kvm_reason": verdict.reason,
        "kernel": guest.release,
        "guest_memory_mb": memory_mb,
        "runs": runs,
        "floor_boot_to_init_s": [round(x, 2) for x in floor],
        "first_boot_to_ssh_s": round(first or 0, 2),
        "boot_to_ssh_s": [round(x, 2) for x in restarts],
        "floor_median_s": round(floor_med, 2),
        "boot_to_ssh_median_s": round(restart_med, 2),
        "ratio_boot_to_ssh_over_floor": round(restart_med / floor_med, 2),
        "memory": mem,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    rows = [
        ("floor: kernel+initramfs → init → poweroff", f"{floor_med:.2f} s", "1.00x"),
        ("first boot → SSH-ready (host keys made)", f"{first or 0:.2f} s", f"{(first or 0) / floor_med:.2f}x"),
        ("boot → SSH-ready (restart, median)", f"{restart_med:.2f} s", f"{restart_med / floor_med:.2f}x"),
        ("QEMU RSS / PSS", f"{mem.get('rss_mib')} / {mem.get('pss_mib')} MiB", ""),
        ("guest RAM touched", f"{mem.get('guest_ram_touched_mib')} MiB of {memory_mb}", ""),
        ("host memory beyond guest RAM", f"{mem.get('overhead_mib')} MiB", ""),
    ]
    print(f"QEMU ({accel}), kernel {guest.release}, {runs} runs")
    for name, value, ratio in rows:
        print(f"  {name:<44} {value:>22} {ratio:>7}")
    print(f"wrote {RESULTS}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--memory-mb", type=int, default=512)
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.memory_mb))
