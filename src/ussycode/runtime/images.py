"""Guest images: Debian root filesystems built with mmdebstrap, cached by the digest of their recipe.

An image is a directory ``images_dir/<name>-<digest12>/`` holding ``rootfs/`` (the tree every runtime uses as its
read-only lower layer or turns into an ext4 file) and ``manifest.json`` (name, digest, packages, created_at, size).
The digest covers everything that decides the image's contents: the recipe (suite, mirror, packages), the
customisation script and the guest files shipped in ``ussycode/runtime/guest``. Change any of them and the image
gets a new directory; old directories stay as long as a VM references them (VMs record the digest they were made
from, so a rebuild never breaks an existing VM).

Builds go to a temporary directory next to the final one and are renamed into place, so a crash never leaves a
half-built image under a real name.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ussycode.errors import ImageError
from ussycode.runtime import disks

log = logging.getLogger(__name__)

GUEST_DIR = Path(__file__).resolve().parent / "guest"
DEFAULT_MIRROR = "http://deb.debian.org/debian"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Recipe:
    """What goes into an image. ``slim`` drops documentation, man pages and translations (smaller, faster)."""

    name: str
    packages: tuple[str, ...]
    suite: str = "bookworm"
    mirror: str = DEFAULT_MIRROR
    variant: str = "minbase"
    slim: bool = False

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "packages": list(self.packages),
            "suite": self.suite,
            "mirror": self.mirror,
            "variant": self.variant,
            "slim": self.slim,
        }


_BASE = ("openssh-server", "sudo", "iproute2", "procps", "ca-certificates", "curl", "python3")

RECIPES: dict[str, Recipe] = {
    "ussyuntu": Recipe(
        "ussyuntu",
        _BASE
        + (
            "git", "python3-venv", "python3-pip", "nodejs", "npm", "build-essential", "tmux", "vim", "nano",
            "htop", "jq", "sqlite3", "less", "locales", "man-db", "unzip", "wget", "openssh-client",
            "python3-starlette", "python3-uvicorn",  # the python-web template's stack, no network needed
        ),
    ),
    # Small image for tests and CI: what the guest contract needs, nothing else.
    "ussyuntu-mini": Recipe("ussyuntu-mini", _BASE, slim=True),
}


@dataclass(frozen=True)
class Image:
    """A built image on disk."""

    name: str
    digest: str
    path: Path
    manifest: dict[str, Any]

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs"


def guest_files() -> list[Path]:
    """The files shipped into guests, in a stable order (part of every image digest).

    ``vm-*`` files go into the VM runtimes' initramfs, never into an image, so they do not change image digests.
    """
    return sorted(p for p in GUEST_DIR.rglob("*")
                  if p.is_file() and not p.name.startswith((".", "vm-")) and "__pycache__" not in p.parts)


def recipe_digest(recipe: Recipe, files: list[Path] | None = None) -> str:
    """sha256 over the recipe and the guest files (names and contents): the image's content address."""
    h = hashlib.sha256()
    h.update(json.dumps(recipe.as_json(), sort_keys=True).encode())
    for path in files if files is not None else guest_files():
        name = str(path.relative_to(GUEST_DIR)) if path.is_relative_to(GUEST_DIR) else path.name
        h.update(b"\0" + name.encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()


BUILD_TIMEOUT = 3600.0  # an image build that takes longer is stuck (a mirror that stopped answering)


def image_dirname(name: str, digest: str) -> str:
    return f"{name}-{digest[:12]}"


def mmdebstrap_argv(recipe: Recipe, target: Path, *, guest_dir: Path = GUEST_DIR, proxy: str = "") -> list[str]:
    """The mmdebstrap command line that builds ``recipe`` into the directory ``target`` (pure)."""
    argv = [
        "mmdebstrap",
        f"--variant={recipe.variant}",
        "--mode=root",
        "--format=directory",
        "--include=" + ",".join(recipe.packages),
        "--aptopt=Acquire::Retries 3",
        "--aptopt=APT::Install-Recommends false",
    ]
    if proxy:
        argv.append(f"--aptopt=Acquire::http::Proxy {json.dumps(proxy)}")
    if recipe.slim:
        for pattern in ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*", "/usr/share/info/*"):
            argv.append(f"--dpkgopt=path-exclude={pattern}")
        argv.append("--dpkgopt=path-include=/usr/share/doc/*/copyright")
    hook = f'sh {shlex.quote(str(guest_dir / "setup.sh"))} "$1" {shlex.quote(str(guest_dir))}'
    argv += [f"--customize-hook={hook}", recipe.suite, str(target), recipe.mirror]
    return argv


def host_apt_proxy() -> str:
    """The HTTP proxy the host's apt uses (``Acquire::http::Proxy``), or ``""``: builds inherit it."""
    apt_config = shutil.which("apt-config")
    if apt_config is None:
        return ""
    try:
        out = subprocess.run(
            [apt_config, "shell", "P", "Acquire::http::Proxy"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    # Output looks like: P='http://proxy:3128'
    for line in out.splitlines():
        if line.startswith("P="):
            value = shlex.split(line[2:])
            return value[0] if value else ""
    return ""


def _tree_size(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


class ImageStore:
    """Builds, finds and validates images under ``images_dir``."""

    def __init__(self, images_dir: Path, recipes: dict[str, Recipe] | None = None) -> None:
        self.images_dir = Path(images_dir)
        self.recipes = dict(recipes if recipes is not None else RECIPES)
        self._locks: dict[str, asyncio.Lock] = {}

    def recipe(self, name: str) -> Recipe:
        try:
            return self.recipes[name]
        except KeyError:
            known = ", ".join(sorted(self.recipes))
            raise ImageError(f"unknown image {name!r}; known images: {known}", reason="image_unknown") from None

    def digest(self, name: str) -> str:
        """The digest the image ``name`` has with the current recipe and guest files."""
        return recipe_digest(self.recipe(name))

    def resolve(self, name: str) -> Image:
        """The built image for the current recipe of ``name``, validated; ImageError if not built or corrupt."""
        digest = self.digest(name)
        path = self.images_dir / image_dirname(name, digest)
        if not path.exists():
            stale = [p.name for p in self._built_dirs(name)]
            hint = f" (older builds exist: {', '.join(stale)})" if stale else ""
            raise ImageError(
                f"image {name} is not built; run `ussycode image build --name {name}`{hint}",
                reason="image_not_built",
            )
        return self._load(path)

    def by_digest(self, digest: str) -> Image:
        """The built image with this digest (what a VM recorded at create time), whatever its recipe is now."""
        matches = sorted(self.images_dir.glob(f"*-{digest[:12]}"))
        if not matches:
            raise ImageError(
                f"the image this VM was made from ({digest[:12]}) is gone from {self.images_dir}; "
                "restore it or recreate the VM",
                reason="image_missing",
            )
        image = self._load(matches[0])
        if image.digest != digest:
            raise ImageError(f"image {matches[0]} has digest {image.digest}, expected {digest}")
        return image

    def list_built(self) -> list[Image]:
        """Every valid built image (all names, all digests)."""
        images = []
        if self.images_dir.is_dir():
            for path in sorted(self.images_dir.iterdir()):
                if path.name.startswith("."):
                    continue
                with contextlib.suppress(ImageError):
                    images.append(self._load(path))
        return images

    async def ensure_built(self, name: str, progress: Progress | None = None) -> Image:
        """Return the current image ``name``, building it first if needed."""
        try:
            return self.resolve(name)
        except ImageError as exc:
            if exc.reason != "image_not_built":
                raise
        return await self.build(name, progress=progress)

    async def build(self, name: str, progress: Progress | None = None, *, force: bool = False) -> Image:
        """Build image ``name`` (a no-op when the same digest is already built, unless ``force``).

        mmdebstrap's output goes line by line to ``progress``. On failure raises ImageError carrying the command
        line and the tail of the output; nothing is left behind.
        """
        recipe = self.recipe(name)
        digest = recipe_digest(recipe)
        final = self.images_dir / image_dirname(name, digest)
        say = progress or (lambda _line: None)
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            self.images_dir.mkdir(parents=True, exist_ok=True)
            lock_fd = await asyncio.to_thread(_flock, self.images_dir / f".lock-{name}")
            try:
                if final.exists() and not force:
                    with contextlib.suppress(ImageError):
                        image = self._load(final)
                        say(f"image {name} ({digest[:12]}) is already built")
                        return image
                return await self._build(recipe, digest, final, say)
            finally:
                os.close(lock_fd)

    async def _build(self, recipe: Recipe, digest: str, final: Path, say: Progress) -> Image:
        if shutil.which("mmdebstrap") is None:
            raise ImageError("mmdebstrap is not installed; run `apt-get install mmdebstrap`")
        tmp = self.images_dir / f".build-{final.name}-{os.getpid()}"
        _remove_tree(tmp)
        tmp.mkdir(parents=True)
        rootfs = tmp / "rootfs"
        argv = mmdebstrap_argv(recipe, rootfs, proxy=await asyncio.to_thread(host_apt_proxy))
        say(f"building image {recipe.name} ({digest[:12]}): {len(recipe.packages)} packages from {recipe.mirror}")
        started = time.monotonic()
        tail: list[str] = []
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            assert proc.stdout is not None
            try:
                async with asyncio.timeout(BUILD_TIMEOUT):
                    async for raw in proc.stdout:
                        line = raw.decode(errors="replace").rstrip()
                        tail = (tail + [line])[-40:]
                        say(line)
                    code = await proc.wait()
            except BaseException:
                # SIGTERM first: mmdebstrap unmounts what it mounted in the root when it is asked to stop.
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                try:
                    await asyncio.shield(asyncio.wait_for(proc.wait(), 20))
                except TimeoutError:
                    proc.kill()
                    await asyncio.shield(proc.wait())
                raise
            if code != 0:
                raise ImageError(
                    f"building image {recipe.name} failed (mmdebstrap exit {code})",
                    evidence="$ " + shlex.join(argv) + "\n" + "\n".join(tail),
                )
            manifest = {
                "name": recipe.name,
                "digest": digest,
                "packages": list(recipe.packages),
                "recipe": recipe.as_json(),
                "created_at": time.time(),
                "build_seconds": round(time.monotonic() - started, 1),
                "size": _tree_size(rootfs),
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            self._validate(tmp)
            if final.exists():  # noqa: ASYNC240 (a forced rebuild replaces the old tree)
                await asyncio.to_thread(_remove_tree, final)
            os.rename(tmp, final)
        except BaseException:
            await asyncio.to_thread(_remove_tree, tmp)
            raise
        image = self._load(final)
        say(f"image {recipe.name} built in {image.manifest['build_seconds']}s ({image.manifest['size'] // 2**20} MiB)")
        return image

    def _built_dirs(self, name: str) -> Iterator[Path]:
        if not self.images_dir.is_dir():
            return
        for path in sorted(self.images_dir.glob(f"{name}-*")):
            if len(path.name) == len(name) + 13 and (path / "manifest.json").exists():
                yield path

    def _validate(self, path: Path) -> dict[str, Any]:
        try:
            manifest = json.loads((path / "manifest.json").read_text())
        except (OSError, ValueError) as exc:
            raise ImageError(
                f"image {path.name} is corrupt (manifest.json: {exc}); {_rebuild_hint(path)}",
                reason="image_corrupt",
            ) from None
        if not isinstance(manifest, dict) or not {"name", "digest", "packages"} <= manifest.keys():
            raise ImageError(f"image {path.name} is corrupt (manifest.json lacks fields)", reason="image_corrupt")
        rootfs = path / "rootfs"
        for needed in ("etc/os-release", "usr/sbin/sshd", "usr/local/sbin/ussycode-init", "etc/passwd"):
            if not (rootfs / needed).exists():
                raise ImageError(
                    f"image {path.name} is corrupt ({needed} missing); {_rebuild_hint(path)}",
                    reason="image_corrupt",
                )
        return manifest

    def _load(self, path: Path) -> Image:
        if not path.exists():
            raise ImageError(f"image {path.name} does not exist", reason="image_missing")
        manifest = self._validate(path)
        return Image(name=str(manifest["name"]), digest=str(manifest["digest"]), path=path, manifest=manifest)


def _rebuild_hint(path: Path) -> str:
    """What to run to replace a corrupt image directory ``<name>-<digest12>`` (``build`` replaces a corrupt one)."""
    name = path.name[:-13] if len(path.name) > 13 and path.name[-13] == "-" else path.name
    return f"rebuild it with `ussycode image build --name {name}`"


def _flock(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _remove_tree(path: Path) -> None:
    """A build tree goes, never what a killed build left mounted in it (see :func:`disks.remove_tree`)."""
    disks.remove_tree(path)
