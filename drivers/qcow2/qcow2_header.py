"""The image header and opening: the header half of QEMU's block/qcow2.c.

* ``qcow2_do_open``: header versions 2 and 3 with QEMU's checks and
  messages, header extensions (backing format; feature name table; unknown
  ones — persistent bitmaps included — kept byte for byte), unknown
  incompatible features refused ("Unsupported qcow2 feature(s): ..."),
  corrupt images refused read/write, autoclear bits cleared on a writable
  open, dirty images (lazy refcounts) repaired, runtime options;
* ``qcow2_update_header``: rewrites cluster 0 as QEMU lays it out (header,
  unknown header fields, backing format, feature table for clusters above
  4 KiB, unknown extensions, end marker, backing file name);
* ``qcow2_mark_dirty``/``qcow2_mark_clean``/``qcow2_mark_corrupt`` and
  ``qcow2_signal_corruption``.

Differences from QEMU: encrypted images are refused (qblock has no crypto);
external data files, extended L2 entries and zstd are refused as unknown
features; a fatal corruption keeps ``bs.drv`` (QEMU sets it to NULL, so
every later request fails with -ENOMEDIUM): qblock refuses writes with -EIO
and keeps serving reads, and writes nothing more to the image.
"""
from __future__ import annotations

import errno
import struct
import sys
from typing import Any

import attrs

from qblock.block.driver import BDRV_O_CHECK, BDRV_O_RDWR, BDRV_O_UNMAP, BDRV_SECTOR_SIZE
from qblock.block.graph import bdrv_get_node_name, bdrv_is_writable
from qblock.trace.events import trace_qcow2_signal_corruption
from qblock.util.error import Error, error_setg_errno
from qblock.util.qapi_event import qapi_event_send
from qblock.util.qemu_option import (
    QEMU_OPT_BOOL,
    QEMU_OPT_NUMBER,
    QEMU_OPT_SIZE,
    QEMU_OPT_STRING,
    QemuOptDesc,
    QemuOptsList,
    qemu_opts_absorb_qdict,
)

from qblock.block.io import bdrv_co_pread, bdrv_co_pwrite, bdrv_co_pwrite_sync

from .qcow2_cache import qcow2_cache_create, qcow2_cache_destroy, qcow2_cache_flush
from .qcow2_h import (
    DEFAULT_L2_CACHE_MAX_SIZE,
    HDR_INCOMPAT_OFFSET,
    INT64_MAX,
    INT_MAX,
    L1E_SIZE,
    MAX_CLUSTER_BITS,
    MIN_CLUSTER_BITS,
    MIN_L2_CACHE_SIZE,
    MIN_REFCOUNT_CACHE_SIZE,
    QCOW2_AUTOCLEAR_MASK,
    QCOW2_COMPAT_LAZY_REFCOUNTS_BITNR,
    QCOW2_COMPRESSION_TYPE_ZLIB,
    QCOW2_DISCARD_ALWAYS,
    QCOW2_DISCARD_OTHER,
    QCOW2_DISCARD_REQUEST,
    QCOW2_DISCARD_SNAPSHOT,
    QCOW2_EXT_MAGIC_BACKING_FORMAT,
    QCOW2_EXT_MAGIC_END,
    QCOW2_EXT_MAGIC_FEATURE_TABLE,
    QCOW2_FEAT_TYPE_AUTOCLEAR,
    QCOW2_FEAT_TYPE_COMPATIBLE,
    QCOW2_FEAT_TYPE_INCOMPATIBLE,
    QCOW2_FEATURE,
    QCOW2_INCOMPAT_COMPRESSION,
    QCOW2_INCOMPAT_CORRUPT,
    QCOW2_INCOMPAT_DIRTY,
    QCOW2_INCOMPAT_MASK,
    QCOW2_OL_ALL,
    QCOW2_OL_CACHED,
    QCOW2_OL_CONSTANT,
    QCOW2_OL_MAX_BITNR,
    QCOW2_OPT_CACHE_CLEAN_INTERVAL,
    QCOW2_OPT_CACHE_SIZE,
    QCOW2_OPT_DISCARD_OTHER,
    QCOW2_OPT_DISCARD_REQUEST,
    QCOW2_OPT_DISCARD_SNAPSHOT,
    QCOW2_OPT_L2_CACHE_ENTRY_SIZE,
    QCOW2_OPT_L2_CACHE_SIZE,
    QCOW2_OPT_LAZY_REFCOUNTS,
    QCOW2_OPT_OVERLAP,
    QCOW2_OPT_OVERLAP_NAMES,
    QCOW2_OPT_OVERLAP_TEMPLATE,
    QCOW2_OPT_REFCOUNT_CACHE_SIZE,
    QCOW_CRYPT_AES,
    QCOW_CRYPT_NONE,
    QCOW_EXT,
    QCOW_HEADER,
    QCOW_HEADER_V2_SIZE,
    QCOW_HEADER_V3_MIN,
    QCOW_MAGIC,
    QCOW_MAX_L1_SIZE,
    QCOW_MAX_REFTABLE_SIZE,
    QCOW_MAX_SNAPSHOTS,
    Qcow2UnknownHeaderExtension,
    offset_into_cluster,
    size_to_l1,
)

