"""Definitions shared by the qcow2 modules: QEMU's block/qcow2.h.

The on-disk constants and masks of docs/interop/qcow2.txt, the per-node
state ``BDRVQcow2State`` (what the core stores in ``bs.opaque``), the
in-flight allocation record ``QCowL2Meta`` and the small inline helpers of
qcow2.h (``offset_into_cluster``, ``size_to_clusters``,
``qcow2_get_cluster_type`` ...), with QEMU's names.

Left out: subclusters (extended L2 entries), encryption state, external
data files, persistent bitmaps (their header extension is kept as an unknown
extension, byte for byte), the cache-clean timer.  L2 tables are cached
whole (QEMU 3.1+ caches slices of ``l2-cache-entry-size``).
"""
from __future__ import annotations

import enum
import struct
from typing import Any

import attrs

from qblock.util.coroutine_lock import CoMutex, CoQueue
from qblock.util.iov import QEMUIOVector

QCOW_MAGIC = 0x514649FB          # "QFI\xfb"

QCOW_CRYPT_NONE = 0
QCOW_CRYPT_AES = 1
QCOW_CRYPT_LUKS = 2

QCOW_MAX_CRYPT_CLUSTERS = 32
QCOW_MAX_SNAPSHOTS = 65536
QCOW_MAX_REFTABLE_SIZE = 8 << 20          # bytes
QCOW_MAX_L1_SIZE = 32 << 20               # bytes
QCOW_MAX_SNAPSHOT_EXTRA_DATA = 1024
QCOW_MAX_CLUSTER_OFFSET = (1 << 56) - 1

QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1 << 0

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
DEFAULT_CLUSTER_SIZE = 65536

MIN_L2_CACHE_SIZE = 2             # cache entries
MIN_REFCOUNT_CACHE_SIZE = 4       # clusters
DEFAULT_L2_CACHE_MAX_SIZE = 32 << 20   # bytes (QEMU 3.1+, Linux)
DEFAULT_CACHE_CLEAN_INTERVAL = 600

L1E_SIZE = 8
L2E_SIZE_NORMAL = 8
REFTABLE_ENTRY_SIZE = 8
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_COMPRESSED_OFFSET_SIZE_MASK = 0x3FFFFFFFFFFFFFFF
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
REFT_RESERVED_MASK = 0x1FF
INT64_MAX = (1 << 63) - 1
INT_MAX = (1 << 31) - 1

# Header extensions
QCOW2_EXT_MAGIC_END = 0
QCOW2_EXT_MAGIC_BACKING_FORMAT = 0xE2792ACA
QCOW2_EXT_MAGIC_FEATURE_TABLE = 0x6803F857
QCOW2_EXT_MAGIC_CRYPTO_HEADER = 0x0537BE77
QCOW2_EXT_MAGIC_BITMAPS = 0x23852875
QCOW2_EXT_MAGIC_DATA_FILE = 0x44415441

# Feature bits
QCOW2_INCOMPAT_DIRTY_BITNR = 0
QCOW2_INCOMPAT_CORRUPT_BITNR = 1
QCOW2_INCOMPAT_DATA_FILE_BITNR = 2
QCOW2_INCOMPAT_COMPRESSION_BITNR = 3
QCOW2_INCOMPAT_EXTL2_BITNR = 4
QCOW2_INCOMPAT_DIRTY = 1 << QCOW2_INCOMPAT_DIRTY_BITNR
QCOW2_INCOMPAT_CORRUPT = 1 << QCOW2_INCOMPAT_CORRUPT_BITNR
QCOW2_INCOMPAT_DATA_FILE = 1 << QCOW2_INCOMPAT_DATA_FILE_BITNR
QCOW2_INCOMPAT_COMPRESSION = 1 << QCOW2_INCOMPAT_COMPRESSION_BITNR
QCOW2_INCOMPAT_EXTL2 = 1 << QCOW2_INCOMPAT_EXTL2_BITNR
# qblock implements only these two; QEMU's mask also has DATA_FILE, COMPRESSION and EXTL2.
QCOW2_INCOMPAT_MASK = QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT

