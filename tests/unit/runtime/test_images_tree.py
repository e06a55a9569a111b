"""Removing an image build tree never deletes through a mount left inside it (a killed build can leave the host's
/dev/shm bind-mounted in its root)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from ussycode.runtime.disks import mounts_under
from ussycode.runtime.images import _remove_tree

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")


def test_a_bind_mount_inside_a_build_tree_is_unmounted_not_emptied(tmp_path: Path) -> None:
    outside = tmp_path / "host-shm"
    outside.mkdir()
    (outside / "PostgreSQL.123").write_text("shared memory of someone else")
    tree = tmp_path / ".build-x-1"
    inside = tree / "rootfs" / "dev" / "shm"
    inside.mkdir(parents=True)
    (tree / "rootfs" / "etc").mkdir()
    subprocess.run(["mount", "--bind", str(outside), str(inside)], check=True)
    try:
        assert mounts_under(tree) == [str(inside.resolve())]
        _remove_tree(tree)
        assert not tree.exists()
        assert (outside / "PostgreSQL.123").read_text() == "shared memory of someone else"
    finally:
        subprocess.run(["umount", "--lazy", str(inside)], capture_output=True, check=False)


def test_a_path_with_spaces_is_found_in_mountinfo(tmp_path: Path) -> None:
    outside = tmp_path / "src"
    outside.mkdir()
    tree = tmp_path / "build tree"
    target = tree / "a b"
    target.mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(outside), str(target)], check=True)
    try:
        assert mounts_under(tree) == [str(target.resolve())]
    finally:
        subprocess.run(["umount", "--lazy", str(target)], capture_output=True, check=False)
