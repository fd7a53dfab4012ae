"""Image creation: QEMU's qcow2_co_create_opts and qcow2_co_create (block/qcow2.c).

The steps are QEMU's, so the file is laid out as ``qemu-img create -f
qcow2`` lays it out: the protocol file is created empty; a header of size
0 and a refcount table (cluster 1) pointing at an empty refcount block
(cluster 2) are written; the image is then opened as qcow2, clusters 0-2
are allocated through the refcounts, the full header (with the feature
table) is written, the image is grown to its size (which allocates the L1
table, cluster 3 with 64 KiB clusters) with the requested preallocation,
and the backing file is recorded.

Options (QEMU's names): ``size``, ``compat`` (0.10/v2, 1.1/v3), ``cluster_size``,
``lazy_refcounts``, ``refcount_bits``, ``backing_file``, ``backing_fmt``,
``preallocation`` (off, metadata; falloc and full preallocate the metadata
and let the file driver allocate its tail), ``compression_type`` (zlib),
``extended_l2`` (off), ``encrypt.format``/``encryption``, ``data_file``
(refused: not supported).  Without ``size`` the backing file's size is used,
as qemu-img does.
"""
from __future__ import annotations

import errno

from qblock.block.create import bdrv_create_file
from qblock.block.driver import BDRV_O_NO_FLUSH, BDRV_O_PROTOCOL, BDRV_O_RDWR, BDRV_O_RESIZE, PreallocMode
from qblock.block.graph import (
    BLK_PERM_ALL,
    BLK_PERM_RESIZE,
    BLK_PERM_WRITE,
    BdrvChildClass,
    bdrv_getlength,
    bdrv_open,
    bdrv_ref,
    bdrv_root_attach_child,
    bdrv_root_unref_child,
    bdrv_unref,
)
from qblock.block.io import bdrv_co_flush, bdrv_co_pwrite, bdrv_co_truncate
from qblock.util.coroutine_lock import qemu_co_mutex_lock, qemu_co_mutex_unlock
from qblock.util.error import Error, error_prepend, error_setg_errno
from qblock.util.qemu_option import (
    QEMU_OPT_BOOL,
    QEMU_OPT_NUMBER,
    QEMU_OPT_SIZE,
    QEMU_OPT_STRING,
    QemuOptDesc,
    QemuOptsList,
    qemu_opts_absorb_qdict,
)

from .qcow2_h import (
    DEFAULT_CLUSTER_SIZE,
    MAX_CLUSTER_BITS,
    MIN_CLUSTER_BITS,
    QCOW2_COMPAT_LAZY_REFCOUNTS,
    QCOW_HEADER,
    QCOW_MAGIC,
)

# QEMU's QCOW_COMMON_OPTIONS: the options create and amend share, in the order -o help lists them.
QCOW_COMMON_OPTIONS = [
    QemuOptDesc("size", QEMU_OPT_SIZE, "Virtual disk size"),
    QemuOptDesc("compat", QEMU_OPT_STRING, "Compatibility level (v2 [0.10] or v3 [1.1])"),
    QemuOptDesc("backing_file", QEMU_OPT_STRING, "File name of a base image"),
    QemuOptDesc("backing_fmt", QEMU_OPT_STRING, "Image format of the base image"),
    QemuOptDesc("data_file", QEMU_OPT_STRING, "File name of an external data file"),
    QemuOptDesc("data_file_raw", QEMU_OPT_BOOL, "The external data file must stay valid as a raw image"),
    QemuOptDesc("lazy_refcounts", QEMU_OPT_BOOL, "Postpone refcount updates", "off"),
    QemuOptDesc("refcount_bits", QEMU_OPT_NUMBER, "Width of a reference count entry in bits", "16"),
]

qcow2_create_opts = QemuOptsList("qcow2-create-opts", [
    QemuOptDesc("encryption", QEMU_OPT_BOOL, "Encrypt the image with format 'aes'. (Deprecated in favor of "
                "encrypt.format=aes)"),
    QemuOptDesc("encrypt.format", QEMU_OPT_STRING, "Encrypt the image, format choices: 'aes', 'luks'"),
    QemuOptDesc("cluster_size", QEMU_OPT_SIZE, "qcow2 cluster size", str(DEFAULT_CLUSTER_SIZE)),
    QemuOptDesc("extended_l2", QEMU_OPT_BOOL, "Extended L2 tables", "off"),
    QemuOptDesc("preallocation", QEMU_OPT_STRING, "Preallocation mode (allowed values: off, metadata, falloc, full)"),
    QemuOptDesc("compression_type", QEMU_OPT_STRING, "Compression method used for image cluster compression",
                "zlib"),
    *QCOW_COMMON_OPTIONS,
])


