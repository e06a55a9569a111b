"""Shared fixtures: a built guest test image, cached across runs.

The image lives under ``$USSYCODE_TEST_IMAGES_DIR`` (default ``/var/tmp/ussycode-test-images``) and is named by
the digest of its recipe, so it is rebuilt only when the recipe or the guest files change (~1 minute).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from ussycode.runtime.images import Image, ImageStore

TEST_IMAGE = "ussyuntu-mini"


def images_dir_for_tests() -> Path:
    return Path(os.environ.get("USSYCODE_TEST_IMAGES_DIR", "/var/tmp/ussycode-test-images"))


@pytest.fixture(scope="session")
def image_store() -> ImageStore:
    return ImageStore(images_dir_for_tests())


@pytest.fixture(scope="session")
def test_image(image_store: ImageStore) -> Image:
    """The small test image, built on first use (needs root and mmdebstrap; skips otherwise)."""
    try:
        return image_store.resolve(TEST_IMAGE)
    except Exception:  # noqa: BLE001 - not built yet (or stale): build below
        pass
    if os.geteuid() != 0:
        pytest.skip("building the test image needs root")
    if shutil.which("mmdebstrap") is None:
        pytest.skip("building the test image needs mmdebstrap (apt-get install mmdebstrap)")
    return asyncio.run(image_store.build(TEST_IMAGE))
