"""What qemu-img asks of a whole image: part of QEMU's block/qcow2.c.

* ``qcow2_get_specific_info``: the ImageInfoSpecific ``qemu-img info``
  prints under "Format specific information" (compat, compression type,
  lazy refcounts, refcount bits, corrupt, extended L2);
* ``qcow2_measure``: ``qemu-img measure -O qcow2`` (``qcow2_calc_prealloc_size``
  for the fully allocated size, the input's allocated clusters for the
  required size);
* ``qcow2_has_zero_init``: does a new image read as zeroes (convert skips
  writing zeroes then);
* ``qcow2_make_empty``: drop every cluster of the active layer (``qemu-img
  commit`` empties the top image), rebuilding a small v3 image from scratch
  as QEMU's ``make_completely_empty`` does.

Left out: the encryption and bitmap parts (qblock has neither: measuring
with ``encrypt.format=luks`` fails, and the "bitmaps" size of measure is 0,
as for an input without persistent bitmaps).
"""
from __future__ import annotations

import errno
import struct

from qblock.block.driver import BDRV_BLOCK_ALLOCATED, BDRV_BLOCK_DATA, BDRV_BLOCK_ZERO, BDRV_SECTOR_SIZE, PreallocMode
from qblock.block.graph import bdrv_getlength
from qblock.block.io import bdrv_block_status_above, bdrv_co_pwrite_sync, bdrv_co_pwrite_zeroes, bdrv_co_truncate
from qblock.util.error import Error, error_report, error_setg_errno
from qblock.util.qemu_option import parse_option_bool

from .qcow2_cache import qcow2_cache_empty
from .qcow2_cluster import qcow2_cluster_discard
from .qcow2_h import (
    DEFAULT_CLUSTER_SIZE,
    INT_MAX,
    L1E_SIZE,
    L2E_SIZE_NORMAL,
    MAX_CLUSTER_BITS,
    MIN_CLUSTER_BITS,
    QCOW2_COMPAT_LAZY_REFCOUNTS,
    QCOW2_DISCARD_SNAPSHOT,
    QCOW2_EXT_MAGIC_BITMAPS,
    QCOW2_INCOMPAT_CORRUPT,
    QCOW_CRYPT_LUKS,
    QCOW_MAX_L1_SIZE,
    REFTABLE_ENTRY_SIZE,
)
from .qcow2_header import qcow2_mark_clean, qcow2_mark_dirty
from .qcow2_refcount import qcow2_alloc_clusters, qcow2_refcount_metadata_size

L2E_SIZE_EXTENDED = 16
QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER = 32
HDR_L1_TABLE_OFFSET = 40                 # offsetof(QCowHeader, l1_table_offset)
QCOW2_COMPRESSION_TYPE_NAMES = ("zlib", "zstd")


# --------------------------------------------------------------------------
# qemu-img info


def qcow2_get_specific_info(bs) -> dict:
    """ImageInfoSpecific: ``{"type": "qcow2", "data": {...}}``, members in QAPI order."""
    s = bs.opaque
    if s.qcow_version == 2:
        data = {"compat": "0.10", "refcount-bits": s.refcount_bits}
    elif s.qcow_version == 3:
        # (No "data-file", "data-file-raw" or "bitmaps": qblock opens no image with a data file and
        # loads no persistent bitmaps.)
        data = {"compat": "1.1",
                "extended-l2": False,
                "lazy-refcounts": bool(s.compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS),
                "corrupt": bool(s.incompatible_features & QCOW2_INCOMPAT_CORRUPT),
                "refcount-bits": s.refcount_bits}
    else:
        raise AssertionError(f"qcow2_get_specific_info: version {s.qcow_version}")
    data["compression-type"] = QCOW2_COMPRESSION_TYPE_NAMES[s.compression_type]
    return {"type": "qcow2", "data": data}


# --------------------------------------------------------------------------
# qemu-img measure