QCOW2_COMPAT_LAZY_REFCOUNTS_BITNR = 0
QCOW2_COMPAT_LAZY_REFCOUNTS = 1 << QCOW2_COMPAT_LAZY_REFCOUNTS_BITNR

QCOW2_AUTOCLEAR_BITMAPS_BITNR = 0
QCOW2_AUTOCLEAR_DATA_FILE_RAW_BITNR = 1
QCOW2_AUTOCLEAR_BITMAPS = 1 << QCOW2_AUTOCLEAR_BITMAPS_BITNR
QCOW2_AUTOCLEAR_DATA_FILE_RAW = 1 << QCOW2_AUTOCLEAR_DATA_FILE_RAW_BITNR
# Autoclear bits qblock keeps on a writable open: none (it has neither bitmaps nor data files),
# so every autoclear bit is cleared, as the spec asks of a program that does not know them.
QCOW2_AUTOCLEAR_MASK = 0

QCOW2_FEAT_TYPE_INCOMPATIBLE = 0
QCOW2_FEAT_TYPE_COMPATIBLE = 1
QCOW2_FEAT_TYPE_AUTOCLEAR = 2

QCOW2_COMPRESSION_TYPE_ZLIB = 0
QCOW2_COMPRESSION_TYPE_ZSTD = 1

# QCowHeader, big endian; v2 images end at incompatible_features (72 bytes).
QCOW_HEADER = struct.Struct(">IIQIIQIIQQIIQQQQIIB7x")
QCOW_HEADER_V2_SIZE = 72
QCOW_HEADER_V3_MIN = 104
HDR_SIZE_OFFSET = 24                  # offsetof(QCowHeader, size)
HDR_L1_SIZE_OFFSET = 36               # offsetof(QCowHeader, l1_size)
HDR_REFCOUNT_TABLE_OFFSET = 48        # offsetof(QCowHeader, refcount_table_offset)
HDR_NB_SNAPSHOTS_OFFSET = 60          # offsetof(QCowHeader, nb_snapshots)
HDR_INCOMPAT_OFFSET = 72              # offsetof(QCowHeader, incompatible_features)
QCOW_EXT = struct.Struct(">II")
QCOW2_FEATURE = struct.Struct(">BB46s")

BE64 = struct.Struct(">Q")


class QCow2ClusterType(enum.IntEnum):
    QCOW2_CLUSTER_UNALLOCATED = 0
    QCOW2_CLUSTER_ZERO_PLAIN = 1
    QCOW2_CLUSTER_ZERO_ALLOC = 2
    QCOW2_CLUSTER_NORMAL = 3
    QCOW2_CLUSTER_COMPRESSED = 4


QCOW2_CLUSTER_UNALLOCATED = QCow2ClusterType.QCOW2_CLUSTER_UNALLOCATED
QCOW2_CLUSTER_ZERO_PLAIN = QCow2ClusterType.QCOW2_CLUSTER_ZERO_PLAIN
QCOW2_CLUSTER_ZERO_ALLOC = QCow2ClusterType.QCOW2_CLUSTER_ZERO_ALLOC
QCOW2_CLUSTER_NORMAL = QCow2ClusterType.QCOW2_CLUSTER_NORMAL
QCOW2_CLUSTER_COMPRESSED = QCow2ClusterType.QCOW2_CLUSTER_COMPRESSED


class Qcow2DiscardType(enum.IntEnum):
    QCOW2_DISCARD_NEVER = 0
    QCOW2_DISCARD_ALWAYS = 1
    QCOW2_DISCARD_REQUEST = 2
    QCOW2_DISCARD_SNAPSHOT = 3
    QCOW2_DISCARD_OTHER = 4
    QCOW2_DISCARD_MAX = 5