def _parse_create_options(options: dict) -> dict:
    """Check the options as QEMU's qcow2_co_create does; the values to create with.  Raises Error."""
    opts = qemu_opts_absorb_qdict(qcow2_create_opts, options)
    compat = opts.get("compat")
    if compat in (None, "1.1", "v3"):
        version = 3
    elif compat in ("0.10", "v2"):
        version = 2
    else:
        raise Error(f"Invalid compatibility level: '{compat}'", errno=errno.EINVAL)
    cluster_size = opts.get("cluster_size")
    cluster_bits = cluster_size.bit_length() - 1
    if cluster_bits < MIN_CLUSTER_BITS or cluster_bits > MAX_CLUSTER_BITS or 1 << cluster_bits != cluster_size:
        raise Error(f"Cluster size must be a power of two between {1 << MIN_CLUSTER_BITS} and "
                    f"{1 << (MAX_CLUSTER_BITS - 10)}k", errno=errno.EINVAL)
    if opts.get("extended_l2"):
        raise Error("Unsupported qcow2 feature(s): extended L2 entries", errno=errno.ENOTSUP)
    mode = opts.get("preallocation", "off")
    try:
        prealloc = PreallocMode(mode)
    except ValueError:
        raise Error(f"Parameter 'preallocation' does not accept value '{mode}'", errno=errno.EINVAL) from None
    backing_file = opts.get("backing_file")
    backing_fmt = opts.get("backing_fmt")
    if backing_file and prealloc is not PreallocMode.PREALLOC_MODE_OFF:
        raise Error("Backing file and preallocation can only be used at the same time if extended_l2 is on",
                    errno=errno.EINVAL)
    if backing_fmt and not backing_file:
        raise Error("Backing format cannot be used without backing file", errno=errno.EINVAL)
    lazy_refcounts = opts.get("lazy_refcounts")
    if version < 3 and lazy_refcounts:
        raise Error("Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or "
                    "greater)", errno=errno.EINVAL)
    refcount_bits = opts.get("refcount_bits")
    if refcount_bits > 64 or refcount_bits <= 0 or refcount_bits & (refcount_bits - 1):
        raise Error("Refcount width must be a power of two and may not exceed 64 bits", errno=errno.EINVAL)
    if version < 3 and refcount_bits != 16:
        raise Error("Different refcount widths than 16 bits require compatibility level 1.1 or above (use "
                    "version=v3 or greater)", errno=errno.EINVAL)
    if opts.get("data_file") or opts.get("data_file_raw"):
        raise Error("Unsupported qcow2 feature(s): external data file", errno=errno.ENOTSUP)
    if opts.get("compression_type") != "zlib":
        if version < 3:
            raise Error("Non-zlib compression type is only supported with compatibility level 1.1 and above "
                        "(use version=v3 or greater)", errno=errno.EINVAL)
        raise Error("Unknown compression type", errno=errno.EINVAL)
    if opts.get("encryption") or opts.get("encrypt.format"):
        raise Error("Unsupported qcow2 feature(s): encryption (qblock has no crypto layer)", errno=errno.ENOTSUP)
    size = opts.get("size")
    if size is None:
        size = _backing_size(backing_file, backing_fmt)
    size = (size + 511) // 512 * 512          # silently rounded up, as QEMU does
    return dict(version=version, cluster_size=cluster_size, cluster_bits=cluster_bits, prealloc=prealloc,
                backing_file=backing_file, backing_fmt=backing_fmt, lazy_refcounts=lazy_refcounts,
                refcount_order=refcount_bits.bit_length() - 1, size=size)


def _backing_size(backing_file: str | None, backing_fmt: str | None) -> int:
    """The size of the backing file, for a create without ``size`` (qemu-img's bdrv_img_create)."""
    if not backing_file:
        raise Error("Parameter 'size' is missing", errno=errno.EINVAL)
    opts = {"driver": backing_fmt} if backing_fmt else {}
    try:
        bs = bdrv_open(backing_file, None, opts, 0)
    except Error as e:
        raise error_prepend(e, "Could not open backing image: ") from None
    try:
        size = bdrv_getlength(bs)
    finally:
        bdrv_unref(bs)
    if size < 0:
        raise error_setg_errno(-size, "Could not get size of backing image")
    return size


class _CreateChild(BdrvChildClass):
    """The creating code's own edge to a node (QEMU uses a BlockBackend; see the module docstring)."""

    def get_parent_desc(self, c) -> str:
        return "qcow2 image creation"