qcow2_runtime_opts = QemuOptsList("qcow2", [
    QemuOptDesc(QCOW2_OPT_LAZY_REFCOUNTS, QEMU_OPT_BOOL, "Postpone refcount updates"),
    QemuOptDesc(QCOW2_OPT_DISCARD_REQUEST, QEMU_OPT_BOOL, "Pass guest discard requests to the layer below"),
    QemuOptDesc(QCOW2_OPT_DISCARD_SNAPSHOT, QEMU_OPT_BOOL,
                "Generate discard requests when snapshot related space is freed"),
    QemuOptDesc(QCOW2_OPT_DISCARD_OTHER, QEMU_OPT_BOOL, "Generate discard requests when other clusters are freed"),
    QemuOptDesc(QCOW2_OPT_OVERLAP, QEMU_OPT_STRING,
                "Selects which overlap checks to perform from a range of templates (none, constant, cached, all)"),
    QemuOptDesc(QCOW2_OPT_OVERLAP_TEMPLATE, QEMU_OPT_STRING,
                "Selects which overlap checks to perform from a range of templates (none, constant, cached, all)"),
    *[QemuOptDesc(n, QEMU_OPT_BOOL, f"Check for unintended writes into {n.split('.')[1]}")
      for n in QCOW2_OPT_OVERLAP_NAMES],
    QemuOptDesc(QCOW2_OPT_CACHE_SIZE, QEMU_OPT_SIZE,
                "Maximum combined metadata (L2 tables and refcount blocks) cache size"),
    QemuOptDesc(QCOW2_OPT_L2_CACHE_SIZE, QEMU_OPT_SIZE, "Maximum L2 table cache size"),
    QemuOptDesc(QCOW2_OPT_L2_CACHE_ENTRY_SIZE, QEMU_OPT_SIZE, "Size of each entry in the L2 cache"),
    QemuOptDesc(QCOW2_OPT_REFCOUNT_CACHE_SIZE, QEMU_OPT_SIZE, "Maximum refcount block cache size"),
    QemuOptDesc(QCOW2_OPT_CACHE_CLEAN_INTERVAL, QEMU_OPT_NUMBER,
                "Clean unused cache entries after this time (in seconds)"),
    QemuOptDesc("encrypt.key-secret", QEMU_OPT_STRING, "ID of secret providing qcow2 AES key or LUKS passphrase"),
    QemuOptDesc("encrypt.format", QEMU_OPT_STRING, "Encryption data format"),
])

# QEMU's feature name table, written into every v3 image with clusters above 4 KiB.
QCOW2_FEATURES = (
    (QCOW2_FEAT_TYPE_INCOMPATIBLE, 0, "dirty bit"),
    (QCOW2_FEAT_TYPE_INCOMPATIBLE, 1, "corrupt bit"),
    (QCOW2_FEAT_TYPE_INCOMPATIBLE, 2, "external data file"),
    (QCOW2_FEAT_TYPE_INCOMPATIBLE, 3, "compression type"),
    (QCOW2_FEAT_TYPE_INCOMPATIBLE, 4, "extended L2 entries"),
    (QCOW2_FEAT_TYPE_COMPATIBLE, QCOW2_COMPAT_LAZY_REFCOUNTS_BITNR, "lazy refcounts"),
    (QCOW2_FEAT_TYPE_AUTOCLEAR, 0, "bitmaps"),
    (QCOW2_FEAT_TYPE_AUTOCLEAR, 1, "raw external data"),
)


# --------------------------------------------------------------------------
# Extensions and features


