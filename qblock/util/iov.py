"""I/O vectors: QEMU's util/iov.c and include/qemu/iov.h.

A :class:`QEMUIOVector` is a list of ``memoryview`` slices over buffers that
belong to someone else (guest memory, a bounce buffer, a driver's buffer).
Building, slicing and concatenating vectors never copies bytes; only the
functions whose job is to copy (``*_to_buf``, ``*_from_buf``, ``memset``)
touch data.

``nalloc == -1`` marks a vector that wraps storage it may not grow (QEMU's
external and embedded vectors: ``qemu_iovec_init_external``,
``qemu_iovec_init_buf``); ``qemu_iovec_add`` on one raises, as QEMU asserts.

The raw ``iov_*`` helpers work on a plain list of memoryviews (QEMU's
``struct iovec`` array) and mutate it in place where QEMU moves pointers.
"""
from __future__ import annotations

import builtins
from typing import Iterable, Sequence

import attrs

__all__ = [
    "QEMUIOVector", "IOVDiscardUndo", "QEMU_IOVEC_INIT_BUF", "as_view",
    "iov_size", "iov_from_buf", "iov_to_buf", "iov_memset", "iov_discard_front", "iov_discard_back",
    "iov_discard_front_undoable", "iov_discard_back_undoable", "iov_discard_undo",
    "qemu_iovec_init", "qemu_iovec_init_external", "qemu_iovec_init_buf", "qemu_iovec_add",
    "qemu_iovec_concat", "qemu_iovec_concat_iov", "qemu_iovec_init_slice", "qemu_iovec_slice",
    "qemu_iovec_reset", "qemu_iovec_destroy", "qemu_iovec_clone", "qemu_iovec_to_buf",
    "qemu_iovec_from_buf", "qemu_iovec_memset", "qemu_iovec_compare", "qemu_iovec_is_zero",
    "qemu_iovec_discard_back", "qemu_iovec_subvec_niov",
]

_ZERO_CHUNK = bytes(65536)


def as_view(buf) -> memoryview:
    """A flat, byte-format memoryview of ``buf`` (no copy)."""
    v = buf if isinstance(buf, memoryview) else memoryview(buf)
    if v.format != "B" or v.ndim != 1:
        v = v.cast("B")
    return v


# ---------------------------------------------------------------------------
# Raw iovec arrays: list[memoryview]


def iov_size(iov: Iterable[memoryview]) -> int:
    return sum(len(v) for v in iov)


def iov_from_buf(iov: Sequence[memoryview], offset: int, buf, bytes: int) -> int:
    """Copy ``bytes`` bytes of ``buf`` into the vector from ``offset``; returns how many fitted."""
    src = as_view(buf)
    done = 0
    for v in iov:
        n = len(v)
        if offset >= n:
            offset -= n
            continue
        take = min(n - offset, bytes - done)
        if take <= 0:
            break
        v[offset:offset + take] = src[done:done + take]
        done += take
        offset = 0
        if done == bytes:
            break
    return done


def iov_to_buf(iov: Sequence[memoryview], offset: int, buf, bytes: int) -> int:
    """Copy ``bytes`` bytes of the vector from ``offset`` into ``buf``; returns how many were there."""
    dst = as_view(buf)
    done = 0
    for v in iov:
        n = len(v)
        if offset >= n:
            offset -= n
            continue
        take = min(n - offset, bytes - done)
        if take <= 0:
            break
        dst[done:done + take] = v[offset:offset + take]
        done += take
        offset = 0
        if done == bytes:
            break
    return done


def iov_memset(iov: Sequence[memoryview], offset: int, fillc: int, bytes: int) -> int:
    """Set ``bytes`` bytes from ``offset`` to ``fillc``; returns how many were set."""
    done = 0
    pattern = None
    for v in iov:
        n = len(v)
        if offset >= n:
            offset -= n
            continue
        take = min(n - offset, bytes - done)
        if take <= 0:
            break
        if fillc == 0:
            pos = offset
            end = offset + take
            while pos < end:
                k = min(end - pos, len(_ZERO_CHUNK))
                v[pos:pos + k] = _ZERO_CHUNK[:k]
                pos += k
        else:
            if pattern is None or builtins.len(pattern) < take:
                pattern = builtins.bytes([fillc & 0xFF]) * take
            v[offset:offset + take] = pattern[:take]
        done += take
        offset = 0
        if done == bytes:
            break
    return done


@attrs.define(eq=False)
class IOVDiscardUndo:
    """What iov_discard_*_undoable changed, so iov_discard_undo can put it back."""

    iov: list = attrs.field(factory=list)
    saved: list = attrs.field(factory=list)


def iov_discard_front(iov: list[memoryview], bytes: int) -> int:
    """Drop ``bytes`` bytes from the front of ``iov`` in place; returns how many were dropped."""
    total = 0
    while iov and bytes > 0:
        first = iov[0]
        if len(first) <= bytes:
            bytes -= len(first)
            total += len(first)
            del iov[0]
        else:
            iov[0] = first[bytes:]
            total += bytes
            bytes = 0
    return total


