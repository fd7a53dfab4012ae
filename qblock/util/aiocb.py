"""Asynchronous control blocks: QEMU's BlockAIOCB and AIOCBInfo (include/block/aio.h, util/aiocb.c).

``qemu_aio_get`` makes the handle an ``*_aio_*`` call returns; the
completion later calls ``cb(opaque, ret)``.  ``refcnt`` lets a canceller keep
the handle alive until the completion ran (bdrv_aio_cancel).
"""
from __future__ import annotations

import itertools
from typing import Any, Callable

import attrs

__all__ = ["AIOCBInfo", "BlockAIOCB", "qemu_aio_get", "qemu_aio_ref", "qemu_aio_unref"]

_ids = itertools.count(1)


@attrs.define(eq=False)
class AIOCBInfo:
    """What a kind of AIOCB can do: cancel asynchronously, tell its AioContext."""

    cancel_async: Callable[["BlockAIOCB"], None] | None = None
    get_aio_context: Callable[["BlockAIOCB"], Any] | None = None


@attrs.define(eq=False)
class BlockAIOCB:
    """An in-flight asynchronous request: completion calls ``cb(opaque, ret)``."""

    aiocb_info: AIOCBInfo
    bs: Any
    cb: Callable[[Any, int], None] | None
    opaque: Any
    refcnt: int = 1
    id: int = attrs.field(factory=_ids.__next__)

    @property
    def trace_name(self) -> str:
        return f"acb{self.id}"


def qemu_aio_get(aiocb_info: AIOCBInfo, bs: Any, cb: Callable[[Any, int], None] | None, opaque: Any,
                 cls: type = BlockAIOCB, **fields: Any) -> BlockAIOCB:
    """A new AIOCB of class ``cls`` (a BlockAIOCB subclass holding the request's state)."""
    return cls(aiocb_info, bs, cb, opaque, **fields)


def qemu_aio_ref(acb: BlockAIOCB) -> None:
    acb.refcnt += 1


def qemu_aio_unref(acb: BlockAIOCB) -> None:
    if acb.refcnt <= 0:
        raise AssertionError(f"qemu_aio_unref of {acb.trace_name} with refcnt {acb.refcnt}")
    acb.refcnt -= 1