def qcow2_read_extensions(bs, start_offset: int, end_offset: int, want_feature_table: bool) -> bytes | None:
    """Read the header extensions; the raw feature name table if asked for.  Raises Error."""
    s = bs.opaque
    feature_table = None
    s.unknown_header_ext = []
    offset = start_offset
    while offset < end_offset:
        ext = bytearray(QCOW_EXT.size)
        ret = bdrv_co_pread(bs.file, offset, len(ext), ext)
        if ret < 0:
            raise error_setg_errno(-ret, f"qcow2_read_extension: ERROR: pread fail from offset {offset}")
        magic, length = QCOW_EXT.unpack(ext)
        offset += QCOW_EXT.size
        if offset > end_offset or length > end_offset - offset:
            raise Error("Header extension too large", errno=errno.EINVAL)
        if magic == QCOW2_EXT_MAGIC_END:
            break
        data = bytearray(length)
        ret = bdrv_co_pread(bs.file, offset, length, data)
        if ret < 0:
            raise error_setg_errno(-ret, "ERROR: Could not read header extension")
        if magic == QCOW2_EXT_MAGIC_BACKING_FORMAT:
            if length >= 16:
                raise Error(f"ERROR: ext_backing_format: len={length} too large (>=16)", errno=errno.EINVAL)
            s.image_backing_format = bytes(data).decode("utf-8", "replace")
            bs.backing_format = s.image_backing_format
        elif magic == QCOW2_EXT_MAGIC_FEATURE_TABLE:
            if want_feature_table:
                feature_table = bytes(data)
        else:
            # Unknown to qblock (persistent bitmaps, crypto header, data file ...): kept as it is.
            s.unknown_header_ext.append(Qcow2UnknownHeaderExtension(magic, bytes(data)))
        offset += (length + 7) & ~7
    return feature_table


def report_unsupported_feature(table: bytes | None, mask: int) -> Error:
    names = []
    if table:
        for pos in range(0, len(table) - QCOW2_FEATURE.size + 1, QCOW2_FEATURE.size):
            ftype, bit, name = QCOW2_FEATURE.unpack_from(table, pos)
            if not name.rstrip(b"\0"):
                break
            if ftype == QCOW2_FEAT_TYPE_INCOMPATIBLE and bit < 64 and mask & (1 << bit):
                names.append(name.split(b"\0", 1)[0].decode("utf-8", "replace"))
                mask &= ~(1 << bit)
    if mask:
        names.append(f"Unknown incompatible feature: {mask:x}")
    return Error(f"Unsupported qcow2 feature(s): {', '.join(names)}", errno=errno.ENOTSUP)


def validate_compression_type(s) -> None:
    if s.compression_type != QCOW2_COMPRESSION_TYPE_ZLIB:
        raise Error(f"qcow2: unknown compression type: {s.compression_type}", errno=errno.ENOTSUP)
    if s.incompatible_features & QCOW2_INCOMPAT_COMPRESSION:
        raise Error("qcow2: Compression type incompatible feature bit must not be set", errno=errno.EINVAL)


def qcow2_validate_table(s, offset: int, entries: int, entry_len: int, max_size_bytes: int, table_name: str) -> None:
    if entries > max_size_bytes // entry_len:
        raise Error(f"{table_name} too large", errno=errno.EFBIG)
    if INT64_MAX - entries * entry_len < offset or offset_into_cluster(s, offset):
        raise Error(f"{table_name} offset invalid", errno=errno.EINVAL)


# --------------------------------------------------------------------------
# Options (qcow2_update_options_prepare/commit)