def _attach(bs, perm: int):
    bdrv_ref(bs)
    return bdrv_root_attach_child(bs, "create", _CreateChild(), 0, perm, BLK_PERM_ALL, None)


def qcow2_co_create(file_bs, c: dict) -> None:
    """Write a minimal image on ``file_bs``, then make it whole through the driver itself.  Raises Error.

    QEMU does this through BlockBackends; qblock's blk_unref cannot run inside
    a coroutine (it drains with AIO_WAIT_WHILE), so plain root edges are used.
    """
    from .qcow2_header import qcow2_change_backing_file, qcow2_update_header
    from .qcow2_refcount import qcow2_alloc_clusters
    cluster_size = c["cluster_size"]
    child = _attach(file_bs, BLK_PERM_WRITE | BLK_PERM_RESIZE)
    try:
        header = bytearray(cluster_size)
        header[:QCOW_HEADER.size] = QCOW_HEADER.pack(
            QCOW_MAGIC, c["version"], 0, 0, c["cluster_bits"], 0, 0, 0, 0, cluster_size, 1, 0, 0, 0,
            QCOW2_COMPAT_LAZY_REFCOUNTS if c["lazy_refcounts"] else 0, 0, c["refcount_order"], QCOW_HEADER.size, 0)
        ret = bdrv_co_pwrite(child, 0, cluster_size, header)
        if ret < 0:
            raise error_setg_errno(-ret, "Could not write qcow2 header")
        # A refcount table with one (still empty) refcount block.
        table = bytearray(2 * cluster_size)
        table[:8] = (2 * cluster_size).to_bytes(8, "big")
        ret = bdrv_co_pwrite(child, cluster_size, len(table), table)
        if ret < 0:
            raise error_setg_errno(-ret, "Could not write refcount table")
    finally:
        bdrv_root_unref_child(child)

    # Open it and make it consistent: the header and refcount clusters get their refcounts.
    bs = bdrv_open(None, None, {"driver": "qcow2", "file": file_bs.node_name},
                   BDRV_O_RDWR | BDRV_O_RESIZE | BDRV_O_NO_FLUSH)
    child = _attach(bs, BLK_PERM_WRITE | BLK_PERM_RESIZE)
    bdrv_unref(bs)          # the edge holds the node now
    try:
        s = bs.opaque
        qemu_co_mutex_lock(s.lock)
        try:
            ret = qcow2_alloc_clusters(bs, 3 * cluster_size)
            if ret < 0:
                raise error_setg_errno(-ret, "Could not allocate clusters for qcow2 header and refcount table")
            if ret != 0:
                raise AssertionError("Huh, first cluster in empty image is already in use?")
            ret = qcow2_update_header(bs)
            if ret < 0:
                raise error_setg_errno(-ret, "Could not update qcow2 header")
        finally:
            qemu_co_mutex_unlock(s.lock)
        errp: list = []
        ret = bdrv_co_truncate(child, c["size"], False, c["prealloc"], errp)
        if ret < 0:
            err = errp[0] if errp else error_setg_errno(-ret, "Failed to resize")
            raise error_prepend(err, "Could not resize image: ")
        if c["backing_file"]:
            qemu_co_mutex_lock(s.lock)
            try:
                ret = qcow2_change_backing_file(bs, c["backing_file"], c["backing_fmt"])
            finally:
                qemu_co_mutex_unlock(s.lock)
            if ret < 0:
                raise error_setg_errno(-ret, f"Could not assign backing file '{c['backing_file']}' with format "
                                             f"'{c['backing_fmt']}'")
    finally:
        bdrv_root_unref_child(child)
    # QEMU reopens the image without BDRV_O_NO_FLUSH to flush it; flushing the file does the same.
    ret = bdrv_co_flush(file_bs)
    if ret < 0:
        raise error_setg_errno(-ret, "Could not flush the new image")


def qcow2_co_create_opts(filename: str, options: dict) -> int:
    """Create ``filename`` as a qcow2 image (the driver's bdrv_co_create_opts hook).  0, or raises Error."""
    options = dict(options)
    c = _parse_create_options(options)
    # What is left belongs to the protocol layer (nocow, extent_size_hint ...).
    bdrv_create_file(filename, options)
    file_bs = bdrv_open(filename, None, {}, BDRV_O_RDWR | BDRV_O_RESIZE | BDRV_O_PROTOCOL)
    try:
        qcow2_co_create(file_bs, c)
    finally:
        bdrv_unref(file_bs)
    return 0
