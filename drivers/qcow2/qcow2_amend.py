"""Changing an existing image: QEMU's qcow2_amend_options and its helpers.

``qemu-img amend -o ...`` lands in ``qcow2_amend_options``, which runs the
steps in QEMU's order: upgrade to compat=1.1 (``qcow2_upgrade``, rewriting
a v2 snapshot table in the v3 layout), change the refcount width
(``qcow2_change_refcount_order``: new refcount blocks and table written
beside the old ones, then the header switched and the old ones freed),
rewrite the header, refuse a different backing file, switch lazy refcounts,
resize, and downgrade to compat=0.10 last (``qcow2_downgrade``, which turns
zero clusters into data clusters with ``qcow2_expand_zero_clusters``).

Mirrors block/qcow2.c (qcow2_amend_options, qcow2_upgrade,
qcow2_downgrade, qcow2_amend_helper_cb); the refcount width change is in
``qcow2_refcount_order``, the zero-cluster expansion in ``qcow2_cluster``,
the snapshot table rewrite in ``qcow2_snapshot``.  Left out: the ``encrypt.*`` options (qblock
opens no encrypted image, so they fail as on an unencrypted one), external
data files (refused with QEMU's messages).  The metadata steps hold
``s->lock`` (QEMU runs amend outside coroutines, with nothing else going on);
the resize drops it, as it goes through the generic truncate.
"""
from __future__ import annotations

import errno
from typing import Any, Callable

import attrs

from qblock.block.driver import PreallocMode
from qblock.block.graph import (
    BLK_PERM_ALL,
    BLK_PERM_RESIZE,
    BdrvChildClass,
    bdrv_get_aio_context,
    bdrv_ref,
    bdrv_root_attach_child,
    bdrv_root_unref_child,
)
from qblock.block.io import bdrv_co_truncate, run_co_in
from qblock.util.coroutine_lock import qemu_co_mutex_lock, qemu_co_mutex_unlock
from qblock.util.error import Error, error_setg_errno
from qblock.util.qemu_option import (
    QEMU_OPT_BOOL,
    QEMU_OPT_NUMBER,
    QEMU_OPT_SIZE,
    QEMU_OPT_STRING,
    QemuOptDesc,
    QemuOptsList,
    parse_option_bool,
)

from .qcow2_cluster import qcow2_expand_zero_clusters
from .qcow2_create import QCOW_COMMON_OPTIONS
from .qcow2_h import QCOW2_COMPAT_LAZY_REFCOUNTS, QCOW2_INCOMPAT_COMPRESSION, QCOW2_INCOMPAT_DIRTY
from .qcow2_header import qcow2_mark_clean, qcow2_update_header
from .qcow2_refcount_order import qcow2_change_refcount_order
from .qcow2_snapshot import qcow2_write_snapshots

# QEMU's qcow2_amend_opts: the LUKS keyslot options, then QCOW_COMMON_OPTIONS.
qcow2_amend_opts = QemuOptsList("qcow2-amend-opts", [
    QemuOptDesc("encrypt.state", QEMU_OPT_STRING, "Select new state of affected keyslots (active/inactive)"),
    QemuOptDesc("encrypt.keyslot", QEMU_OPT_NUMBER, "Select a single keyslot to modify explicitly"),
    QemuOptDesc("encrypt.old-secret", QEMU_OPT_STRING, "Select all keyslots that match this password"),
    QemuOptDesc("encrypt.new-secret", QEMU_OPT_STRING,
                "New secret to set in the matching keyslots. Empty string to erase"),
    QemuOptDesc("encrypt.iter-time", QEMU_OPT_NUMBER, "Time to spend in PBKDF in milliseconds"),
    *QCOW_COMMON_OPTIONS,
])

# status_cb(bs, offset, total_work_size), as QEMU's BlockDriverAmendStatusCB without the opaque pointer.
StatusCB = Callable[[Any, int, int], None]


# --------------------------------------------------------------------------
# Progress over several operations (qcow2_amend_helper_cb)


class Qcow2AmendOperation:
    QCOW2_NO_OPERATION = 0
    QCOW2_UPGRADING = 1
    QCOW2_UPDATING_ENCRYPTION = 2
    QCOW2_CHANGING_REFCOUNT_ORDER = 3
    QCOW2_DOWNGRADING = 4


@attrs.define(eq=False)
class Qcow2AmendHelperCBInfo:
    """Turns each operation's own progress into progress over the whole amend."""

    original_status_cb: Callable[[int, int], None]
    total_operations: int
    current_operation: int = Qcow2AmendOperation.QCOW2_NO_OPERATION
    operations_completed: int = 0
    offset_completed: int = 0
    last_operation: int = Qcow2AmendOperation.QCOW2_NO_OPERATION
    last_work_size: int = 0

    def __call__(self, bs, operation_offset: int, operation_work_size: int) -> None:
        if self.current_operation != self.last_operation:
            if self.last_operation != Qcow2AmendOperation.QCOW2_NO_OPERATION:
                self.offset_completed += self.last_work_size
                self.operations_completed += 1
            self.last_operation = self.current_operation
        if not 0 <= self.operations_completed < self.total_operations:
            raise AssertionError("qcow2_amend_helper_cb: more operations than announced")
        self.last_work_size = operation_work_size
        current_work_size = self.offset_completed + operation_work_size
        # Project the size of the operations still to come from those seen so far.
        projected_work_size = current_work_size * (self.total_operations - self.operations_completed - 1) \
            // (self.operations_completed + 1)
        self.original_status_cb(self.offset_completed + operation_offset, current_work_size + projected_work_size)


