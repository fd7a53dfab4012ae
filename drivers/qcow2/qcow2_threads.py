"""Compression off the main loop: QEMU's block/qcow2-threads.c.

qcow2 compresses one cluster at a time with zlib's raw deflate (window 12
bits, no zlib header), as ``qemu-img convert -c`` does; the work runs on the
AioContext's thread pool (zlib releases the GIL) while the coroutine
yields, as QEMU's ``qcow2_co_do_compress`` does.  zstd (compression type 1)
is not supported: such images are refused at open.
"""
from __future__ import annotations

import errno
import zlib

from qblock.block.graph import bdrv_get_aio_context
from qblock.util.thread_pool import thread_pool_submit_co

QCOW2_ZLIB_WINDOW_BITS = -12


def qcow2_zlib_compress(dest, dest_size: int, src) -> int:
    """Compress ``src`` into ``dest``: the length if it fits in ``dest_size``, -ENOMEM if not, else -EIO."""
    try:
        c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, QCOW2_ZLIB_WINDOW_BITS, 9,
                             zlib.Z_DEFAULT_STRATEGY)
        out = c.compress(src) + c.flush(zlib.Z_FINISH)
    except zlib.error:
        return -errno.EIO
    if len(out) > dest_size:
        return -errno.ENOMEM      # does not fit: the caller writes the cluster uncompressed
    dest[:len(out)] = out
    return len(out)


def qcow2_zlib_decompress(dest, dest_size: int, src) -> int:
    """Fill ``dest_size`` bytes of ``dest`` from the raw deflate stream ``src`` (trailing input ignored): 0 or -EIO."""
    try:
        out = zlib.decompressobj(QCOW2_ZLIB_WINDOW_BITS).decompress(src, dest_size)
    except zlib.error:
        return -errno.EIO
    if len(out) != dest_size:
        return -errno.EIO
    dest[:dest_size] = out
    return 0


def qcow2_co_compress(bs, dest, dest_size: int, src) -> int:
    return thread_pool_submit_co(bdrv_get_aio_context(bs), lambda a: qcow2_zlib_compress(*a), (dest, dest_size, src))


def qcow2_co_decompress(bs, dest, dest_size: int, src) -> int:
    return thread_pool_submit_co(bdrv_get_aio_context(bs), lambda a: qcow2_zlib_decompress(*a),
                                 (dest, dest_size, src))
