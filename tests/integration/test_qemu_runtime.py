"""QemuRuntime booting the real test image (ussyuntu-mini) under TCG/KVM: ssh, exec, persistence, failures.

One guest at a time (the host's two cores are shared). Images are cached across runs in
``$USSYCODE_TEST_IMAGES`` (default /var/tmp/ussycode-test-images); the first run builds one with mmdebstrap.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ussycode.errors import ImageError, RuntimeFailure, UsageError
from ussycode.runtime import kernel, netns, rootfs
from ussycode.runtime.qemu import QemuRuntime
from ussycode.runtime.qemu.runtime import qemu_alive
from ussycode.types import VmSpec, VmStatus

pytestmark = pytest.mark.slow

IMAGES_DIR = Path(os.environ.get("USSYCODE_TEST_IMAGES", "/var/tmp/ussycode-test-images"))


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("qemu-system-x86_64", "qemu-img", "mmdebstrap", "nft", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    try:
        kernel.find_kernel()
    except ImageError as exc:
        return f"{exc.user_message} ({exc.log_message})"
    return None


SKIP = _skip_reason()
if SKIP:
    pytest.skip(SKIP, allow_module_level=True)


@pytest.fixture(scope="module")
def image_store() -> object:
    from ussycode.runtime.images import ImageStore

    store = ImageStore(IMAGES_DIR)
    asyncio.run(store.ensure_built("ussyuntu-mini"))
    return store


@pytest.fixture
async def runtime(tmp_path: Path, image_store: object) -> AsyncIterator[QemuRuntime]:
    rt = QemuRuntime(tmp_path, image_store, run_dir=Path("/run/ussycode-test/qemu"), egress=False)  # type: ignore[arg-type]
    yield rt
    for vm_dir in (tmp_path / "qemu" / "vms").glob("*"):
        await rt.destroy(vm_dir.name)
    await rt.close()


def spec(vm_id: str = "vmq1", **kw: object) -> VmSpec:
    fields: dict[str, object] = dict(
        id=vm_id, name=f"box-{vm_id}", image="ussyuntu-mini", cpu=1, memory_mb=512, disk_gb=2,
        env={"GREETING": "hello world"}, authorized_keys=("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHg gateway",),
    )
    fields.update(kw)
    return VmSpec(**fields)  # type: ignore[arg-type]


def assert_nothing_left(rt: QemuRuntime, vm_id: str) -> None:
    p = rt.paths(vm_id)
    assert not qemu_alive(rt._pid(vm_id), vm_id)
    assert not netns.exists(rt.netns_name(vm_id)), "network namespace left behind"
    assert not p.run_dir.exists(), "run directory left behind"
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert f"ussy-{vm_id}," not in ps, "a qemu process is left"


async def test_boot_ssh_exec_persist_restart_kill(runtime: QemuRuntime) -> None:
    s = spec()
    await runtime.create(s)
    await runtime.start(s)
    assert await runtime.status(s.id) is VmStatus.RUNNING

    reader, writer = await runtime.open_connection(s.id, 22)
    banner = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    assert banner.startswith(b"SSH-2.0-")

    res = await runtime.exec(s.id, ["uname", "-r"])
    assert res.exit_status == 0, res
    assert res.stdout.decode().strip() == kernel.find_kernel().release

    script = 'echo "$GREETING"; hostname; id -u; df -BG --output=size / | tail -1'
    res = await runtime.exec(s.id, ["bash", "-lc", script])
    lines = res.stdout.decode().split()
    assert lines[:4] == ["hello", "world", "box-vmq1", "1000"], res
    assert int(lines[4].rstrip("G")) >= 1  # grown from the image's size towards the 2 GB disk
    res = await runtime.exec(s.id, ["id", "-u"], user="root")
    assert res.stdout.strip() == b"0", res

    await runtime.exec(s.id, ["sh", "-c", "echo persisted > ~/note.txt && sync"])
    await runtime.stop(s.id, timeout=30)
    assert await runtime.status(s.id) is VmStatus.STOPPED
    assert "ussycode-init: halted" in runtime.paths(s.id).console.read_text(), "no orderly ACPI shutdown"
    assert_nothing_left(runtime, s.id)

    await runtime.start(s)
    res = await runtime.exec(s.id, ["cat", "/home/ussycode/note.txt"])
    assert res.stdout == b"persisted\n"

    # Re-attach from a fresh runtime object (a restarted server), then kill QEMU from outside.
    state = runtime.get_state(s.id)
    fresh = QemuRuntime(runtime.data_dir.parent, runtime.images, run_dir=runtime.run_root, egress=False)
    await fresh.load_state(s.id, state)
    assert await fresh.status(s.id) is VmStatus.RUNNING
    assert (await fresh.exec(s.id, ["true"])).exit_status == 0
    await fresh.close()

    os.kill(state["pid"], 9)
    for _ in range(30):
        if await runtime.status(s.id) is VmStatus.STOPPED:
            break
        await asyncio.sleep(0.1)
    assert await runtime.status(s.id) is VmStatus.STOPPED
    await runtime.stop(s.id)
    assert_nothing_left(runtime, s.id)


async def test_copy_disk_is_independent_and_small(runtime: QemuRuntime) -> None:
    src = spec("vmqsrc")
    await runtime.create(src)
    dst = spec("vmqdst", disk_gb=3)
    await runtime.copy_disk(src.id, dst)
    p_src, p_dst = runtime.paths(src.id), runtime.paths(dst.id)
    assert p_dst.disk.stat().st_blocks * 512 < 8 * 2**20  # only the top layer, not the image
    assert (await rootfs.disk_info(p_dst.disk))["backing-filename"] == (await rootfs.disk_info(p_src.disk))[
        "backing-filename"
    ]


async def test_invalid_sizes_are_refused(runtime: QemuRuntime) -> None:
    with pytest.raises(UsageError, match="cpu"):
        await runtime.create(spec("vmqbad", cpu=0))
    with pytest.raises(UsageError, match="memory"):
        await runtime.create(spec("vmqbad", memory_mb=16))
    assert not runtime.paths("vmqbad").vm_dir.exists()


async def test_missing_kernel_is_a_clear_error(runtime: QemuRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    s = spec("vmqnok")
    await runtime.create(s)
    real = kernel.find_kernel
    monkeypatch.setattr(kernel, "find_kernel", lambda: real(boot_dir=Path("/nonexistent")))
    with pytest.raises(ImageError, match="no guest kernel") as info:
        await runtime.start(s)
    assert "linux-image-cloud-amd64" in info.value.log_message
    assert_nothing_left(runtime, s.id)


async def test_corrupt_image_fails_boot_with_console_evidence(runtime: QemuRuntime) -> None:
    s = spec("vmqbroken")
    await runtime.create(s)
    # Overwrite the root file system's superblock region in the VM's own layer: the guest cannot mount it.
    disk = runtime.paths(s.id).disk
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x55 0 2M", str(disk)], check=True, capture_output=True)
    runtime.boot_timeout = 90
    with pytest.raises(RuntimeFailure) as info:
        await runtime.start(s)
    evidence = info.value.evidence
    assert "qemu-system-x86_64" in evidence and "-kernel" in evidence
    assert "FAILED: cannot mount root" in evidence
    assert_nothing_left(runtime, s.id)


async def test_missing_base_image_is_refused_before_boot(runtime: QemuRuntime) -> None:
    s = spec("vmqnobase")
    await runtime.create(s)
    disk = runtime.paths(s.id).disk
    # Point the disk at a base that does not exist (an image deleted from the cache).
    subprocess.run(
        ["qemu-img", "rebase", "-u", "-F", "raw", "-b", "/nonexistent/base.ext4", str(disk)], check=True
    )
    with pytest.raises(ImageError, match="missing"):
        await runtime.start(s)
    assert_nothing_left(runtime, s.id)