def read_cache_sizes(bs, opts) -> tuple[int, int, int]:
    """(l2_cache_size, l2_cache_entry_size, refcount_cache_size) in bytes, as QEMU 3.1+ computes them."""
    s = bs.opaque
    min_refcount_cache = MIN_REFCOUNT_CACHE_SIZE * s.cluster_size
    max_l2_entries = -(-(bs.total_sectors * BDRV_SECTOR_SIZE) // s.cluster_size)
    max_l2_cache = -(-(max_l2_entries * 8) // s.cluster_size) * s.cluster_size
    combined_set = QCOW2_OPT_CACHE_SIZE in opts
    l2_set = QCOW2_OPT_L2_CACHE_SIZE in opts
    refcount_set = QCOW2_OPT_REFCOUNT_CACHE_SIZE in opts
    combined = opts.get(QCOW2_OPT_CACHE_SIZE, 0)
    l2_max_setting = opts.get(QCOW2_OPT_L2_CACHE_SIZE, DEFAULT_L2_CACHE_MAX_SIZE)
    refcount_cache_size = opts.get(QCOW2_OPT_REFCOUNT_CACHE_SIZE, 0)
    l2_cache_entry_size = opts.get(QCOW2_OPT_L2_CACHE_ENTRY_SIZE, s.cluster_size)
    l2_cache_size = min(max_l2_cache, l2_max_setting)
    if combined_set:
        if l2_set and refcount_set:
            raise Error("cache-size, l2-cache-size and refcount-cache-size may not be set at the same time")
        if l2_set and l2_max_setting > combined:
            raise Error("l2-cache-size may not exceed cache-size")
        if refcount_cache_size > combined:
            raise Error("refcount-cache-size may not exceed cache-size")
        if l2_set:
            refcount_cache_size = combined - l2_cache_size
        elif refcount_set:
            l2_cache_size = combined - refcount_cache_size
        elif combined >= max_l2_cache + min_refcount_cache:
            l2_cache_size = max_l2_cache
            refcount_cache_size = combined - l2_cache_size
        else:
            refcount_cache_size = min(combined, min_refcount_cache)
            l2_cache_size = combined - refcount_cache_size
    if (l2_cache_entry_size < (1 << MIN_CLUSTER_BITS) or l2_cache_entry_size > s.cluster_size
            or l2_cache_entry_size & (l2_cache_entry_size - 1)):
        raise Error(f"L2 cache entry size must be a power of two between {1 << MIN_CLUSTER_BITS} and the "
                    f"cluster size ({s.cluster_size})")
    return l2_cache_size, l2_cache_entry_size, refcount_cache_size


@attrs.define
class Qcow2ReopenState:
    """Options parsed and checked, waiting for commit (QEMU's Qcow2ReopenState)."""

    l2_table_cache: Any = None
    refcount_block_cache: Any = None
    overlap_check: int = 0
    use_lazy_refcounts: bool = False
    discard_passthrough: list = attrs.field(factory=list)


def qcow2_update_options_prepare(bs, options: dict, flags: int) -> Qcow2ReopenState:
    """Parse and check the runtime options (caches, lazy refcounts, overlap checks, discard passing),
    and create the new caches; nothing of the node changes yet.  Raises Error."""
    s = bs.opaque
    opts = qemu_opts_absorb_qdict(qcow2_runtime_opts, options)
    l2_cache_size, _entry_size, refcount_cache_size = read_cache_sizes(bs, opts)
    # qblock caches whole L2 tables: l2-cache-entry-size is checked but every entry is a cluster.
    l2_entries = max(l2_cache_size // s.cluster_size, MIN_L2_CACHE_SIZE)
    refcount_entries = max(refcount_cache_size // s.cluster_size, MIN_REFCOUNT_CACHE_SIZE)
    if l2_entries > INT_MAX:
        raise Error("L2 cache size too big")
    if refcount_entries > INT_MAX:
        raise Error("Refcount cache size too big")
    interval = opts.get(QCOW2_OPT_CACHE_CLEAN_INTERVAL, 600)
    if interval > 0xFFFFFFFF:
        raise Error("Cache clean interval too big")
    use_lazy = opts.get(QCOW2_OPT_LAZY_REFCOUNTS, bool(s.compatible_features & 1))
    if use_lazy and s.qcow_version < 3:
        raise Error("Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level")
    overlap = opts.get(QCOW2_OPT_OVERLAP)
    template = opts.get(QCOW2_OPT_OVERLAP_TEMPLATE)
    if overlap and template and overlap != template:
        raise Error(f"Conflicting values for qcow2 options 'overlap-check' ('{overlap}') and "
                    f"'overlap-check.template' ('{template}')")
    overlap = overlap or template or "cached"
    templates = {"none": 0, "constant": QCOW2_OL_CONSTANT, "cached": QCOW2_OL_CACHED, "all": QCOW2_OL_ALL}
    if overlap not in templates:
        raise Error(f"Unsupported value '{overlap}' for qcow2 option 'overlap-check'. Allowed are any of the "
                    "following: none, constant, cached, all")
    overlap_check = 0
    for bitnr in range(QCOW2_OL_MAX_BITNR):
        if opts.get(QCOW2_OPT_OVERLAP_NAMES[bitnr], bool(templates[overlap] & (1 << bitnr))):
            overlap_check |= 1 << bitnr
    encrypt_format = opts.get("encrypt.format")
    if s.crypt_method_header == QCOW_CRYPT_NONE and encrypt_format:
        raise Error(f"No encryption in image header, but options specified format '{encrypt_format}'")

    r = Qcow2ReopenState(overlap_check=overlap_check, use_lazy_refcounts=use_lazy)
    r.discard_passthrough = [False] * 5
    r.discard_passthrough[QCOW2_DISCARD_ALWAYS] = True
    r.discard_passthrough[QCOW2_DISCARD_REQUEST] = opts.get(QCOW2_OPT_DISCARD_REQUEST, bool(flags & BDRV_O_UNMAP))
    r.discard_passthrough[QCOW2_DISCARD_SNAPSHOT] = opts.get(QCOW2_OPT_DISCARD_SNAPSHOT, True)
    r.discard_passthrough[QCOW2_DISCARD_OTHER] = opts.get(QCOW2_OPT_DISCARD_OTHER, False)
    # Reopen: the old caches are written back before new ones replace them, and refcounts are
    # settled before lazy refcounts are switched off.
    if s.l2_table_cache is not None:
        ret = qcow2_cache_flush(bs, s.l2_table_cache)
        if ret:
            raise error_setg_errno(-ret, "Failed to flush the L2 table cache")
    if s.refcount_block_cache is not None:
        ret = qcow2_cache_flush(bs, s.refcount_block_cache)
        if ret:
            raise error_setg_errno(-ret, "Failed to flush the refcount block cache")
    if s.use_lazy_refcounts and not use_lazy:
        ret = qcow2_mark_clean(bs)
        if ret < 0:
            raise error_setg_errno(-ret, "Failed to disable lazy refcounts")
    r.l2_table_cache = qcow2_cache_create(bs, l2_entries, s.cluster_size, "l2_table_cache")
    r.refcount_block_cache = qcow2_cache_create(bs, refcount_entries, s.cluster_size, "refcount_block_cache")
    return r


def qcow2_update_options_commit(bs, r: Qcow2ReopenState) -> None:
    """Make the prepared options the node's (the old caches, already written back, go)."""
    s = bs.opaque
    if s.l2_table_cache is not None:
        qcow2_cache_destroy(s.l2_table_cache)
    if s.refcount_block_cache is not None:
        qcow2_cache_destroy(s.refcount_block_cache)
    s.l2_table_cache, s.refcount_block_cache = r.l2_table_cache, r.refcount_block_cache
    s.overlap_check = r.overlap_check
    s.use_lazy_refcounts = r.use_lazy_refcounts
    s.discard_passthrough = r.discard_passthrough


def qcow2_update_options_abort(bs, r: Qcow2ReopenState) -> None:
    for c in (r.l2_table_cache, r.refcount_block_cache):
        if c is not None:
            qcow2_cache_destroy(c)


def qcow2_update_options(bs, options: dict, flags: int) -> None:
    """Parse the runtime options and apply them (open: prepare, then commit)."""
    qcow2_update_options_commit(bs, qcow2_update_options_prepare(bs, options, flags))


# --------------------------------------------------------------------------
# Open


def qcow2_do_open(bs, options: dict, flags: int) -> None:
    """Read and check the header and set up the node (QEMU's qcow2_do_open, with s->lock held).  Raises Error."""
    from qblock.block.check import BDRV_FIX_ERRORS, BDRV_FIX_LEAKS, BdrvCheckResult

    from .qcow2_check import qcow2_co_check_locked
    from .qcow2_refcount import qcow2_refcount_init
    from .qcow2_snapshot import qcow2_read_snapshots
    s = bs.opaque
    raw = bytearray(QCOW_HEADER.size)
    ret = bdrv_co_pread(bs.file, 0, len(raw), raw)
    if ret < 0:
        raise error_setg_errno(-ret, "Could not read qcow2 header")
    (magic, version, backing_file_offset, backing_file_size, cluster_bits, size, crypt_method, l1_size,
     l1_table_offset, refcount_table_offset, refcount_table_clusters, nb_snapshots, snapshots_offset,
     incompatible, compatible, autoclear, refcount_order, header_length, compression_type) = QCOW_HEADER.unpack(raw)
    if magic != QCOW_MAGIC:
        raise Error("Image is not in qcow2 format", errno=errno.EINVAL)
    if version < 2 or version > 3:
        raise Error(f"Unsupported qcow2 version {version}", errno=errno.ENOTSUP)
    s.qcow_version = version
    if cluster_bits < MIN_CLUSTER_BITS or cluster_bits > MAX_CLUSTER_BITS:
        raise Error(f"Unsupported cluster size: 2^{cluster_bits}", errno=errno.EINVAL)
    s.cluster_bits = cluster_bits
    s.cluster_size = 1 << cluster_bits
    if version == 2:
        incompatible = compatible = autoclear = 0
        refcount_order, header_length = 4, QCOW_HEADER_V2_SIZE
    elif header_length < QCOW_HEADER_V3_MIN:
        raise Error("qcow2 header too short", errno=errno.EINVAL)
    if header_length > s.cluster_size:
        raise Error("qcow2 header exceeds cluster size", errno=errno.EINVAL)
    s.unknown_header_fields = b""
    if header_length > QCOW_HEADER.size:
        extra = bytearray(header_length - QCOW_HEADER.size)
        ret = bdrv_co_pread(bs.file, QCOW_HEADER.size, len(extra), extra)
        if ret < 0:
            raise error_setg_errno(-ret, "Could not read unknown qcow2 header fields")
        s.unknown_header_fields = bytes(extra)
    if backing_file_offset > s.cluster_size:
        raise Error("Invalid backing file offset", errno=errno.EINVAL)
    ext_end = backing_file_offset if backing_file_offset else s.cluster_size

    s.incompatible_features, s.compatible_features, s.autoclear_features = incompatible, compatible, autoclear
    s.compression_type = compression_type if header_length > 104 else QCOW2_COMPRESSION_TYPE_ZLIB
    validate_compression_type(s)
    if s.incompatible_features & ~QCOW2_INCOMPAT_MASK:
        try:
            table = qcow2_read_extensions(bs, header_length, ext_end, True)
        except Error:
            table = None
        raise report_unsupported_feature(table, s.incompatible_features & ~QCOW2_INCOMPAT_MASK)
    if s.incompatible_features & QCOW2_INCOMPAT_CORRUPT and flags & BDRV_O_RDWR and not flags & BDRV_O_CHECK:
        raise Error("qcow2: Image is corrupt; cannot be opened read/write", errno=errno.EACCES)
    if refcount_order > 6:
        raise Error("Reference count entry width too large; may not exceed 64 bits", errno=errno.EINVAL)
    s.refcount_order = refcount_order
    s.refcount_bits = 1 << refcount_order
    s.refcount_max = (1 << s.refcount_bits) - 1
    s.crypt_method_header = crypt_method
    if crypt_method == QCOW_CRYPT_AES:
        raise Error("Use of AES-CBC encrypted qcow2 images is no longer supported in system emulators",
                    errno=errno.ENOSYS,
                    hint="You can use 'qemu-img convert' to convert your image to an alternative supported "
                         "format, such as unencrypted qcow2, or raw with the LUKS format instead.\n")
    if crypt_method != QCOW_CRYPT_NONE:
        # qblock has no crypto layer, so LUKS (2) is as unsupported as any unknown method.
        raise Error(f"Unsupported encryption method {crypt_method}", errno=errno.EINVAL)

    s.l2_bits = s.cluster_bits - 3
    s.l2_size = 1 << s.l2_bits
    s.refcount_block_bits = s.cluster_bits - (s.refcount_order - 3)
    s.refcount_block_size = 1 << s.refcount_block_bits
    bs.total_sectors = size // BDRV_SECTOR_SIZE
    s.csize_shift = 62 - (s.cluster_bits - 8)
    s.csize_mask = (1 << (s.cluster_bits - 8)) - 1
    s.cluster_offset_mask = (1 << s.csize_shift) - 1
    s.refcount_table_offset = refcount_table_offset
    s.refcount_table_size = refcount_table_clusters << (s.cluster_bits - 3)
    if refcount_table_clusters == 0 and not flags & BDRV_O_CHECK:
        raise Error("Image does not contain a reference count table", errno=errno.EINVAL)
    qcow2_validate_table(s, s.refcount_table_offset, refcount_table_clusters, s.cluster_size,
                         QCOW_MAX_REFTABLE_SIZE, "Reference count table")
    if not flags & BDRV_O_CHECK:
        qcow2_validate_table(s, snapshots_offset, nb_snapshots, 40, 40 * QCOW_MAX_SNAPSHOTS, "Snapshot table")
    qcow2_validate_table(s, l1_table_offset, l1_size, L1E_SIZE, QCOW_MAX_L1_SIZE, "Active L1 table")
    s.l1_size = l1_size
    s.l1_table_offset = l1_table_offset
    l1_vm_state_index = size_to_l1(s, size)
    if l1_vm_state_index > INT_MAX:
        raise Error("Image is too big", errno=errno.EFBIG)
    s.l1_vm_state_index = l1_vm_state_index
    if s.l1_size < s.l1_vm_state_index:
        raise Error("L1 table is too small", errno=errno.EINVAL)
    s.l1_table = []
    if s.l1_size > 0:
        buf = bytearray(s.l1_size * L1E_SIZE)
        ret = bdrv_co_pread(bs.file, s.l1_table_offset, len(buf), buf)
        if ret < 0:
            raise error_setg_errno(-ret, "Could not read L1 table")
        s.l1_table = list(struct.unpack(f">{s.l1_size}Q", buf))

    qcow2_update_options(bs, options, flags)
    s.flags = flags
    ret = qcow2_refcount_init(bs)
    if ret < 0:
        raise error_setg_errno(-ret, "Could not initialize refcount handling")
    s.cluster_allocs = []
    s.discards = []
    qcow2_read_extensions(bs, header_length, ext_end, False)

    if backing_file_offset:
        length = backing_file_size
        if length > min(1023, s.cluster_size - backing_file_offset):
            raise Error("Backing file name too long", errno=errno.EINVAL)
        name = bytearray(length)
        ret = bdrv_co_pread(bs.file, backing_file_offset, length, name)
        if ret < 0:
            raise error_setg_errno(-ret, "Could not read backing file name")
        s.image_backing_file = bytes(name).decode("utf-8", "replace")
        bs.backing_file = s.image_backing_file

    if not flags & BDRV_O_CHECK:
        s.snapshots_offset = snapshots_offset
        s.nb_snapshots = nb_snapshots
        qcow2_read_snapshots(bs)
    else:
        s.snapshots_offset, s.nb_snapshots = snapshots_offset, nb_snapshots

    # Autoclear bits qblock does not know are cleared on a writable open, as the spec asks.
    if s.autoclear_features & ~QCOW2_AUTOCLEAR_MASK and bdrv_is_writable(bs):
        s.autoclear_features &= QCOW2_AUTOCLEAR_MASK
        ret = qcow2_update_header(bs)
        if ret < 0:
            raise error_setg_errno(-ret, "Could not update qcow2 header")

    # Repair an image left dirty by a crash with lazy refcounts.
    if not flags & BDRV_O_CHECK and bdrv_is_writable(bs) and s.incompatible_features & QCOW2_INCOMPAT_DIRTY:
        result = BdrvCheckResult()
        ret = qcow2_co_check_locked(bs, result, BDRV_FIX_ERRORS | BDRV_FIX_LEAKS)
        if ret < 0 or result.check_errors:
            raise error_setg_errno(-ret if ret < 0 else errno.EIO, "Could not repair dirty image")


# --------------------------------------------------------------------------
# Writing the header


def header_ext_add(buf: bytearray, magic: int, data: bytes) -> None:
    buf += QCOW_EXT.pack(magic, len(data)) + data + bytes(-len(data) % 8)


def qcow2_update_header(bs) -> int:
    """Rewrite the first cluster: header, extensions and backing file name.  0 or -errno (-ENOSPC if too big)."""
    s = bs.opaque
    header_length = QCOW_HEADER.size + len(s.unknown_header_fields)
    total_size = bs.total_sectors * BDRV_SECTOR_SIZE
    refcount_table_clusters = s.refcount_table_size >> (s.cluster_bits - 3)
    fields = [QCOW_MAGIC, s.qcow_version, 0, 0, s.cluster_bits, total_size, s.crypt_method_header, s.l1_size,
              s.l1_table_offset, s.refcount_table_offset, refcount_table_clusters, s.nb_snapshots,
              s.snapshots_offset, s.incompatible_features, s.compatible_features, s.autoclear_features,
              s.refcount_order, header_length, s.compression_type]
    buf = bytearray(QCOW_HEADER_V2_SIZE if s.qcow_version == 2 else QCOW_HEADER.size)
    buf += s.unknown_header_fields
    if s.image_backing_format:
        header_ext_add(buf, QCOW2_EXT_MAGIC_BACKING_FORMAT, s.image_backing_format.encode())
    if s.qcow_version >= 3 and s.cluster_size > 4096:
        table = b"".join(QCOW2_FEATURE.pack(t, b, n.encode()) for t, b, n in QCOW2_FEATURES)
        header_ext_add(buf, QCOW2_EXT_MAGIC_FEATURE_TABLE, table)
    for uext in s.unknown_header_ext:
        header_ext_add(buf, uext.magic, uext.data)
    header_ext_add(buf, QCOW2_EXT_MAGIC_END, b"")
    if s.image_backing_file:
        name = s.image_backing_file.encode()
        fields[2], fields[3] = len(buf), len(name)
        buf += name
    if len(buf) > s.cluster_size:
        return -errno.ENOSPC
    hlen = QCOW_HEADER_V2_SIZE if s.qcow_version == 2 else QCOW_HEADER.size
    buf[:hlen] = QCOW_HEADER.pack(*fields)[:hlen]     # v2 images get the shorter header
    buf += bytes(s.cluster_size - len(buf))
    return bdrv_co_pwrite(bs.file, 0, s.cluster_size, buf)


def qcow2_change_backing_file(bs, backing_file: str | None, backing_fmt: str | None) -> int:
    s = bs.opaque
    if backing_file and len(backing_file.encode()) > 1023:
        return -errno.EINVAL
    bs.backing_file = backing_file or ""
    bs.backing_format = backing_fmt or ""
    s.image_backing_file = backing_file or None
    s.image_backing_format = backing_fmt or None
    return qcow2_update_header(bs)


def qcow2_mark_dirty(bs) -> int:
    """Set the dirty bit on disk before refcounts may lag behind (lazy refcounts)."""
    s = bs.opaque
    if s.qcow_version < 3:
        raise AssertionError("qcow2_mark_dirty on a v2 image")
    if s.incompatible_features & QCOW2_INCOMPAT_DIRTY:
        return 0
    ret = bdrv_co_pwrite_sync(bs.file, HDR_INCOMPAT_OFFSET, 8,
                              struct.pack(">Q", s.incompatible_features | QCOW2_INCOMPAT_DIRTY))
    if ret < 0:
        return ret
    s.incompatible_features |= QCOW2_INCOMPAT_DIRTY
    return 0


def qcow2_mark_clean(bs) -> int:
    """Write every cache back, then clear the dirty bit."""
    from .qcow2_cache import qcow2_flush_caches
    s = bs.opaque
    if s.incompatible_features & QCOW2_INCOMPAT_DIRTY:
        s.incompatible_features &= ~QCOW2_INCOMPAT_DIRTY
        ret = qcow2_flush_caches(bs)
        if ret < 0:
            return ret
        return qcow2_update_header(bs)
    return 0


def qcow2_mark_corrupt(bs) -> int:
    s = bs.opaque
    s.incompatible_features |= QCOW2_INCOMPAT_CORRUPT
    return qcow2_update_header(bs)


def qcow2_mark_consistent(bs) -> int:
    """Clear the corrupt bit (after a repair), writing the caches back first."""
    from .qcow2_cache import qcow2_flush_caches
    s = bs.opaque
    if s.incompatible_features & QCOW2_INCOMPAT_CORRUPT:
        ret = qcow2_flush_caches(bs)
        if ret < 0:
            return ret
        s.incompatible_features &= ~QCOW2_INCOMPAT_CORRUPT
        s.signaled_corruption = False
        return qcow2_update_header(bs)
    return 0


def qcow2_is_broken(bs) -> bool:
    """A fatal corruption was signalled on this writable node: it takes no more writes (QEMU: bs->drv = NULL)."""
    s = bs.opaque
    return s.signaled_corruption and bool(s.incompatible_features & QCOW2_INCOMPAT_CORRUPT) and bdrv_is_writable(bs)


def qcow2_signal_corruption(bs, fatal: bool, offset: int, size: int, msg: str) -> None:
    """Report corruption found at run time; a fatal one on a writable node sets the corrupt bit."""
    s = bs.opaque
    fatal = fatal and bdrv_is_writable(bs)
    if s.signaled_corruption and (not fatal or s.incompatible_features & QCOW2_INCOMPAT_CORRUPT):
        return
    if trace_qcow2_signal_corruption.event.enabled:
        trace_qcow2_signal_corruption(bs, int(fatal), msg)
    if fatal:
        sys.stderr.write(f"qcow2: Marking image as corrupt: {msg}; further corruption events will be suppressed\n")
    else:
        sys.stderr.write(f"qcow2: Image is corrupt: {msg}; further non-fatal corruption events will be "
                         "suppressed\n")
    data = {"device": "", "msg": msg, "fatal": fatal}
    if bdrv_get_node_name(bs):
        data["node-name"] = bdrv_get_node_name(bs)
    if offset >= 0:
        data["offset"] = offset
    if size >= 0:
        data["size"] = size
    qapi_event_send("BLOCK_IMAGE_CORRUPTED", data)
    if fatal:
        qcow2_mark_corrupt(bs)
    s.signaled_corruption = True