def qcow2_calc_prealloc_size(total_size: int, cluster_size: int, refcount_order: int, extended_l2: bool) -> int:
    """Bytes of a fully allocated image of ``total_size``: data, header, L1, L2 and refcount structures."""
    aligned_total_size = -(-total_size // cluster_size) * cluster_size
    l2e_size = L2E_SIZE_EXTENDED if extended_l2 else L2E_SIZE_NORMAL
    meta_size = cluster_size                                  # the header
    per_l2 = cluster_size // l2e_size
    nl2e = -(-(aligned_total_size // cluster_size) // per_l2) * per_l2
    meta_size += nl2e * l2e_size                              # L2 tables
    per_l1_cluster = cluster_size // L1E_SIZE
    nl1e = -(-(nl2e * l2e_size // cluster_size) // per_l1_cluster) * per_l1_cluster
    meta_size += nl1e * L1E_SIZE                              # L1 table
    refcount_size, _ = qcow2_refcount_metadata_size((meta_size + aligned_total_size) // cluster_size,
                                                    cluster_size, refcount_order, False)
    return meta_size + refcount_size + aligned_total_size


def validate_cluster_size(cluster_size: int, extended_l2: bool) -> None:
    low = cluster_size & 0xFFFFFFFF                           # ctz32
    cluster_bits = (low & -low).bit_length() - 1 if low else 32
    if cluster_bits < MIN_CLUSTER_BITS or cluster_bits > MAX_CLUSTER_BITS or 1 << cluster_bits != cluster_size:
        raise Error(f"Cluster size must be a power of two between {1 << MIN_CLUSTER_BITS} and "
                    f"{1 << (MAX_CLUSTER_BITS - 10)}k", errno=errno.EINVAL)
    if extended_l2:
        min_cluster_size = (1 << MIN_CLUSTER_BITS) * QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER
        if cluster_size < min_cluster_size:
            raise Error(f"Extended L2 entries are only supported with cluster sizes of at least "
                        f"{min_cluster_size} bytes", errno=errno.EINVAL)


def qcow2_opt_get_version(opts: dict) -> int:
    compat = opts.get("compat")
    if compat is None:
        return 3
    if compat == "0.10":
        return 2
    if compat == "1.1":
        return 3
    raise Error(f"Invalid compatibility level: '{compat}'", errno=errno.EINVAL)


def qcow2_opt_get_refcount_bits(opts: dict, version: int) -> int:
    refcount_bits = int(opts.get("refcount_bits", 16))
    if refcount_bits > 64 or refcount_bits <= 0 or refcount_bits & (refcount_bits - 1):
        raise Error("Refcount width must be a power of two and may not exceed 64 bits", errno=errno.EINVAL)
    if version < 3 and refcount_bits != 16:
        raise Error("Different refcount widths than 16 bits require compatibility level 1.1 or above (use "
                    "compat=1.1 or greater)", errno=errno.EINVAL)
    return refcount_bits


def qcow2_measure(drv, opts: dict, in_bs) -> tuple[int, int, int | None]:
    """(required, fully allocated, bitmaps size or None) for a new image with these creation options.

    ``in_bs`` (optional) is the image to be converted: only its allocated clusters count as
    required, unless a backing file is given.  Raises Error with QEMU's messages.
    """
    extended_l2 = parse_option_bool("extended_l2", opts.get("extended_l2", False))
    cluster_size = int(opts.get("cluster_size", DEFAULT_CLUSTER_SIZE))
    validate_cluster_size(cluster_size, extended_l2)
    version = qcow2_opt_get_version(opts)
    refcount_bits = qcow2_opt_get_refcount_bits(opts, version)
    mode = opts.get("preallocation")
    try:
        prealloc = PreallocMode(mode) if mode is not None else PreallocMode.PREALLOC_MODE_OFF
    except ValueError:
        raise Error(f"invalid parameter value: {mode}", errno=errno.EINVAL) from None
    has_backing_file = opts.get("backing_file") is not None
    if opts.get("encrypt.format") == "luks":
        # QEMU sizes the LUKS header from the encrypt.* options, which need a secret first.
        if "encrypt.key-secret" not in opts:
            raise Error("Parameter 'encrypt.key-secret' is required for cipher", errno=errno.EINVAL)
        raise Error("Unsupported qcow2 feature(s): encryption (qblock has no crypto layer)", errno=errno.ENOTSUP)

    virtual_size = -(-int(opts.get("size", 0)) // cluster_size) * cluster_size
    l2e_size = L2E_SIZE_EXTENDED if extended_l2 else L2E_SIZE_NORMAL
    l2_tables = -(-(virtual_size // cluster_size) // (cluster_size // l2e_size))
    if l2_tables * L1E_SIZE > QCOW_MAX_L1_SIZE:
        raise Error("The image size is too large (try using a larger cluster size)", errno=errno.EINVAL)

    required = 0
    if in_bs is not None:
        ssize = bdrv_getlength(in_bs)
        if ssize < 0:
            raise error_setg_errno(-ssize, "Unable to get image virtual_size")
        virtual_size = -(-ssize // cluster_size) * cluster_size
        if has_backing_file:
            # The new image's backing file may share nothing with the input: count every cluster.
            required = virtual_size
        else:
            offset = 0
            while offset < ssize:
                ret, pnum, _, _ = bdrv_block_status_above(in_bs, None, offset, ssize - offset)
                if ret < 0:
                    raise error_setg_errno(-ret, "Unable to get block status")
                if ret & BDRV_BLOCK_ZERO:
                    pass                # zero regions need no data clusters (there is no backing file)
                elif ret & (BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED) == BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED:
                    # Whole clusters: the next run starts at the following cluster.
                    pnum = -(-(offset + pnum) // cluster_size) * cluster_size - offset
                    required += offset % cluster_size + pnum
                offset += pnum
    if prealloc in (PreallocMode.PREALLOC_MODE_FULL, PreallocMode.PREALLOC_MODE_FALLOC):
        required = virtual_size
    fully_allocated = qcow2_calc_prealloc_size(virtual_size, cluster_size, refcount_bits.bit_length() - 1,
                                               extended_l2)
    # The metadata for a fully allocated image stays counted: an overestimate, as in QEMU.
    required = fully_allocated - virtual_size + required
    # Bitmaps only if the input is a qcow2 v3 image (bdrv_supports_persistent_dirty_bitmap); qblock
    # loads no persistent bitmaps, so their size is 0.
    bitmaps = None
    if version >= 3 and in_bs is not None and in_bs.drv is drv and in_bs.opaque.qcow_version >= 3:
        bitmaps = 0
    return required, fully_allocated, bitmaps


# --------------------------------------------------------------------------
# Zero init and emptying


def qcow2_has_zero_init(bs) -> int:
    """1 if the image reads as zeroes where nothing was written; with preallocated metadata, as the file does."""
    s = bs.opaque
    # Preallocated images have every L2 table, others none: the first L1 entry tells.
    preallocated = s.l1_size > 0 and bool(s.l1_table[0])
    if not preallocated:
        return 1
    child = bs.file.bs
    hook = getattr(child.drv, "bdrv_has_zero_init", None) if child.drv is not None else None
    if hook is not None:
        return int(hook(child))
    # qblock's file driver has no hook: a regular file reads as zeroes where nothing was written
    # (QEMU's bdrv_has_zero_init_1); anything else is not assumed to.
    return int(child.drv is not None and child.drv.format_name == "file")


def make_completely_empty(bs) -> int:
    """Rebuild the image as new: header, refcount table, one refcount block, an empty L1 table.  0 or -errno.

    Only for v3 images (the dirty bit covers the time the refcounts are wrong) without snapshots
    or bitmaps.  Differences from QEMU: a failure half way leaves ``bs.drv`` (QEMU ejects the
    node); the compressed-cluster packing position is forgotten (it points into freed space).
    """
    s = bs.opaque
    ret = qcow2_cache_empty(bs, s.l2_table_cache)
    if ret < 0:
        return ret
    ret = qcow2_cache_empty(bs, s.refcount_block_cache)
    if ret < 0:
        return ret
    # From here the refcounts are wrong until the end.
    ret = qcow2_mark_dirty(bs)
    if ret < 0:
        return ret
    l1_clusters = -(-s.l1_size // (s.cluster_size // L1E_SIZE))
    l1_size2 = s.l1_size * L1E_SIZE
    ret = bdrv_co_pwrite_zeroes(bs.file, s.l1_table_offset, l1_clusters * s.cluster_size, 0)
    if ret < 0:
        return ret
    s.l1_table = [0] * s.l1_size
    # Clusters 1 to 2 + l1_clusters become the refcount table, the first refcount block and the L1
    # table: whatever was there is lost, as everything else is.
    ret = bdrv_co_pwrite_zeroes(bs.file, s.cluster_size, (2 + l1_clusters) * s.cluster_size, 0)
    if ret < 0:
        return ret
    ret = bdrv_co_pwrite_sync(bs.file, HDR_L1_TABLE_OFFSET, 20,
                              struct.pack(">QQI", 3 * s.cluster_size, s.cluster_size, 1))
    if ret < 0:
        return ret
    s.l1_table_offset = 3 * s.cluster_size
    s.refcount_table_offset = s.cluster_size
    s.refcount_table_size = s.cluster_size // REFTABLE_ENTRY_SIZE
    s.refcount_table = [0] * s.refcount_table_size
    s.max_refcount_table_index = 0
    # The first refcount block goes into the table; the header, table, block and L1 table are then
    # allocated through it like any clusters.
    ret = bdrv_co_pwrite_sync(bs.file, s.cluster_size, 8, struct.pack(">Q", 2 * s.cluster_size))
    if ret < 0:
        return ret
    s.refcount_table[0] = 2 * s.cluster_size
    s.free_cluster_index = 0
    s.free_byte_offset = 0
    if 3 + l1_clusters > s.refcount_block_size:
        raise AssertionError("make_completely_empty: the metadata does not fit one refcount block")
    offset = qcow2_alloc_clusters(bs, 3 * s.cluster_size + l1_size2)
    if offset < 0:
        return offset
    if offset > 0:
        raise AssertionError("First cluster in emptied image is in use")
    ret = qcow2_mark_clean(bs)
    if ret < 0:
        return ret
    errp: list = []
    ret = bdrv_co_truncate(bs.file, (3 + l1_clusters) * s.cluster_size, False, PreallocMode.PREALLOC_MODE_OFF, errp)
    if ret < 0:
        if errp:
            error_report(errp[0].msg)
        return ret
    return 0


def qcow2_make_empty(bs) -> int:
    """Make every cluster of the active layer unallocated: 0 or -errno (under s->lock)."""
    s = bs.opaque
    l1_clusters = -(-s.l1_size // (s.cluster_size // L1E_SIZE))
    has_bitmaps = any(e.magic == QCOW2_EXT_MAGIC_BITMAPS for e in s.unknown_header_ext)
    if s.qcow_version >= 3 and not s.snapshots and not has_bitmaps \
            and 3 + l1_clusters <= s.refcount_block_size and s.crypt_method_header != QCOW_CRYPT_LUKS:
        return make_completely_empty(bs)
    # Otherwise discard every cluster, as after committing an external snapshot (QCOW2_DISCARD_SNAPSHOT).
    step = INT_MAX // s.cluster_size * s.cluster_size
    end_offset = bs.total_sectors * BDRV_SECTOR_SIZE
    ret = 0
    for offset in range(0, end_offset, step):
        ret = qcow2_cluster_discard(bs, offset, min(step, end_offset - offset), QCOW2_DISCARD_SNAPSHOT, True)
        if ret < 0:
            break
    return ret