def iov_discard_back(iov: list[memoryview], bytes: int) -> int:
    """Drop ``bytes`` bytes from the end of ``iov`` in place; returns how many were dropped."""
    total = 0
    while iov and bytes > 0:
        last = iov[-1]
        if len(last) <= bytes:
            bytes -= len(last)
            total += len(last)
            del iov[-1]
        else:
            iov[-1] = last[:len(last) - bytes]
            total += bytes
            bytes = 0
    return total


def _iov_discard_undo_record(iov: list[memoryview], undo: IOVDiscardUndo | None) -> IOVDiscardUndo:
    """Fill ``undo`` (QEMU's out-parameter) or a new record with what ``iov`` holds now."""
    if undo is None:
        return IOVDiscardUndo(iov, list(iov))
    undo.iov = iov
    undo.saved = list(iov)
    return undo


def iov_discard_front_undoable(iov: list[memoryview], bytes: int, undo: IOVDiscardUndo | None = None):
    """iov_discard_front, recording what to restore in ``undo`` (or a new record); returns (dropped, undo)."""
    undo = _iov_discard_undo_record(iov, undo)
    return iov_discard_front(iov, bytes), undo


def iov_discard_back_undoable(iov: list[memoryview], bytes: int, undo: IOVDiscardUndo | None = None):
    """iov_discard_back, recording what to restore in ``undo`` (or a new record); returns (dropped, undo)."""
    undo = _iov_discard_undo_record(iov, undo)
    return iov_discard_back(iov, bytes), undo


def iov_discard_undo(undo: IOVDiscardUndo) -> None:
    undo.iov[:] = undo.saved


# ---------------------------------------------------------------------------
# QEMUIOVector


class QEMUIOVector:
    """A scatter/gather list of memoryviews with its total ``size`` (QEMU's QEMUIOVector)."""

    __slots__ = ("iov", "nalloc", "size")

    def __init__(self, iov: list[memoryview] | None = None, nalloc: int = 0):
        self.iov: list[memoryview] = iov if iov is not None else []
        self.nalloc = nalloc
        self.size = sum(len(v) for v in self.iov)

    @property
    def niov(self) -> int:
        return len(self.iov)

    def __repr__(self) -> str:
        return f"<QEMUIOVector niov={len(self.iov)} size={self.size}>"


def QEMU_IOVEC_INIT_BUF(buf, len: int | None = None) -> QEMUIOVector:
    """A one-element vector over ``buf`` (QEMU's embedded vector: it cannot grow)."""
    v = as_view(buf)
    if len is not None:
        v = v[:len]
    return QEMUIOVector([v], -1)


def qemu_iovec_init(qiov: QEMUIOVector | None = None, alloc_hint: int = 1) -> QEMUIOVector:
    """An empty vector that qemu_iovec_add may grow."""
    if qiov is None:
        return QEMUIOVector([], max(alloc_hint, 1))
    qiov.iov = []
    qiov.nalloc = max(alloc_hint, 1)
    qiov.size = 0
    return qiov


def qemu_iovec_init_external(qiov: QEMUIOVector, iov: list) -> QEMUIOVector:
    """Wrap an existing list of buffers; the vector cannot grow."""
    qiov.iov = [as_view(v) for v in iov]
    qiov.nalloc = -1
    qiov.size = sum(len(v) for v in qiov.iov)
    return qiov


def qemu_iovec_init_buf(qiov: QEMUIOVector, buf, len: int | None = None) -> QEMUIOVector:
    v = as_view(buf)
    if len is not None:
        v = v[:len]
    qiov.iov = [v]
    qiov.nalloc = -1
    qiov.size = v.nbytes
    return qiov


def qemu_iovec_add(qiov: QEMUIOVector, base, len: int | None = None) -> None:
    """Append ``base[:len]`` (no copy). Raises on an external or embedded vector."""
    if qiov.nalloc == -1:
        raise ValueError("qemu_iovec_add on an external or embedded QEMUIOVector")
    v = as_view(base)
    if len is not None:
        v = v[:len]
    if qiov.niov == qiov.nalloc:
        qiov.nalloc = 2 * qiov.nalloc + 1
    qiov.iov.append(v)
    qiov.size += v.nbytes


def qemu_iovec_concat_iov(dst: QEMUIOVector, src_iov: Sequence[memoryview], soffset: int, sbytes: int) -> int:
    """Append ``sbytes`` bytes of ``src_iov`` starting at ``soffset`` to ``dst``; returns bytes added."""
    held = max(iov_size(src_iov) - soffset, 0)
    if held < sbytes:
        # Checked before adding anything, so a failed call leaves ``dst`` as it was.
        raise ValueError(f"qemu_iovec_concat_iov: source holds only {held} of {sbytes} bytes")
    done = 0
    for v in src_iov:
        if done >= sbytes:
            break
        n = len(v)
        if soffset < n:
            take = min(n - soffset, sbytes - done)
            qemu_iovec_add(dst, v[soffset:soffset + take])
            done += take
            soffset = 0
        else:
            soffset -= n
    return done