QCOW2_DISCARD_NEVER = Qcow2DiscardType.QCOW2_DISCARD_NEVER
QCOW2_DISCARD_ALWAYS = Qcow2DiscardType.QCOW2_DISCARD_ALWAYS
QCOW2_DISCARD_REQUEST = Qcow2DiscardType.QCOW2_DISCARD_REQUEST
QCOW2_DISCARD_SNAPSHOT = Qcow2DiscardType.QCOW2_DISCARD_SNAPSHOT
QCOW2_DISCARD_OTHER = Qcow2DiscardType.QCOW2_DISCARD_OTHER

# QCow2MetadataOverlap
QCOW2_OL_MAIN_HEADER_BITNR = 0
QCOW2_OL_ACTIVE_L1_BITNR = 1
QCOW2_OL_ACTIVE_L2_BITNR = 2
QCOW2_OL_REFCOUNT_TABLE_BITNR = 3
QCOW2_OL_REFCOUNT_BLOCK_BITNR = 4
QCOW2_OL_SNAPSHOT_TABLE_BITNR = 5
QCOW2_OL_INACTIVE_L1_BITNR = 6
QCOW2_OL_INACTIVE_L2_BITNR = 7
QCOW2_OL_BITMAP_DIRECTORY_BITNR = 8
QCOW2_OL_MAX_BITNR = 9
QCOW2_OL_MAIN_HEADER = 1 << QCOW2_OL_MAIN_HEADER_BITNR
QCOW2_OL_ACTIVE_L1 = 1 << QCOW2_OL_ACTIVE_L1_BITNR
QCOW2_OL_ACTIVE_L2 = 1 << QCOW2_OL_ACTIVE_L2_BITNR
QCOW2_OL_REFCOUNT_TABLE = 1 << QCOW2_OL_REFCOUNT_TABLE_BITNR
QCOW2_OL_REFCOUNT_BLOCK = 1 << QCOW2_OL_REFCOUNT_BLOCK_BITNR
QCOW2_OL_SNAPSHOT_TABLE = 1 << QCOW2_OL_SNAPSHOT_TABLE_BITNR
QCOW2_OL_INACTIVE_L1 = 1 << QCOW2_OL_INACTIVE_L1_BITNR
QCOW2_OL_INACTIVE_L2 = 1 << QCOW2_OL_INACTIVE_L2_BITNR
QCOW2_OL_BITMAP_DIRECTORY = 1 << QCOW2_OL_BITMAP_DIRECTORY_BITNR
QCOW2_OL_CONSTANT = (QCOW2_OL_MAIN_HEADER | QCOW2_OL_ACTIVE_L1 | QCOW2_OL_REFCOUNT_TABLE
                     | QCOW2_OL_SNAPSHOT_TABLE | QCOW2_OL_BITMAP_DIRECTORY)
QCOW2_OL_CACHED = QCOW2_OL_CONSTANT | QCOW2_OL_ACTIVE_L2 | QCOW2_OL_REFCOUNT_BLOCK | QCOW2_OL_INACTIVE_L1
QCOW2_OL_ALL = QCOW2_OL_CACHED | QCOW2_OL_INACTIVE_L2

# Runtime option names (QCOW2_OPT_*)
QCOW2_OPT_LAZY_REFCOUNTS = "lazy-refcounts"
QCOW2_OPT_DISCARD_REQUEST = "pass-discard-request"
QCOW2_OPT_DISCARD_SNAPSHOT = "pass-discard-snapshot"
QCOW2_OPT_DISCARD_OTHER = "pass-discard-other"
QCOW2_OPT_OVERLAP = "overlap-check"
QCOW2_OPT_OVERLAP_TEMPLATE = "overlap-check.template"
QCOW2_OPT_OVERLAP_NAMES = (   # indexed by QCOW2_OL_*_BITNR
    "overlap-check.main-header", "overlap-check.active-l1", "overlap-check.active-l2",
    "overlap-check.refcount-table", "overlap-check.refcount-block", "overlap-check.snapshot-table",
    "overlap-check.inactive-l1", "overlap-check.inactive-l2", "overlap-check.bitmap-directory",
)
QCOW2_OPT_CACHE_SIZE = "cache-size"
QCOW2_OPT_L2_CACHE_SIZE = "l2-cache-size"
QCOW2_OPT_L2_CACHE_ENTRY_SIZE = "l2-cache-entry-size"
QCOW2_OPT_REFCOUNT_CACHE_SIZE = "refcount-cache-size"
QCOW2_OPT_CACHE_CLEAN_INTERVAL = "cache-clean-interval"


