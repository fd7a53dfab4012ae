"""The file protocol: QEMU's block/file-posix.c, for regular files.

Every data request runs on the AioContext's thread pool (QEMU's
``aio=threads``): ``os.preadv``/``os.pwritev`` straight from the request's
memoryviews, looping over short transfers; a read that reaches the end of the
file fills the rest with zeroes, a short write fails with -EINVAL, as QEMU's
``handle_aiocb_rw`` does.  ``bdrv_co_flush_to_disk`` is ``fdatasync``; after a
failed fdatasync every later flush fails too (QEMU's
``page_cache_inconsistent``).  Write-zeroes and discard use
``fallocate(ZERO_RANGE / PUNCH_HOLE)`` where the filesystem has them, with
QEMU's fallbacks (-ENOTSUP lets the block layer write a zeroed buffer).
Block status comes from ``SEEK_DATA``/``SEEK_HOLE``.  ``cache.direct=on``
opens with ``O_DIRECT`` and probes ``request_alignment`` as QEMU does
(reads of 1, 512, 1024, 2048, 4096 bytes until one works); buffers that are
not aligned go through an aligned bounce buffer.

Image locking is QEMU's: Linux OFD read locks on one byte per permission
(100+bit while the node holds it, 200+bit while it does not share it),
driven by the graph through ``bdrv_check_perm`` / ``bdrv_set_perm`` /
``bdrv_abort_perm_update`` (QEMU's raw_handle_perm_lock with
RAW_PL_PREPARE/COMMIT/ABORT, raw_apply_lock_bytes, raw_check_lock_bytes), with
QEMU's messages (``Failed to get "write" lock`` and the hint ``Is another
process using the image [FILE]?``); creation locks and checks before it
truncates.  Closing the fd drops the locks.

Reopen (``bdrv_reopen_prepare``/``commit``/``abort``, as QEMU 3.x's
raw_reopen_*): prepare opens a new fd with the new O_RDWR/O_RDONLY and
O_DIRECT flags ("Could not reopen file") and probes its O_DIRECT alignment;
commit moves the lock bytes the old fd holds onto the new one, closes the old
one and swaps it in (the permission commit that follows then sets the bytes the
new permissions want); abort closes the new fd.  Only ``drop-cache`` and
``x-check-cache-dropped`` may change; ``locking``, ``aio`` and the rest must
stay as they are.  Later QEMU: the new fd is opened in raw_check_perm
(raw_reconfigure_getfd), which also serves auto-read-only; qblock has no
auto-read-only switch.
Only QEMU 7.2's four permissions have lock bytes (GRAPH_MOD, gone since 6.2,
has none), so qblock's locks mean to a real QEMU what its own do.

Options: ``filename`` (required), ``aio`` (``threads``; ``native`` is
accepted with cache.direct=on and runs on threads too), ``locking``
(``auto``: lock when OFD locks exist; ``on``: lock, with QEMU's warning and
POSIX locks when they do not; ``off``); ``x-check-cache-dropped``,
``drop-cache``, ``aio-max-batch`` and ``pr-manager`` are accepted and
ignored.  Creation (``bdrv_co_create_opts``): ``size`` (rounded up to 512),
``preallocation`` (off/falloc/full); ``nocow`` and ``extent_size_hint`` are
accepted and ignored.
"""
from __future__ import annotations

import errno
import mmap
import os
import stat
import sys

import attrs

