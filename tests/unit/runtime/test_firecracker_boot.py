"""Real Firecracker boot of the test image: runs only where Firecracker and working KVM exist (skips with why)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from ussycode.runtime.firecracker.runtime import FirecrackerRuntime, firecracker_reason
from ussycode.types import VmSpec

REASON = firecracker_reason()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(REASON is not None, reason=f"firecracker: {REASON}")]


async def test_boot_ssh_stop(tmp_path: Path) -> None:
    from ussycode.runtime.images import ImageStore

    store = ImageStore(Path(os.environ.get("USSYCODE_TEST_IMAGES", "/var/tmp/ussycode-test-images")))
    rt = FirecrackerRuntime(tmp_path, store, run_dir=Path("/run/ussycode-test/fc"), egress=False)
    spec = VmSpec(id="fc1", name="fcbox", image="ussyuntu-mini", cpu=1, memory_mb=512, disk_gb=2)
    try:
        await rt.create(spec)
        await rt.start(spec)
        reader, writer = await rt.open_connection(spec.id, 22)
        assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"SSH-2.0-")
        writer.close()
        assert (await rt.exec(spec.id, ["uname", "-r"])).exit_status == 0
        await rt.stop(spec.id, timeout=20)
    finally:
        await rt.destroy(spec.id)
        await rt.close()
