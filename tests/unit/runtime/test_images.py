"""Image recipes, digests, the mmdebstrap command line and the store's errors (no builds here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ussycode.errors import ImageError
from ussycode.runtime import registry
from ussycode.runtime.images import (
    GUEST_DIR,
    RECIPES,
    ImageStore,
    Recipe,
    guest_files,
    image_dirname,
    mmdebstrap_argv,
    recipe_digest,
)


def test_full_image_has_the_promised_packages() -> None:
    want = {"openssh-server", "sudo", "git", "curl", "ca-certificates", "python3", "python3-venv", "python3-pip",
            "nodejs", "npm", "build-essential", "tmux", "vim", "nano", "htop", "jq", "sqlite3", "iproute2",
            "procps", "less"}
    assert want <= set(RECIPES["ussyuntu"].packages)
    assert {"openssh-server", "sudo", "python3"} <= set(RECIPES["ussyuntu-mini"].packages)


def test_digest_covers_recipe_and_guest_files(tmp_path: Path) -> None:
    recipe = RECIPES["ussyuntu-mini"]
    files = guest_files()
    assert GUEST_DIR / "agents" / "pi-models.json" in files  # files in subdirectories count too
    base = recipe_digest(recipe, files)
    assert base == recipe_digest(recipe, files)
    assert base != recipe_digest(Recipe(recipe.name, recipe.packages + ("jq",), slim=True), files)
    changed = tmp_path / files[0].name
    changed.write_bytes(files[0].read_bytes() + b"\n# changed\n")
    assert base != recipe_digest(recipe, [changed, *files[1:]])
    assert image_dirname("x", base) == f"x-{base[:12]}"
    # the same file name in another directory is another file
    moved = tmp_path / "agents"
    moved.mkdir()
    (moved / "setup.sh").write_bytes((GUEST_DIR / "setup.sh").read_bytes())
    assert recipe_digest(recipe, files) != recipe_digest(recipe, [*files, moved / "setup.sh"])


def test_mmdebstrap_argv() -> None:
    argv = mmdebstrap_argv(RECIPES["ussyuntu-mini"], Path("/tmp/t/rootfs"), proxy="http://p:3128")
    assert argv[0] == "mmdebstrap"
    assert argv[-3:] == ["bookworm", "/tmp/t/rootfs", "http://deb.debian.org/debian"]
    assert any(a.startswith("--include=openssh-server,") for a in argv)
    assert '--aptopt=Acquire::http::Proxy "http://p:3128"' in argv
    assert any(a.startswith("--customize-hook=sh ") and "setup.sh" in a for a in argv)
    assert "--dpkgopt=path-exclude=/usr/share/doc/*" in argv  # slim
    assert not any("path-exclude" in a for a in mmdebstrap_argv(RECIPES["ussyuntu"], Path("/x")))


def test_guest_files_never_bake_host_keys() -> None:
    setup = (GUEST_DIR / "setup.sh").read_text()
    assert 'rm -f "$ROOT"/etc/ssh/ssh_host_*' in setup
    sshd = (GUEST_DIR / "sshd_config").read_text()
    for line in ("PermitRootLogin no", "PasswordAuthentication no", "AllowUsers ussycode", "Port 22"):
        assert line in sshd


def test_resolve_unbuilt_image_says_what_to_run(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    with pytest.raises(ImageError) as info:
        store.resolve("ussyuntu-mini")
    assert "ussycode image build --name ussyuntu-mini" in str(info.value)
    assert info.value.reason == "image_not_built"
    with pytest.raises(ImageError, match="unknown image"):
        store.resolve("nope")


def test_corrupt_images_are_reported(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    path = tmp_path / image_dirname("ussyuntu-mini", store.digest("ussyuntu-mini"))
    (path / "rootfs").mkdir(parents=True)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(ImageError, match="corrupt") as info:
        store.resolve("ussyuntu-mini")
    assert info.value.reason == "image_corrupt"
    (path / "manifest.json").write_text(json.dumps({"name": "ussyuntu-mini", "digest": "d", "packages": []}))
    with pytest.raises(ImageError, match="missing"):
        store.resolve("ussyuntu-mini")
    with pytest.raises(ImageError, match="gone"):
        store.by_digest("0" * 64)
    assert store.list_built() == []


def test_registry_resolves_names() -> None:
    assert registry.choose("container") == "container"
    with pytest.raises(Exception, match="unknown runtime"):
        registry.choose("vmware")
    assert "container" in registry.checks()