from qblock.block.driver import (
    BDRV_BLOCK_DATA,
    BDRV_BLOCK_OFFSET_VALID,
    BDRV_BLOCK_ZERO,
    BDRV_O_NOCACHE,
    BDRV_REQ_MAY_UNMAP,
    BDRV_REQ_NO_FALLBACK,
    BDRV_SECTOR_SIZE,
    IOV_MAX,
    BlockDriver,
    PreallocMode,
)
from qblock.block.graph import (
    BLK_PERM_ALL,
    BLK_PERM_RESIZE,
    BLK_PERM_WRITE,
    bdrv_get_aio_context,
)
from qblock.util.error import Error, error_setg_errno, warn_report
from qblock.util.osdep import qemu_has_ofd_lock
from qblock.util.iov import QEMUIOVector, qemu_iovec_slice
from qblock.util.qemu_option import (
    QEMU_OPT_BOOL,
    QEMU_OPT_SIZE,
    QEMU_OPT_STRING,
    QemuOptDesc,
    QemuOptsList,
    qemu_opts_absorb_qdict,
)
from qblock.util.thread_pool import thread_pool_submit_co

from .file_posix_aio import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    RawPosixAIOData,
    _qiov_is_aligned,
    do_fallocate,
    handle_aiocb_flush,
    handle_aiocb_rw,
    raw_parse_flags,
    raw_probe_alignment,
)
from .file_posix_lock import (
    RAW_PL_ABORT,
    RAW_PL_COMMIT,
    RAW_PL_PREPARE,
    raw_apply_lock_bytes,
    raw_check_lock_bytes,
    raw_handle_perm_lock,
)

@attrs.define
class BDRVRawState:
    fd: int = -1
    open_flags: int = 0
    filename: str = ""
    needs_alignment: bool = False
    buf_align: int = 1
    has_discard: bool = True
    has_write_zeroes: bool = True
    has_fallocate: bool = True
    page_cache_inconsistent: bool = False
    is_xfs: bool = False
    use_lock: bool = False
    perm: int = 0                   # what the graph last committed (raw_set_perm)
    shared_perm: int = BLK_PERM_ALL
    locked_perm: int = 0            # the bytes this fd holds now
    locked_shared_perm: int = 0
    drop_cache: bool = True
    check_cache_dropped: bool = False


@attrs.define
class BDRVRawReopenState:
    fd: int = -1                    # the new fd; -1 when the open flags do not change
    open_flags: int = 0
    drop_cache: bool = True
    check_cache_dropped: bool = False


raw_runtime_opts = QemuOptsList("raw", [
    QemuOptDesc("filename", QEMU_OPT_STRING, "File name of the image"),
    QemuOptDesc("aio", QEMU_OPT_STRING, "host AIO implementation (threads, native, io_uring)"),
    QemuOptDesc("aio-max-batch", QEMU_OPT_SIZE, "AIO max batch size (0 = auto)"),
    QemuOptDesc("locking", QEMU_OPT_STRING, "file locking mode (on/off/auto, default: auto)"),
    QemuOptDesc("pr-manager", QEMU_OPT_STRING, "id of persistent reservation manager object"),
    QemuOptDesc("drop-cache", QEMU_OPT_BOOL, "invalidate page cache during live migration"),
    QemuOptDesc("x-check-cache-dropped", QEMU_OPT_BOOL, "check that page cache was dropped on live migration"),
])

file_create_opts = QemuOptsList("raw-create-opts", [
    QemuOptDesc("size", QEMU_OPT_SIZE, "Virtual disk size"),
    QemuOptDesc("nocow", QEMU_OPT_BOOL, "Turn off copy-on-write (valid only on btrfs)"),
    QemuOptDesc("preallocation", QEMU_OPT_STRING, "Preallocation mode (allowed values: off, falloc, full)"),
    QemuOptDesc("extent_size_hint", QEMU_OPT_SIZE, "Extent size hint for the image file, 0 to disable"),
])