@attrs.define(eq=False)
class Qcow2COWRegion:
    """A part of a newly allocated cluster that keeps its old content (QEMU's Qcow2COWRegion)."""

    offset: int = 0       # from the start of the first allocated cluster
    nb_bytes: int = 0


@attrs.define(eq=False)
class QCowL2Meta:
    """One in-flight allocation: new host clusters not yet linked into the L2 table (QEMU's QCowL2Meta)."""

    offset: int = 0                    # guest offset of the first cluster
    alloc_offset: int = 0              # host offset of the first new cluster
    nb_clusters: int = 0
    keep_old_clusters: bool = False
    cow_start: Qcow2COWRegion = attrs.field(factory=Qcow2COWRegion)
    cow_end: Qcow2COWRegion = attrs.field(factory=Qcow2COWRegion)
    skip_cow: bool = False
    prealloc: bool = False             # only changes subcluster bitmaps in QEMU; kept for the name
    data_qiov: QEMUIOVector | None = None
    data_qiov_offset: int = 0
    dependent_requests: CoQueue = attrs.field(factory=lambda: CoQueue("qcow2 l2meta"))
    next: "QCowL2Meta | None" = None

    @property
    def trace_name(self) -> str:
        return f"l2meta[{self.offset:#x}+{self.nb_clusters}c]"


@attrs.define(eq=False)
class QCowSnapshot:
    """One entry of the snapshot table (QEMU's QCowSnapshot); ``icount`` is -1 when the entry has none."""

    l1_table_offset: int = 0
    l1_size: int = 0
    id_str: str = ""
    name: str = ""
    disk_size: int = 0
    vm_state_size: int = 0
    date_sec: int = 0
    date_nsec: int = 0
    vm_clock_nsec: int = 0
    icount: int = -1
    extra_data_size: int = 0
    unknown_extra_data: bytes = b""     # extra data past the fields qblock knows, kept byte for byte


@attrs.define(eq=False)
class Qcow2UnknownHeaderExtension:
    magic: int
    data: bytes


@attrs.define(eq=False)
class Qcow2DiscardRegion:
    offset: int
    bytes: int


@attrs.define(eq=False)
class BDRVQcow2State:
    """The per-node state of a qcow2 node (QEMU's BDRVQcow2State)."""

    cluster_bits: int = 0
    cluster_size: int = 0
    l2_bits: int = 0
    l2_size: int = 0
    l1_size: int = 0
    l1_vm_state_index: int = 0
    refcount_block_bits: int = 0
    refcount_block_size: int = 0
    csize_shift: int = 0
    csize_mask: int = 0
    cluster_offset_mask: int = 0
    l1_table_offset: int = 0
    l1_table: list = attrs.field(factory=list)
    l2_table_cache: Any = None
    refcount_block_cache: Any = None
    refcount_table: list = attrs.field(factory=list)
    refcount_table_offset: int = 0
    refcount_table_size: int = 0
    max_refcount_table_index: int = 0
    free_cluster_index: int = 0
    free_byte_offset: int = 0
    lock: CoMutex = attrs.field(factory=lambda: CoMutex("qcow2 s->lock"))
    flags: int = 0
    qcow_version: int = 0
    use_lazy_refcounts: bool = False
    refcount_order: int = 4
    refcount_bits: int = 16
    refcount_max: int = 0xFFFF
    get_refcount: Any = None        # (refblock, index) -> int
    set_refcount: Any = None        # (refblock, index, value) -> None
    discard_passthrough: list = attrs.field(factory=lambda: [False] * 5)
    overlap_check: int = QCOW2_OL_CACHED
    signaled_corruption: bool = False
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    compression_type: int = QCOW2_COMPRESSION_TYPE_ZLIB
    crypt_method_header: int = 0
    snapshots_offset: int = 0
    snapshots_size: int = 0
    nb_snapshots: int = 0
    snapshots: list = attrs.field(factory=list)
    unknown_header_fields: bytes = b""
    unknown_header_ext: list = attrs.field(factory=list)
    image_backing_file: str | None = None
    image_backing_format: str | None = None
    cluster_allocs: list = attrs.field(factory=list)    # QCowL2Meta in flight
    discards: list = attrs.field(factory=list)          # Qcow2DiscardRegion
    cache_discards: bool = False
    # qblock addition: a cluster was freed since the L2 tables were last written back; it must not be
    # handed out again before they are (see qcow2_refcount.sync_before_reuse).
    freed_before_l2_sync: bool = False
    metadata_preallocation: bool = False