def qemu_iovec_concat(dst: QEMUIOVector, src: QEMUIOVector, soffset: int, sbytes: int) -> None:
    """Append ``sbytes`` bytes of ``src`` from ``soffset`` to ``dst`` (no copy)."""
    qemu_iovec_concat_iov(dst, src.iov, soffset, sbytes)


def qemu_iovec_slice(qiov: QEMUIOVector, offset: int, len: int) -> list[memoryview]:
    """The views covering ``len`` bytes of ``qiov`` from ``offset``, trimmed at both ends."""
    if offset + len > qiov.size:
        raise ValueError(f"qemu_iovec_slice: [{offset}, +{len}) beyond vector size {qiov.size}")
    out = []
    done = 0
    for v in qiov.iov:
        if done >= len:
            break
        n = v.nbytes
        if offset < n:
            take = min(n - offset, len - done)
            out.append(v[offset:offset + take] if (offset or take != n) else v)
            done += take
            offset = 0
        else:
            offset -= n
    return out


def qemu_iovec_subvec_niov(qiov: QEMUIOVector, offset: int, len: int) -> int:
    return builtins.len(qemu_iovec_slice(qiov, offset, len))


def qemu_iovec_init_slice(qiov: QEMUIOVector, source: QEMUIOVector, offset: int, len: int) -> QEMUIOVector:
    """Make ``qiov`` a view of ``len`` bytes of ``source`` from ``offset``."""
    views = qemu_iovec_slice(source, offset, len)
    qiov.iov = views
    qiov.nalloc = -1 if builtins.len(views) == 1 else max(builtins.len(views), 1)
    qiov.size = len
    return qiov


def qemu_iovec_reset(qiov: QEMUIOVector) -> None:
    if qiov.nalloc == -1:
        raise ValueError("qemu_iovec_reset on an external or embedded QEMUIOVector")
    qiov.iov = []
    qiov.size = 0


def qemu_iovec_destroy(qiov: QEMUIOVector) -> None:
    qiov.iov = []
    qiov.nalloc = 0
    qiov.size = 0


def qemu_iovec_clone(dest: QEMUIOVector, src: QEMUIOVector, buf) -> None:
    """Give ``dest`` the shape of ``src`` over the bytes of ``buf`` (bounce buffers)."""
    b = as_view(buf)
    qemu_iovec_reset(dest)
    pos = 0
    for v in src.iov:
        qemu_iovec_add(dest, b[pos:pos + v.nbytes])
        pos += v.nbytes


def qemu_iovec_to_buf(qiov: QEMUIOVector, offset: int, buf, bytes: int) -> int:
    return iov_to_buf(qiov.iov, offset, buf, bytes)


def qemu_iovec_from_buf(qiov: QEMUIOVector, offset: int, buf, bytes: int) -> int:
    return iov_from_buf(qiov.iov, offset, buf, bytes)


def qemu_iovec_memset(qiov: QEMUIOVector, offset: int, fillc: int, bytes: int) -> int:
    return iov_memset(qiov.iov, offset, fillc, bytes)


def qemu_iovec_compare(a: QEMUIOVector, b: QEMUIOVector) -> int:
    """Offset of the first byte where two same-shaped vectors differ, or -1."""
    if a.niov != b.niov:
        raise ValueError("qemu_iovec_compare: vectors of different shapes")
    offset = 0
    for va, vb in zip(a.iov, b.iov):
        if va.nbytes != vb.nbytes:
            raise ValueError("qemu_iovec_compare: vectors of different shapes")
        if va != vb:
            ba, bb = va.tobytes(), vb.tobytes()
            for i in range(len(ba)):
                if ba[i] != bb[i]:
                    return offset + i
        offset += va.nbytes
    return -1


def _view_is_zero(v: memoryview) -> bool:
    n = v.nbytes
    pos = 0
    while pos < n:
        k = min(n - pos, len(_ZERO_CHUNK))
        if v[pos:pos + k] != _ZERO_CHUNK[:k]:
            return False
        pos += k
    return True


def qemu_iovec_is_zero(qiov: QEMUIOVector, offset: int, bytes: int) -> bool:
    """True when the ``bytes`` bytes from ``offset`` are all zero."""
    return all(_view_is_zero(v) for v in qemu_iovec_slice(qiov, offset, bytes))


def qemu_iovec_discard_back(qiov: QEMUIOVector, bytes: int) -> None:
    """Shrink the vector by ``bytes`` bytes at its end."""
    if bytes > qiov.size:
        raise ValueError("qemu_iovec_discard_back: more bytes than the vector holds")
    iov_discard_back(qiov.iov, bytes)
    qiov.size -= bytes