# --------------------------------------------------------------------------
# Versions (block/qcow2.c)


def qcow2_upgrade(bs, target_version: int, status_cb: StatusCB) -> None:
    """compat=0.10 to 1.1: v2 snapshot entries get the v3 extra data, then the header says v3.  Raises Error."""
    s = bs.opaque
    current_version = s.qcow_version
    if not (target_version > current_version and target_version == 3):
        raise AssertionError("qcow2_upgrade: only v2 to v3")
    status_cb(bs, 0, 2)
    # v3 snapshot entries must carry the 64-bit VM state size and the disk size.
    if any(sn.extra_data_size < 16 for sn in s.snapshots):
        ret = qcow2_write_snapshots(bs)
        if ret < 0:
            raise error_setg_errno(-ret, "Failed to update the snapshot table")
    status_cb(bs, 1, 2)
    s.qcow_version = target_version
    ret = qcow2_update_header(bs)
    if ret < 0:
        s.qcow_version = current_version
        raise error_setg_errno(-ret, "Failed to update the image header")
    status_cb(bs, 2, 2)


def qcow2_downgrade(bs, target_version: int, status_cb: StatusCB) -> None:
    """compat=1.1 to 0.10: refuse what v2 cannot hold, expand zero clusters, then the v2 header.  Raises Error."""
    s = bs.opaque
    current_version = s.qcow_version
    if not (target_version < current_version and target_version == 2):
        raise AssertionError("qcow2_downgrade: only v3 to v2")
    if s.refcount_order != 4:
        raise Error("compat=0.10 requires refcount_bits=16", errno=errno.ENOTSUP)
    # Other v2 programs would not know that a snapshot's size or big VM state matters.
    for sn in s.snapshots:
        if sn.vm_state_size > 0xFFFFFFFF or sn.disk_size != bs.total_sectors * 512:
            raise Error("Internal snapshots prevent downgrade of image", errno=errno.ENOTSUP)
    if s.incompatible_features & QCOW2_INCOMPAT_DIRTY:
        ret = qcow2_mark_clean(bs)
        if ret < 0:
            raise error_setg_errno(-ret, "Failed to make the image clean")
    if s.incompatible_features & ~QCOW2_INCOMPAT_COMPRESSION:
        raise Error(f"Cannot downgrade an image with incompatible features "
                    f"0x{s.incompatible_features & ~QCOW2_INCOMPAT_COMPRESSION:x} set", errno=errno.ENOTSUP)
    # Compatible features may simply be dropped (lazy refcounts were settled by cleaning), autoclear ones too.
    s.compatible_features = 0
    s.autoclear_features = 0
    ret = qcow2_expand_zero_clusters(bs, status_cb)
    if ret < 0:
        raise error_setg_errno(-ret, "Failed to turn zero into data clusters")
    # (qblock opens no zstd image, so QEMU's compression-type step has nothing to do.)
    s.qcow_version = target_version
    ret = qcow2_update_header(bs)
    if ret < 0:
        s.qcow_version = current_version
        raise error_setg_errno(-ret, "Failed to update the image header")


# --------------------------------------------------------------------------
# qcow2_amend_options


class _AmendChild(BdrvChildClass):
    """The edge amend resizes through (QEMU: a BlockBackend with BLK_PERM_RESIZE)."""

    def get_parent_desc(self, c) -> str:
        return "qcow2 amend"


def _truncate(bs, new_size: int) -> None:
    """Resize to exactly ``new_size`` through a temporary edge.  Raises Error."""
    bdrv_ref(bs)
    child = bdrv_root_attach_child(bs, "amend", _AmendChild(), 0, BLK_PERM_RESIZE, BLK_PERM_ALL, None)
    try:
        errp: list = []
        ret = bdrv_co_truncate(child, new_size, True, PreallocMode.PREALLOC_MODE_OFF, errp)
        if ret < 0:
            raise errp[0] if errp else error_setg_errno(-ret, "Could not resize image")
    finally:
        bdrv_root_unref_child(child)


def _opt_str(options: dict, name: str) -> str | None:
    v = options.get(name)
    return None if v is None else str(v)


