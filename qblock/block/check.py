"""Image consistency checks: QEMU's ``bdrv_check`` (block.c) and its result types (include/block/block-common.h).

A format that can check itself implements the driver hook::

    def bdrv_co_check(self, bs, result: BdrvCheckResult, fix: int) -> int

It runs in a coroutine, fills ``result`` (counts of corruptions, leaks, check errors, what it
fixed when ``fix`` has BDRV_FIX_LEAKS/BDRV_FIX_ERRORS, the image end offset and the cluster
statistics in ``result.bfi``) and returns 0, or a negative errno when the check itself could not
run.  :func:`bdrv_check` clears ``result`` before calling the hook, as QEMU does, and returns
-ENOTSUP when the driver has no hook (``qemu-img check`` turns that into exit status 63).

What ``qemu-img check`` prints and its exit codes (0 clean, 1 check failed, 2 corruptions,
3 leaks only, 63 unsupported) belong to the tool (tools/qemu_img.py).
"""
from __future__ import annotations

import enum
import errno

import attrs

from qblock.block.graph import BlockDriverState, bdrv_get_aio_context
from qblock.block.io import run_co_in
from qblock.util.coroutine import coroutine_fn

__all__ = ["BdrvCheckMode", "BDRV_FIX_LEAKS", "BDRV_FIX_ERRORS", "BlockFragInfo", "BdrvCheckResult",
           "bdrv_co_check", "bdrv_check"]


class BdrvCheckMode(enum.IntFlag):
    """What a check may repair (QEMU's BdrvCheckMode)."""

    BDRV_FIX_LEAKS = 1
    BDRV_FIX_ERRORS = 2


BDRV_FIX_LEAKS = BdrvCheckMode.BDRV_FIX_LEAKS
BDRV_FIX_ERRORS = BdrvCheckMode.BDRV_FIX_ERRORS


@attrs.define
class BlockFragInfo:
    """Cluster statistics a check gathers on the way (QEMU's BlockFragInfo)."""

    allocated_clusters: int = 0
    total_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0


@attrs.define
class BdrvCheckResult:
    """What a consistency check found and repaired (QEMU's BdrvCheckResult)."""

    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    bfi: BlockFragInfo = attrs.field(factory=BlockFragInfo)

    def clear(self) -> None:
        """memset(res, 0, sizeof(*res)): every count back to zero."""
        self.corruptions = self.leaks = self.check_errors = 0
        self.corruptions_fixed = self.leaks_fixed = 0
        self.image_end_offset = 0
        self.bfi = BlockFragInfo()


@coroutine_fn
def bdrv_co_check(bs: BlockDriverState, res: BdrvCheckResult, fix: int) -> int:
    """Run the driver's consistency check on ``bs``: 0 or a negative errno (-ENOTSUP without a hook)."""
    drv = bs.drv
    if drv is None:
        return -errno.ENOMEDIUM
    hook = getattr(drv, "bdrv_co_check", None)
    if hook is None:
        return -errno.ENOTSUP
    res.clear()
    return hook(bs, res, int(fix))


def bdrv_check(bs: BlockDriverState, res: BdrvCheckResult, fix: int = 0) -> int:
    """bdrv_co_check from anywhere: in the caller's coroutine, else in a new one polled to completion."""
    return run_co_in(bdrv_get_aio_context(bs), bdrv_co_check, bs, res, fix)