# --------------------------------------------------------------------------
# Inline helpers of qcow2.h


def start_of_cluster(s: BDRVQcow2State, offset: int) -> int:
    return offset & ~(s.cluster_size - 1)


def offset_into_cluster(s: BDRVQcow2State, offset: int) -> int:
    return offset & (s.cluster_size - 1)


def size_to_clusters(s: BDRVQcow2State, size: int) -> int:
    return (size + s.cluster_size - 1) >> s.cluster_bits


def size_to_l1(s: BDRVQcow2State, size: int) -> int:
    shift = s.cluster_bits + s.l2_bits
    return (size + (1 << shift) - 1) >> shift


def offset_to_l1_index(s: BDRVQcow2State, offset: int) -> int:
    return offset >> (s.l2_bits + s.cluster_bits)


def offset_to_l2_index(s: BDRVQcow2State, offset: int) -> int:
    return (offset >> s.cluster_bits) & (s.l2_size - 1)


def qcow2_vm_state_offset(s: BDRVQcow2State) -> int:
    return s.l1_vm_state_index << (s.cluster_bits + s.l2_bits)


def qcow2_get_cluster_type(l2_entry: int) -> QCow2ClusterType:
    if l2_entry & QCOW_OFLAG_COMPRESSED:
        return QCOW2_CLUSTER_COMPRESSED
    if l2_entry & QCOW_OFLAG_ZERO:
        return QCOW2_CLUSTER_ZERO_ALLOC if l2_entry & L2E_OFFSET_MASK else QCOW2_CLUSTER_ZERO_PLAIN
    if not l2_entry & L2E_OFFSET_MASK:
        return QCOW2_CLUSTER_UNALLOCATED
    return QCOW2_CLUSTER_NORMAL


def qcow2_need_accurate_refcounts(s: BDRVQcow2State) -> bool:
    """Refcounts must be kept on disk unless the image is dirty (lazy refcounts)."""
    return not s.incompatible_features & QCOW2_INCOMPAT_DIRTY


def l2meta_cow_start(m: QCowL2Meta) -> int:
    return m.offset + m.cow_start.offset


def l2meta_cow_end(m: QCowL2Meta) -> int:
    return m.offset + m.cow_end.offset + m.cow_end.nb_bytes


def refcount_diff(r1: int, r2: int) -> int:
    return r1 - r2 if r1 > r2 else r2 - r1


def ranges_overlap(first1: int, len1: int, first2: int, len2: int) -> bool:
    """QEMU's include/qemu/range.h: do [first1, +len1) and [first2, +len2) share a byte?"""
    return first1 < first2 + len2 and first2 < first1 + len1


def l2_entry_get(table, index: int) -> int:
    return BE64.unpack_from(table, index * 8)[0]


def l2_entry_set(table, index: int, value: int) -> None:
    BE64.pack_into(table, index * 8, value)


def c_hex(value: int) -> str:
    """printf's ``%#x``/``%#" PRIx64``: like Python's ``#x`` but zero prints as ``0`` (QEMU's messages use it)."""
    return f"{value:#x}" if value else "0"