def qcow2_amend_options(bs, options: dict, status_cb: Callable[[int, int], None] | None, force: bool) -> int:
    """Apply the ``-o`` options given (only those): 0, or raises Error with QEMU's message."""
    s = bs.opaque
    old_version = new_version = s.qcow_version
    new_size = 0
    backing_file = backing_format = data_file = None
    lazy_refcounts = s.use_lazy_refcounts
    refcount_bits = s.refcount_bits
    for desc in qcow2_amend_opts.desc:
        name = desc.name
        if name not in options:
            continue        # only what was given changes
        value = options[name]
        if name == "compat":
            compat = _opt_str(options, name)
            if compat in ("0.10", "v2"):
                new_version = 2
            elif compat in ("1.1", "v3"):
                new_version = 3
            else:
                raise Error(f"Unknown compatibility level {compat}", errno=errno.EINVAL)
        elif name == "size":
            new_size = int(value)
        elif name == "backing_file":
            backing_file = _opt_str(options, name)
        elif name == "backing_fmt":
            backing_format = _opt_str(options, name)
        elif name.startswith("encrypt."):
            # qblock opens no encrypted image (s->crypto is always NULL).
            raise Error("Can't amend encryption options - encryption not present", errno=errno.EINVAL)
        elif name == "lazy_refcounts":
            lazy_refcounts = parse_option_bool(name, value)
        elif name == "refcount_bits":
            refcount_bits = int(value)
            if refcount_bits <= 0 or refcount_bits > 64 or refcount_bits & (refcount_bits - 1):
                raise Error("Refcount width must be a power of two and may not exceed 64 bits", errno=errno.EINVAL)
        elif name == "data_file":
            data_file = _opt_str(options, name)
            if data_file is not None:        # qblock opens no image with an external data file
                raise Error("data-file can only be set for images that use an external data file",
                            errno=errno.EINVAL)
        elif name == "data_file_raw":
            if parse_option_bool(name, value):
                raise Error("data-file-raw cannot be set on existing images", errno=errno.EINVAL)
        else:
            raise AssertionError(f"qcow2_amend_options: option {name} not handled")

    helper = Qcow2AmendHelperCBInfo(status_cb or (lambda done, total: None),
                                    total_operations=(new_version != old_version) + (s.refcount_bits != refcount_bits))

    def locked(fn, *args):
        qemu_co_mutex_lock(s.lock)
        try:
            return fn(*args)
        finally:
            qemu_co_mutex_unlock(s.lock)

    def before_resize() -> None:
        # Upgrade first: what follows may need compat=1.1.
        if new_version > old_version:
            helper.current_operation = Qcow2AmendOperation.QCOW2_UPGRADING
            qcow2_upgrade(bs, new_version, helper)
        if s.refcount_bits != refcount_bits:
            if new_version < 3 and refcount_bits != 16:
                raise Error("Refcount widths other than 16 bits require compatibility level 1.1 or above (use "
                            "compat=1.1 or greater)", errno=errno.EINVAL)
            helper.current_operation = Qcow2AmendOperation.QCOW2_CHANGING_REFCOUNT_ORDER
            qcow2_change_refcount_order(bs, refcount_bits.bit_length() - 1, helper)
        # (data-file-raw could only be cleared, and qblock's images never have it.)
        ret = qcow2_update_header(bs)
        if ret < 0:
            raise error_setg_errno(-ret, "Failed to update the image header")
        if backing_file is not None or backing_format is not None:
            if backing_file != (s.image_backing_file or None) or backing_format != (s.image_backing_format or None):
                raise Error("Cannot amend the backing file", errno=errno.EINVAL,
                            hint="You can use 'qemu-img rebase' instead.\n")
        if s.use_lazy_refcounts != lazy_refcounts:
            if lazy_refcounts:
                if new_version < 3:
                    raise Error("Lazy refcounts only supported with compatibility level 1.1 and above (use "
                                "compat=1.1 or greater)", errno=errno.EINVAL)
                s.compatible_features |= QCOW2_COMPAT_LAZY_REFCOUNTS
                ret = qcow2_update_header(bs)
                if ret < 0:
                    s.compatible_features &= ~QCOW2_COMPAT_LAZY_REFCOUNTS
                    raise error_setg_errno(-ret, "Failed to update the image header")
                s.use_lazy_refcounts = True
            else:
                ret = qcow2_mark_clean(bs)      # settle the refcounts first
                if ret < 0:
                    raise error_setg_errno(-ret, "Failed to make the image clean")
                s.compatible_features &= ~QCOW2_COMPAT_LAZY_REFCOUNTS
                ret = qcow2_update_header(bs)
                if ret < 0:
                    s.compatible_features |= QCOW2_COMPAT_LAZY_REFCOUNTS
                    raise error_setg_errno(-ret, "Failed to update the image header")
                s.use_lazy_refcounts = False

    def co() -> Error | None:
        try:
            locked(before_resize)
            if new_size:
                _truncate(bs, new_size)       # exactly the size asked for; takes s->lock in the driver
            # Downgrade last, once what v2 cannot hold is gone.
            if new_version < old_version:
                helper.current_operation = Qcow2AmendOperation.QCOW2_DOWNGRADING
                locked(qcow2_downgrade, bs, new_version, helper)
        except Error as e:
            return e
        return None

    err = run_co_in(bdrv_get_aio_context(bs), co)
    if err is not None:
        raise err
    return 0