class FileDriver(BlockDriver):
    """Protocol ``file``: a regular file on the host."""

    format_name = "file"
    protocol_name = "file"
    state_class = BDRVRawState
    runtime_opts = raw_runtime_opts
    create_opts = file_create_opts
    bdrv_needs_filename = True

    def bdrv_parse_filename(self, filename: str, options: dict) -> None:
        # "file:" is an optional prefix
        if filename.startswith("file:"):
            filename = filename[len("file:"):]
        options["filename"] = filename

    def bdrv_file_open(self, bs, options: dict, flags: int) -> int:
        s: BDRVRawState = bs.opaque
        opts = qemu_opts_absorb_qdict(raw_runtime_opts, options)
        filename = opts.get("filename")
        if not filename:
            raise Error(f"The '{self.format_name}' block driver requires a file name", errno=errno.EINVAL)
        aio = opts.get("aio", "threads")
        if aio not in ("threads", "native", "io_uring"):
            raise Error(f"invalid parameter value: {aio}", hint="Valid values: threads, native, io_uring")
        if aio == "native" and not flags & BDRV_O_NOCACHE:
            raise Error("aio=native was specified, but it requires cache.direct=on, which was not specified.")
        if aio == "io_uring":
            raise Error("aio=io_uring was specified, but is not supported in this build.")
        locking = opts.get("locking", "auto")
        if locking not in ("auto", "on", "off"):
            raise Error(f"invalid parameter value: {locking}", hint="Valid values: on, off, auto")
        if locking == "on":
            s.use_lock = True
            if not qemu_has_ofd_lock():
                warn_report("File lock requested but OFD locking syscall is unavailable, "
                            "falling back to POSIX file locks")
                sys.stderr.write("Due to the implementation, locks can be lost unexpectedly.\n")
        else:
            s.use_lock = locking == "auto" and qemu_has_ofd_lock()
        os_flags = raw_parse_flags(flags)
        s.drop_cache = opts.get("drop-cache", True)
        s.check_cache_dropped = opts.get("x-check-cache-dropped", False)
        s.filename = filename
        s.open_flags = os_flags
        try:
            fd = os.open(filename, os_flags)
        except OSError as e:
            raise error_setg_errno(e.errno, f"Could not open '{filename}'") from None
        try:
            st = os.fstat(fd)
            if stat.S_ISBLK(st.st_mode):
                warn_report(f"Opening a block device as a file using the '{self.format_name}' driver is deprecated")
            elif stat.S_ISCHR(st.st_mode):
                warn_report(f"Opening a character device as a file using the '{self.format_name}' driver "
                            "is deprecated")
            elif not stat.S_ISREG(st.st_mode):
                raise Error(f"A regular file was expected by the '{self.format_name}' driver, "
                            "but something else was given", errno=errno.EINVAL)
        except BaseException:
            os.close(fd)
            raise
        s.fd = fd
        s.perm, s.shared_perm = 0, BLK_PERM_ALL
        s.needs_alignment = bool(flags & BDRV_O_NOCACHE)
        bs.supported_zero_flags = BDRV_REQ_MAY_UNMAP | BDRV_REQ_NO_FALLBACK
        return 0

    def bdrv_close(self, bs) -> None:
        s: BDRVRawState = bs.opaque
        if s.fd >= 0:
            os.close(s.fd)  # drops every lock byte the fd held
            s.fd = -1
            s.locked_perm = s.locked_shared_perm = 0

    # -- reopen ------------------------------------------------------------

    def bdrv_reopen_prepare(self, state, queue) -> int:
        s: BDRVRawState = state.bs.opaque
        handled = {k: state.options.pop(k) for k in ("drop-cache", "x-check-cache-dropped") if k in state.options}
        opts = qemu_opts_absorb_qdict(raw_runtime_opts, handled)
        rs = BDRVRawReopenState(open_flags=raw_parse_flags(state.flags),
                                drop_cache=opts.get("drop-cache", True),
                                check_cache_dropped=opts.get("x-check-cache-dropped", False))
        if rs.open_flags != s.open_flags:
            try:
                rs.fd = os.open(s.filename, rs.open_flags)
            except OSError as e:
                raise error_setg_errno(e.errno, "Could not reopen file") from None
            if state.flags & BDRV_O_NOCACHE:
                try:
                    raw_probe_alignment(rs.fd)
                except Error:
                    os.close(rs.fd)
                    raise
        state.opaque = rs
        return 0

    def bdrv_reopen_commit(self, state) -> None:
        s: BDRVRawState = state.bs.opaque
        rs: BDRVRawReopenState = state.opaque
        if rs.fd >= 0:
            # The new fd takes the lock bytes the old one holds (read locks: no conflict between
            # the two), so the image is never unlocked; closing the old fd drops its own.
            held = s.locked_perm, s.locked_shared_perm
            s.locked_perm = s.locked_shared_perm = 0
            try:
                raw_apply_lock_bytes(s, rs.fd, held[0], held[1], False)
            except Error as e:
                warn_report(e.msg)
            os.close(s.fd)
            s.fd = rs.fd
            s.open_flags = rs.open_flags
        s.needs_alignment = bool(state.flags & BDRV_O_NOCACHE)
        s.drop_cache, s.check_cache_dropped = rs.drop_cache, rs.check_cache_dropped
        state.opaque = None

    def bdrv_reopen_abort(self, state) -> None:
        rs: BDRVRawReopenState | None = state.opaque
        if rs is None:
            return
        if rs.fd >= 0:
            os.close(rs.fd)
        state.opaque = None

    # -- permissions: the image locks ------------------------------------------

    def bdrv_check_perm(self, bs, perm: int, shared: int) -> int:
        raw_handle_perm_lock(bs, RAW_PL_PREPARE, perm, shared)
        return 0

    def bdrv_set_perm(self, bs, perm: int, shared: int) -> None:
        s: BDRVRawState = bs.opaque
        raw_handle_perm_lock(bs, RAW_PL_COMMIT, perm, shared)
        s.perm, s.shared_perm = perm, shared

    def bdrv_abort_perm_update(self, bs) -> None:
        raw_handle_perm_lock(bs, RAW_PL_ABORT, 0, 0)

    # -- limits -----------------------------------------------------------

    def _probe_alignment(self, bs) -> None:
        """With O_DIRECT, the read size and buffer alignment the node's fd accepts."""
        s: BDRVRawState = bs.opaque
        bs.bl.request_alignment, s.buf_align = raw_probe_alignment(s.fd)

    def bdrv_refresh_limits(self, bs) -> None:
        s: BDRVRawState = bs.opaque
        if s.needs_alignment:
            self._probe_alignment(bs)
            bs.bl.min_mem_alignment = s.buf_align
            bs.bl.opt_mem_alignment = max(s.buf_align, mmap.PAGESIZE)
        bs.bl.max_iov = IOV_MAX

    def bdrv_getlength(self, bs) -> int:
        s: BDRVRawState = bs.opaque
        try:
            return os.fstat(s.fd).st_size
        except OSError as e:
            return -(e.errno or errno.EIO)

    def bdrv_get_allocated_file_size(self, bs) -> int:
        try:
            return os.fstat(bs.opaque.fd).st_blocks * 512
        except OSError as e:
            return -(e.errno or errno.EIO)

    # -- I/O ----------------------------------------------------------------

    def _prw(self, bs, offset: int, bytes: int, qiov: QEMUIOVector, is_write: bool) -> int:
        s: BDRVRawState = bs.opaque
        iov = qiov.iov if qiov.size == bytes else qemu_iovec_slice(qiov, 0, bytes)
        bounce = s.needs_alignment and not _qiov_is_aligned(s, qiov)
        acb = RawPosixAIOData(s.fd, offset, bytes, iov, is_write, bounce)
        return thread_pool_submit_co(bdrv_get_aio_context(bs), handle_aiocb_rw, acb)

    def bdrv_co_preadv(self, bs, offset: int, bytes: int, qiov: QEMUIOVector, flags: int) -> int:
        return self._prw(bs, offset, bytes, qiov, False)

    def bdrv_co_pwritev(self, bs, offset: int, bytes: int, qiov: QEMUIOVector, flags: int) -> int:
        return self._prw(bs, offset, bytes, qiov, True)

    def bdrv_co_flush_to_disk(self, bs) -> int:
        s: BDRVRawState = bs.opaque
        if s.page_cache_inconsistent:
            return -errno.EIO  # an earlier fdatasync failed: the page cache may have lost data
        ret = thread_pool_submit_co(bdrv_get_aio_context(bs), handle_aiocb_flush, s.fd)
        if ret < 0:
            s.page_cache_inconsistent = True
        return ret

    def _write_zeroes(self, s: BDRVRawState, offset: int, bytes: int, unmap: bool, length: int) -> int:
        if unmap:
            # Zero and deallocate at once; fall through when the filesystem cannot.
            ret = do_fallocate(s.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, bytes)
            if ret != -errno.ENOTSUP:
                return ret
        if s.has_write_zeroes:
            ret = do_fallocate(s.fd, FALLOC_FL_ZERO_RANGE, offset, bytes)
            if ret == -errno.EINVAL:
                return -errno.ENOTSUP  # e.g. an unaligned range: let the block layer write zeroes
            if ret != -errno.ENOTSUP:
                return ret
            s.has_write_zeroes = False
        if s.has_discard and s.has_fallocate:
            ret = do_fallocate(s.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, bytes)
            if ret == 0:
                ret = do_fallocate(s.fd, 0, offset, bytes)
                if ret != -errno.ENOTSUP:
                    return ret
                s.has_fallocate = False
            elif ret != -errno.ENOTSUP:
                return ret
            else:
                s.has_discard = False
        if s.has_fallocate and offset >= length:
            # Extending the file with zeroes.
            ret = do_fallocate(s.fd, 0, offset, bytes)
            if ret != -errno.ENOTSUP:
                return ret
            s.has_fallocate = False
        return -errno.ENOTSUP

    def bdrv_co_pwrite_zeroes(self, bs, offset: int, bytes: int, flags: int) -> int:
        s: BDRVRawState = bs.opaque
        length = self.bdrv_getlength(bs)
        return thread_pool_submit_co(bdrv_get_aio_context(bs),
                                     lambda _: self._write_zeroes(s, offset, bytes, bool(flags & BDRV_REQ_MAY_UNMAP),
                                                                  length), None)

    def bdrv_co_pdiscard(self, bs, offset: int, bytes: int) -> int:
        s: BDRVRawState = bs.opaque
        if not s.has_discard:
            return -errno.ENOTSUP

        def work(_):
            ret = do_fallocate(s.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, bytes)
            if ret == -errno.ENOTSUP:
                s.has_discard = False
            return ret

        return thread_pool_submit_co(bdrv_get_aio_context(bs), work, None)

    def bdrv_co_block_status(self, bs, want_zero: bool, offset: int, bytes: int):
        """Data or hole from SEEK_DATA/SEEK_HOLE (QEMU's find_allocation)."""
        s: BDRVRawState = bs.opaque
        if not want_zero:
            return BDRV_BLOCK_DATA | BDRV_BLOCK_OFFSET_VALID, bytes, offset, bs
        align = bs.bl.request_alignment
        try:
            data = os.lseek(s.fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return BDRV_BLOCK_ZERO | BDRV_BLOCK_OFFSET_VALID, bytes, offset, bs  # a trailing hole
            return BDRV_BLOCK_DATA | BDRV_BLOCK_OFFSET_VALID, bytes, offset, bs  # no information
        if data > offset:
            pnum = min(bytes, data - offset)
            return BDRV_BLOCK_ZERO | BDRV_BLOCK_OFFSET_VALID, pnum, offset, bs
        try:
            hole = os.lseek(s.fd, offset, os.SEEK_HOLE)
        except OSError:
            return BDRV_BLOCK_DATA | BDRV_BLOCK_OFFSET_VALID, bytes, offset, bs
        if hole <= offset:
            return BDRV_BLOCK_DATA | BDRV_BLOCK_OFFSET_VALID, bytes, offset, bs  # changed under us
        pnum = min(bytes, hole - offset)
        if pnum % align:
            pnum = (pnum + align - 1) // align * align  # a partial sector at EOF
        return BDRV_BLOCK_DATA | BDRV_BLOCK_OFFSET_VALID, pnum, offset, bs

    def bdrv_co_truncate(self, bs, offset: int, exact: bool, prealloc: PreallocMode) -> int:
        s: BDRVRawState = bs.opaque
        current = self.bdrv_getlength(bs)
        if prealloc is not PreallocMode.PREALLOC_MODE_OFF and offset < current:
            raise Error("Cannot use preallocation for shrinking files", errno=errno.ENOTSUP)
        return thread_pool_submit_co(bdrv_get_aio_context(bs),
                                     lambda _: raw_regular_truncate(s.fd, offset, prealloc, current), None)

    # -- creation -----------------------------------------------------------

    def bdrv_co_create_opts(self, filename: str, options: dict) -> int:
        """Create (or truncate) ``filename`` with the given size: QEMU's raw_co_create_opts."""
        opts = qemu_opts_absorb_qdict(file_create_opts, dict(options))
        size = (opts.get("size", 0) + BDRV_SECTOR_SIZE - 1) // BDRV_SECTOR_SIZE * BDRV_SECTOR_SIZE
        mode = opts.get("preallocation", "off")
        try:
            prealloc = PreallocMode(mode)
        except ValueError:
            raise Error(f"Invalid preallocation mode: '{mode}'") from None
        if prealloc is PreallocMode.PREALLOC_MODE_METADATA:
            raise Error("Unsupported preallocation mode: metadata")
        if filename.startswith("file:"):
            filename = filename[len("file:"):]
        try:
            fd = os.open(filename, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise error_setg_errno(e.errno, f"Could not create '{filename}'") from None
        try:
            # Lock as a writer that resizes and lets nobody else resize, and check nobody objects.
            perm, shared = BLK_PERM_WRITE | BLK_PERM_RESIZE, BLK_PERM_ALL & ~BLK_PERM_RESIZE
            raw_apply_lock_bytes(None, fd, perm, ~shared, False)
            try:
                try:
                    raw_check_lock_bytes(fd, perm, shared)
                except Error as e:
                    e.hint = f"Is another process using the image [{filename}]?\n"
                    raise
                try:
                    os.ftruncate(fd, 0)
                except OSError as e:
                    raise error_setg_errno(e.errno, "Could not clear the file") from None
                ret = raw_regular_truncate(fd, size, prealloc, 0)
                if ret < 0:
                    raise error_setg_errno(-ret, "Could not resize file")
            finally:
                try:
                    raw_apply_lock_bytes(None, fd, 0, 0, True)
                except Error as e:
                    warn_report(e.msg)
        finally:
            os.close(fd)
        return 0


def raw_regular_truncate(fd: int, offset: int, prealloc: PreallocMode, current_length: int) -> int:
    """Resize a regular file, preallocating the new area as asked (QEMU's handle_aiocb_truncate)."""
    try:
        if prealloc is PreallocMode.PREALLOC_MODE_FALLOC and offset > current_length:
            os.posix_fallocate(fd, current_length, offset - current_length)
        elif prealloc is PreallocMode.PREALLOC_MODE_FULL and offset > current_length:
            os.ftruncate(fd, offset)
            chunk = bytes(1 << 20)
            pos = current_length
            while pos < offset:
                n = min(len(chunk), offset - pos)
                os.pwrite(fd, chunk[:n], pos)
                pos += n
            os.fsync(fd)
        else:
            os.ftruncate(fd, offset)
    except OSError as e:
        return -(e.errno or errno.EIO)
    return 0



