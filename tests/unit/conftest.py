"""Fixtures shared by the unit tests: small images on disk."""
import pytest

from qblock.block.create import bdrv_create
from qblock.block.driver import bdrv_find_format


@pytest.fixture
def raw_img(tmp_path):
    """A 1 MiB raw file filled with 0x5a."""
    path = tmp_path / "disk.raw"
    path.write_bytes(b"\x5a" * (1 << 20))
    return str(path)


@pytest.fixture
def qcow2_img(tmp_path):
    """A new, empty 1 MiB qcow2 image written by qblock."""
    path = str(tmp_path / "disk.qcow2")
    bdrv_create(bdrv_find_format("qcow2"), path, {"size": 1 << 20})
    return path
