"""Runtime conformance fixtures: one ``runtime`` per runtime name, over the shared test image.

Add a runtime by adding its name to RUNTIME_NAMES and a branch to :func:`make_test_runtime`.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from ussycode.runtime.base import Runtime
from ussycode.runtime.images import Image, ImageStore

RUNTIME_NAMES = ["container", "qemu", "firecracker"]


def make_test_runtime(name: str, workdir: Path, images: ImageStore, **options: object) -> Runtime:
    """A runtime ``name`` keeping its disks and run files under ``workdir``; skips if the host can't run it."""
    if name == "container":
        from ussycode.runtime.container import ContainerRuntime

        check = ContainerRuntime.check()
        if not check.ok:
            pytest.skip(f"container runtime unavailable: {check.reason}")
        return ContainerRuntime(workdir / "disks", workdir / "run", images, **options)  # type: ignore[arg-type]
    if name == "qemu":
        from ussycode.runtime.qemu import QemuRuntime

        check = QemuRuntime.check()
        if not check.ok:
            pytest.skip(f"qemu runtime unavailable: {check.reason}")
        return QemuRuntime(workdir, images, run_dir=workdir / "qemu-run", **options)  # type: ignore[arg-type]
    if name == "firecracker":
        from ussycode.runtime.firecracker import FirecrackerRuntime

        check = FirecrackerRuntime.check()
        if not check.ok:
            pytest.skip(f"firecracker runtime unavailable: {check.reason}")
        return FirecrackerRuntime(workdir, images, run_dir=workdir / "fc-run", **options)
    raise AssertionError(f"no test factory for runtime {name}")


@pytest.fixture(scope="module")
def runtime_workdir() -> Iterator[Path]:
    # Short paths, no commas or colons (overlay option syntax), out of /tmp's tmpfs (disk images are big).
    path = Path(tempfile.mkdtemp(prefix="ussy-rt-", dir="/var/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=RUNTIME_NAMES)
async def runtime(
    request: pytest.FixtureRequest, runtime_workdir: Path, image_store: ImageStore, test_image: Image
) -> AsyncIterator[Runtime]:
    rt = make_test_runtime(request.param, runtime_workdir, image_store)
    yield rt
    await rt.close()
