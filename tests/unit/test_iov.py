"""Tests for qblock.util.iov, after QEMU's tests/unit/test-iov.c plus QEMUIOVector checks.

A raw iovec array is a ``list[memoryview]``; each element here views its own
``bytearray`` so that tests can see where writes through the vector land.
"""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qblock.util.iov import (
    IOVDiscardUndo, QEMU_IOVEC_INIT_BUF, QEMUIOVector, as_view,
    iov_discard_back, iov_discard_back_undoable, iov_discard_front, iov_discard_front_undoable,
    iov_discard_undo, iov_from_buf, iov_memset, iov_size, iov_to_buf,
    qemu_iovec_add, qemu_iovec_clone, qemu_iovec_compare, qemu_iovec_concat, qemu_iovec_concat_iov,
    qemu_iovec_destroy, qemu_iovec_discard_back, qemu_iovec_from_buf, qemu_iovec_init,
    qemu_iovec_init_buf, qemu_iovec_init_external, qemu_iovec_init_slice, qemu_iovec_is_zero,
    qemu_iovec_memset, qemu_iovec_reset, qemu_iovec_slice, qemu_iovec_subvec_niov, qemu_iovec_to_buf,
)

# QEMU's iov_random(): 3..7 elements of 5..19 bytes each.
IOV_SHAPES = st.lists(st.integers(min_value=5, max_value=19), min_size=3, max_size=7)


def make_iov(lengths, fill=0):
    """Return (iov, backing): one memoryview per length, each over its own bytearray."""
    backing = [bytearray([fill & 0xFF]) * n for n in lengths]
    return [memoryview(b) for b in backing], backing


def flat(iov) -> bytes:
    return b"".join(v.tobytes() for v in iov)


def same_views(a, b) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


# ---------------------------------------------------------------------------
# Raw iovec arrays (QEMU's test-iov.c)


@settings(max_examples=30, deadline=None)
@given(IOV_SHAPES)
def test_from_to_buf(lengths):
    """iov_from_buf/iov_to_buf/iov_memset copy exactly the bytes asked for, at every offset and length."""
    iov, _ = make_iov(lengths)
    sz = iov_size(iov)
    assert sz == sum(lengths)

    ibuf = bytearray(b"aaaa" + bytes(k & 255 for k in range(sz)) + b"bbbb")
    obuf = bytearray(b"xxxx" + bytes(sz) + b"yyyy")
    src = memoryview(ibuf)
    dst = memoryview(obuf)
    pattern = ibuf[4:4 + sz]

    for i in range(sz + 1):
        assert iov_memset(iov, 0, 0xFF, sz) == sz
        assert iov_from_buf(iov, i, src[4 + i:], sz - i) == sz - i
        obuf[4 + i:4 + sz] = bytes(sz - i)
        # The destination view runs into the trailing guard, so an overrun would show there.
        assert iov_to_buf(iov, i, dst[4 + i:], sz - i) == sz - i
        assert obuf[4:4 + sz] == pattern

        n = iov_to_buf(iov, i, dst[4 + i:], 1)
        assert n == (1 if i < sz else 0)
        if n:
            assert obuf[4 + i] == i & 255

        for j in range(i, sz + 1):
            assert iov_memset(iov, 0, 0xFF, sz) == sz
            assert iov_from_buf(iov, i, src[4 + i:], j - i) == j - i
            obuf[4 + i:4 + j] = bytes(j - i)
            assert iov_to_buf(iov, i, dst[4 + i:], j - i) == j - i
            assert obuf[4:4 + sz] == pattern

            expected = bytearray(b"\xff") * sz
            expected[i:j] = pattern[i:j]
            assert flat(iov) == expected

    assert ibuf[:4] == b"aaaa" and ibuf[4 + sz:] == b"bbbb"
    assert obuf[:4] == b"xxxx" and obuf[4 + sz:] == b"yyyy"


def test_from_to_buf_zero_length_elements():
    """Empty elements anywhere in the array are skipped by copies and memset."""
    iov, backing = make_iov([0, 3, 0, 0, 2, 0])
    assert iov_size(iov) == 5
    assert iov_from_buf(iov, 0, b"abcde", 5) == 5
    assert backing[1] == b"abc" and backing[4] == b"de"
    out = bytearray(5)
    assert iov_to_buf(iov, 2, out, 5) == 3
    assert out[:3] == b"cde"
    assert iov_memset(iov, 3, 0, 10) == 2
    assert flat(iov) == b"abc\0\0"
    assert iov_to_buf(iov, 5, out, 1) == 0
    assert iov_from_buf(iov, 5, b"z", 1) == 0


def test_memset_fill_values():
    """iov_memset writes zero and non-zero fill bytes across element boundaries and stops at the end."""
    iov, _ = make_iov([3, 4, 5], fill=0x11)
    assert iov_memset(iov, 2, 0, 6) == 6
    assert flat(iov) == b"\x11\x11" + bytes(6) + b"\x11" * 4
    assert iov_memset(iov, 5, 0xAB, 100) == 7
    assert flat(iov) == b"\x11\x11" + bytes(3) + b"\xab" * 7


@settings(max_examples=50, deadline=None)
@given(IOV_SHAPES, st.data())
def test_discard_front(lengths, data):
    """iov_discard_front drops whole leading elements and advances a partly dropped one in place."""
    # Discard zero bytes.
    iov, _ = make_iov(lengths)
    orig = list(iov)
    assert iov_discard_front(iov, 0) == 0
    assert same_views(iov, orig)

    # Discard more bytes than the vector holds.
    iov, _ = make_iov(lengths)
    size = iov_size(iov)
    assert iov_discard_front(iov, size + 1) == size
    assert iov == []

    # Discard the entire vector.
    iov, _ = make_iov(lengths)
    assert iov_discard_front(iov, size) == size
    assert iov == []

    # Discard within the first element.
    iov, backing = make_iov(lengths)
    orig = list(iov)
    backing[0][:] = bytes(range(lengths[0]))
    k = data.draw(st.integers(1, lengths[0] - 1), label="k")
    assert iov_discard_front(iov, k) == k
    assert len(iov) == len(lengths)
    assert same_views(iov[1:], orig[1:])
    assert len(iov[0]) == lengths[0] - k
    assert iov[0].obj is backing[0]
    assert iov[0].tobytes() == bytes(range(k, lengths[0]))
    iov[0][0] = 0xEE
    assert backing[0][k] == 0xEE

    # Discard the entire first element.
    iov, backing = make_iov(lengths)
    second = iov[1]
    assert iov_discard_front(iov, lengths[0]) == lengths[0]
    assert len(iov) == len(lengths) - 1
    assert iov[0] is second

    # Discard within the second element.
    iov, backing = make_iov(lengths)
    backing[1][:] = bytes(range(lengths[1]))
    k = data.draw(st.integers(1, lengths[1] - 1), label="k2")
    assert iov_discard_front(iov, lengths[0] + k) == lengths[0] + k
    assert len(iov) == len(lengths) - 1
    assert len(iov[0]) == lengths[1] - k
    assert iov[0].obj is backing[1]
    assert iov[0].tobytes() == bytes(range(k, lengths[1]))
    iov[0][0] = 0xEE
    assert backing[1][k] == 0xEE


@settings(max_examples=50, deadline=None)
@given(IOV_SHAPES, st.data())
def test_discard_back(lengths, data):
    """iov_discard_back drops whole trailing elements and shortens a partly dropped one in place."""
    n = len(lengths)

    # Discard zero bytes.
    iov, _ = make_iov(lengths)
    orig = list(iov)
    assert iov_discard_back(iov, 0) == 0
    assert same_views(iov, orig)

    # Discard more bytes than the vector holds.
    iov, _ = make_iov(lengths)
    size = iov_size(iov)
    assert iov_discard_back(iov, size + 1) == size
    assert iov == []

    # Discard the entire vector.
    iov, _ = make_iov(lengths)
    assert iov_discard_back(iov, size) == size
    assert iov == []

    # Discard within the last element.
    iov, backing = make_iov(lengths)
    orig = list(iov)
    k = data.draw(st.integers(1, lengths[-1] - 1), label="k")
    assert iov_discard_back(iov, k) == k
    assert len(iov) == n
    assert same_views(iov[:-1], orig[:-1])
    assert len(iov[-1]) == lengths[-1] - k
    assert iov[-1].obj is backing[-1]
    iov[-1][0] = 0xEE
    assert backing[-1][0] == 0xEE

    # Discard the entire last element.
    iov, backing = make_iov(lengths)
    orig = list(iov)
    assert iov_discard_back(iov, lengths[-1]) == lengths[-1]
    assert len(iov) == n - 1
    assert same_views(iov, orig[:-1])

    # Discard within the second-to-last element.
    iov, backing = make_iov(lengths)
    orig = list(iov)
    k = data.draw(st.integers(1, lengths[-2] - 1), label="k2")
    assert iov_discard_back(iov, lengths[-1] + k) == lengths[-1] + k
    assert len(iov) == n - 1
    assert same_views(iov[:-1], orig[:-2])
    assert len(iov[-1]) == lengths[-2] - k
    assert iov[-1].obj is backing[-2]
    iov[-1][0] = 0xEE
    assert backing[-2][0] == 0xEE


def _discard_cases(lengths, data, back):
    """The six byte counts QEMU's discard tests use, the random ones drawn from ``data``."""
    size = sum(lengths)
    first, second = (lengths[-1], lengths[-2]) if back else (lengths[0], lengths[1])
    return [
        0,
        size + 1,
        size,
        data.draw(st.integers(1, first - 1)),
        first,
        first + data.draw(st.integers(1, second - 1)),
    ]


@settings(max_examples=50, deadline=None)
@given(IOV_SHAPES, st.data())
def test_discard_front_undo(lengths, data):
    """iov_discard_undo puts back exactly what iov_discard_front_undoable removed or trimmed."""
    for count in _discard_cases(lengths, data, back=False):
        iov, _ = make_iov(lengths)
        orig = list(iov)
        ret, undo = iov_discard_front_undoable(iov, count)
        assert ret == min(count, sum(lengths))
        iov_discard_undo(undo)
        assert same_views(iov, orig)
        assert [len(v) for v in iov] == lengths


@settings(max_examples=50, deadline=None)
@given(IOV_SHAPES, st.data())
def test_discard_back_undo(lengths, data):
    """iov_discard_undo puts back exactly what iov_discard_back_undoable removed or trimmed."""
    for count in _discard_cases(lengths, data, back=True):
        iov, _ = make_iov(lengths)
        orig = list(iov)
        ret, undo = iov_discard_back_undoable(iov, count)
        assert ret == min(count, sum(lengths))
        iov_discard_undo(undo)
        assert same_views(iov, orig)
        assert [len(v) for v in iov] == lengths


@pytest.mark.parametrize("discard", [iov_discard_front_undoable, iov_discard_back_undoable])
def test_discard_undo_caller_record(discard):
    """A caller-supplied IOVDiscardUndo is filled in, as QEMU's out-parameter is, so undoing it restores the list."""
    iov, _ = make_iov([5, 6, 7])
    orig = list(iov)
    undo = IOVDiscardUndo()
    ret, returned = discard(iov, 8, undo)
    assert ret == 8
    assert returned is undo
    assert len(iov) == 2
    iov_discard_undo(undo)
    assert same_views(iov, orig)


# ---------------------------------------------------------------------------
# QEMUIOVector


def test_qemu_iovec_init_add_growth():
    """qemu_iovec_add appends without copying and grows nalloc to 2 * nalloc + 1 when full."""
    qiov = qemu_iovec_init(QEMUIOVector(), 1)
    assert (qiov.niov, qiov.nalloc, qiov.size) == (0, 1, 0)
    bufs = [bytearray(n) for n in (4, 5, 6, 7, 8)]
    expected_nalloc = [1, 3, 3, 7, 7]
    for buf, nalloc in zip(bufs, expected_nalloc):
        qemu_iovec_add(qiov, buf)
        assert qiov.nalloc == nalloc
    assert qiov.niov == 5
    assert qiov.size == 30
    assert qemu_iovec_from_buf(qiov, 0, bytes(range(30)), 30) == 30
    assert bufs[0] == bytes(range(4)) and bufs[4] == bytes(range(22, 30))


def test_qemu_iovec_add_len():
    """qemu_iovec_add with a length adds only that prefix of the buffer."""
    qiov = qemu_iovec_init(None, 4)
    buf = bytearray(b"0123456789")
    qemu_iovec_add(qiov, buf, 4)
    qemu_iovec_add(qiov, memoryview(buf)[6:], 2)
    assert qiov.size == 6
    out = bytearray(6)
    assert qemu_iovec_to_buf(qiov, 0, out, 6) == 6
    assert out == b"012367"


def test_qemu_iovec_add_zero_copy():
    """Bytes written through a vector land in the bytearray that was added to it."""
    buf = bytearray(8)
    qiov = qemu_iovec_init()
    qemu_iovec_add(qiov, buf)
    qemu_iovec_from_buf(qiov, 2, b"xyz", 3)
    assert buf == b"\0\0xyz\0\0\0"
    qiov.iov[0][0] = ord("A")
    assert buf[0] == ord("A")


def test_qemu_iovec_add_external_raises():
    """qemu_iovec_add on an external vector raises, as QEMU asserts."""
    qiov = qemu_iovec_init_external(QEMUIOVector(), [bytearray(4), bytearray(2)])
    assert qiov.nalloc == -1
    assert qiov.size == 6
    with pytest.raises(ValueError):
        qemu_iovec_add(qiov, bytearray(1))
    assert qiov.niov == 2 and qiov.size == 6


def test_qemu_iovec_add_embedded_raises():
    """qemu_iovec_add on a vector made by qemu_iovec_init_buf or QEMU_IOVEC_INIT_BUF raises."""
    buf = bytearray(16)
    for qiov in (qemu_iovec_init_buf(QEMUIOVector(), buf, 8), QEMU_IOVEC_INIT_BUF(buf, 8)):
        assert qiov.nalloc == -1
        assert qiov.niov == 1 and qiov.size == 8
        with pytest.raises(ValueError):
            qemu_iovec_add(qiov, bytearray(1))
        qemu_iovec_memset(qiov, 0, 0x5A, 8)
        assert buf[:8] == b"\x5a" * 8 and buf[8:] == bytes(8)
        buf[:] = bytes(16)
    assert QEMU_IOVEC_INIT_BUF(buf).size == 16


def test_qemu_iovec_external_shares_memory():
    """An external vector views the caller's buffers rather than copying them."""
    a, b = bytearray(3), bytearray(3)
    qiov = qemu_iovec_init_external(QEMUIOVector(), [a, memoryview(b)])
    qemu_iovec_from_buf(qiov, 0, b"abcdef", 6)
    assert (a, b) == (b"abc", b"def")


def test_qemu_iovec_concat():
    """qemu_iovec_concat appends a byte range of another vector as views of the same memory."""
    a, b, c = bytearray(b"aaaa"), bytearray(b"bbbb"), bytearray(b"cccc")
    src = qemu_iovec_init()
    for buf in (a, b, c):
        qemu_iovec_add(src, buf)
    dst = qemu_iovec_init()
    qemu_iovec_add(dst, bytearray(b"--"))
    qemu_iovec_concat(dst, src, 2, 8)
    assert dst.size == 10
    assert [len(v) for v in dst.iov] == [2, 2, 4, 2]
    out = bytearray(10)
    qemu_iovec_to_buf(dst, 0, out, 10)
    assert out == b"--aabbbbcc"
    qemu_iovec_memset(dst, 2, ord("Z"), 8)
    assert (a, b, c) == (b"aaZZ", b"ZZZZ", b"ZZcc")


def test_qemu_iovec_concat_edges():
    """Concatenating zero bytes adds nothing, and asking for more bytes than the source holds raises."""
    src = qemu_iovec_init()
    qemu_iovec_add(src, bytearray(4))
    dst = qemu_iovec_init()
    qemu_iovec_concat(dst, src, 4, 0)
    assert (dst.niov, dst.size) == (0, 0)
    with pytest.raises(ValueError):
        qemu_iovec_concat(dst, src, 2, 3)
    assert qemu_iovec_concat_iov(dst, src.iov, 1, 3) == 3
    assert dst.size == 3


def test_qemu_iovec_slice():
    """qemu_iovec_slice returns views trimmed at both ends that share the vector's memory."""
    bufs = [bytearray(b"0123"), bytearray(b"4567"), bytearray(b"89ab")]
    qiov = qemu_iovec_init()
    for buf in bufs:
        qemu_iovec_add(qiov, buf)
    views = qemu_iovec_slice(qiov, 3, 6)
    assert [v.tobytes() for v in views] == [b"3", b"4567", b"8"]
    assert qemu_iovec_subvec_niov(qiov, 3, 6) == 3
    assert qemu_iovec_subvec_niov(qiov, 4, 4) == 1
    views[2][0] = ord("!")
    assert bufs[2] == b"!9ab"
    assert qemu_iovec_slice(qiov, 12, 0) == []
    with pytest.raises(ValueError):
        qemu_iovec_slice(qiov, 10, 3)


def test_qemu_iovec_init_slice():
    """qemu_iovec_init_slice builds an embedded vector for one element and a growable one otherwise, both zero-copy."""
    bufs = [bytearray(b"0123"), bytearray(b"4567"), bytearray(b"89ab")]
    src = qemu_iovec_init()
    for buf in bufs:
        qemu_iovec_add(src, buf)

    one = qemu_iovec_init_slice(QEMUIOVector(), src, 5, 2)
    assert (one.niov, one.size, one.nalloc) == (1, 2, -1)
    with pytest.raises(ValueError):
        qemu_iovec_add(one, bytearray(1))

    many = qemu_iovec_init_slice(QEMUIOVector(), src, 2, 8)
    assert many.niov == 3 and many.size == 8 and many.nalloc != -1
    out = bytearray(8)
    qemu_iovec_to_buf(many, 0, out, 8)
    assert out == b"23456789"
    qemu_iovec_memset(many, 0, ord("."), 8)
    assert bufs == [bytearray(b"01.."), bytearray(b"...."), bytearray(b"..ab")]
    qemu_iovec_add(many, bytearray(b"tail"))
    assert many.size == 12


def test_qemu_iovec_to_from_buf_memset():
    """qemu_iovec_to_buf, qemu_iovec_from_buf and qemu_iovec_memset return how many bytes they handled."""
    qiov = qemu_iovec_init()
    for n in (3, 1, 4):
        qemu_iovec_add(qiov, bytearray(n))
    assert qemu_iovec_from_buf(qiov, 1, b"abcdefgh", 8) == 7
    out = bytearray(10)
    assert qemu_iovec_to_buf(qiov, 0, out, 10) == 8
    assert out[:8] == b"\0abcdefg"
    assert qemu_iovec_memset(qiov, 6, 0, 5) == 2
    assert qemu_iovec_to_buf(qiov, 0, out, 8) == 8
    assert out[:8] == b"\0abcde\0\0"
    assert qemu_iovec_to_buf(qiov, 8, out, 1) == 0


def test_qemu_iovec_compare():
    """qemu_iovec_compare returns the offset of the first differing byte, or -1 when equal."""
    a = qemu_iovec_init()
    b = qemu_iovec_init()
    for n in (3, 4, 2):
        qemu_iovec_add(a, bytearray(range(n)))
        qemu_iovec_add(b, bytearray(range(n)))
    assert qemu_iovec_compare(a, b) == -1
    b.iov[1][2] = 99
    assert qemu_iovec_compare(a, b) == 5
    a.iov[0][1] = 42
    assert qemu_iovec_compare(a, b) == 1
    b.iov[0][1] = 42
    b.iov[1][2] = 2
    b.iov[2][1] = 7
    assert qemu_iovec_compare(a, b) == 8
    other = qemu_iovec_init()
    qemu_iovec_add(other, bytearray(9))
    with pytest.raises(ValueError):
        qemu_iovec_compare(a, other)


def test_qemu_iovec_is_zero():
    """qemu_iovec_is_zero looks only at the requested byte range."""
    qiov = qemu_iovec_init()
    for n in (4, 4, 4):
        qemu_iovec_add(qiov, bytearray(n))
    assert qemu_iovec_is_zero(qiov, 0, 12)
    qiov.iov[1][1] = 1
    assert not qemu_iovec_is_zero(qiov, 0, 12)
    assert qemu_iovec_is_zero(qiov, 0, 5)
    assert not qemu_iovec_is_zero(qiov, 5, 1)
    assert qemu_iovec_is_zero(qiov, 6, 6)
    assert qemu_iovec_is_zero(qiov, 12, 0)


def test_qemu_iovec_discard_back():
    """qemu_iovec_discard_back shrinks the vector's elements and size, and refuses to discard more than it holds."""
    qiov = qemu_iovec_init()
    for n in (4, 4, 4):
        qemu_iovec_add(qiov, bytearray(n))
    qemu_iovec_discard_back(qiov, 5)
    assert qiov.size == 7
    assert [len(v) for v in qiov.iov] == [4, 3]
    qemu_iovec_discard_back(qiov, 0)
    assert qiov.size == 7
    with pytest.raises(ValueError):
        qemu_iovec_discard_back(qiov, 8)
    qemu_iovec_discard_back(qiov, 7)
    assert (qiov.niov, qiov.size) == (0, 0)


def test_qemu_iovec_clone():
    """qemu_iovec_clone gives the destination the source's shape over the given buffer."""
    src = qemu_iovec_init()
    for n in (2, 5, 3):
        qemu_iovec_add(src, bytearray(n))
    dest = qemu_iovec_init()
    qemu_iovec_add(dest, bytearray(b"old"))
    bounce = bytearray(10)
    qemu_iovec_clone(dest, src, bounce)
    assert [len(v) for v in dest.iov] == [2, 5, 3]
    assert dest.size == 10
    qemu_iovec_from_buf(dest, 0, b"0123456789", 10)
    assert bounce == b"0123456789"


def test_qemu_iovec_reset_destroy():
    """qemu_iovec_reset empties a growable vector (and refuses an external one); qemu_iovec_destroy clears any."""
    qiov = qemu_iovec_init(None, 2)
    qemu_iovec_add(qiov, bytearray(3))
    qemu_iovec_reset(qiov)
    assert (qiov.niov, qiov.size) == (0, 0)
    qemu_iovec_add(qiov, bytearray(2))
    assert qiov.size == 2
    qemu_iovec_destroy(qiov)
    assert (qiov.niov, qiov.size, qiov.nalloc) == (0, 0, 0)

    ext = qemu_iovec_init_external(QEMUIOVector(), [bytearray(3)])
    with pytest.raises(ValueError):
        qemu_iovec_reset(ext)
    qemu_iovec_destroy(ext)
    assert (ext.niov, ext.size, ext.nalloc) == (0, 0, 0)


def test_as_view_flattens():
    """as_view turns any contiguous buffer into a flat byte view over the same memory."""
    import array

    arr = array.array("I", [0, 0])
    v = as_view(arr)
    assert v.format == "B" and v.ndim == 1 and len(v) == 2 * arr.itemsize
    v[:] = b"\xff" * len(v)
    assert arr[0] == arr[1] == (1 << (8 * arr.itemsize)) - 1


# ---------------------------------------------------------------------------
# QEMUIOVector against a plain bytes model

_OPS = st.sampled_from(["to_buf", "from_buf", "memset", "is_zero", "concat", "slice", "init_slice",
                        "discard_back"])


@settings(max_examples=75, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=12), min_size=1, max_size=6),
       st.data())
def test_qemu_iovec_model(lengths, data):
    """Random QEMUIOVector operations agree with the same operations on a flat bytearray."""
    backing = [bytearray(data.draw(st.binary(min_size=n, max_size=n))) for n in lengths]
    qiov = qemu_iovec_init(None, 1)
    for buf in backing:
        qemu_iovec_add(qiov, buf)

    def model() -> bytes:
        return b"".join(bytes(b) for b in backing)

    def read(q) -> bytes:
        out = bytearray(q.size)
        assert qemu_iovec_to_buf(q, 0, out, q.size) == q.size
        return bytes(out)

    for _ in range(data.draw(st.integers(1, 8), label="steps")):
        size = qiov.size
        assert size == len(model()) == iov_size(qiov.iov)
        op = data.draw(_OPS, label="op")
        off = data.draw(st.integers(0, size), label="offset")
        n = data.draw(st.integers(0, size - off), label="bytes")
        if op == "to_buf":
            extra = data.draw(st.integers(0, 3), label="overshoot")
            want = min(n + extra, size - off)
            out = bytearray(n + extra)
            assert qemu_iovec_to_buf(qiov, off, out, n + extra) == want
            assert bytes(out[:want]) == model()[off:off + want]
        elif op == "from_buf":
            payload = data.draw(st.binary(min_size=n, max_size=n), label="payload")
            expected = bytearray(model())
            expected[off:off + n] = payload
            assert qemu_iovec_from_buf(qiov, off, payload, n) == n
            assert model() == expected
        elif op == "memset":
            fill = data.draw(st.integers(0, 255), label="fill")
            extra = data.draw(st.integers(0, 3), label="overshoot")
            want = min(n + extra, size - off)
            expected = bytearray(model())
            expected[off:off + want] = bytes([fill]) * want
            assert qemu_iovec_memset(qiov, off, fill, n + extra) == want
            assert model() == expected
        elif op == "is_zero":
            assert qemu_iovec_is_zero(qiov, off, n) == (model()[off:off + n] == bytes(n))
        elif op == "concat":
            dst = qemu_iovec_init()
            head = bytearray(b"#")
            qemu_iovec_add(dst, head)
            qemu_iovec_concat(dst, qiov, off, n)
            assert dst.size == n + 1
            assert read(dst) == b"#" + model()[off:off + n]
            if n:
                fill = data.draw(st.integers(0, 255), label="fill")
                expected = bytearray(model())
                expected[off:off + n] = bytes([fill]) * n
                qemu_iovec_memset(dst, 1, fill, n)
                assert model() == expected
        elif op == "slice":
            views = qemu_iovec_slice(qiov, off, n)
            assert b"".join(v.tobytes() for v in views) == model()[off:off + n]
            assert all(len(v) for v in views)
            assert qemu_iovec_subvec_niov(qiov, off, n) == len(views)
        elif op == "init_slice":
            sl = qemu_iovec_init_slice(QEMUIOVector(), qiov, off, n)
            assert sl.size == n
            assert read(sl) == model()[off:off + n]
            if n:
                payload = data.draw(st.binary(min_size=n, max_size=n), label="payload")
                expected = bytearray(model())
                expected[off:off + n] = payload
                qemu_iovec_from_buf(sl, 0, payload, n)
                assert model() == expected
        elif op == "discard_back":
            expected = model()[:size - n]
            qemu_iovec_discard_back(qiov, n)
            assert qiov.size == size - n
            assert read(qiov) == expected
            # Keep the model in step: it is the bytes the vector still covers.
            backing = [bytearray(v.tobytes()) for v in qiov.iov]
            qiov = qemu_iovec_init(None, 1)
            for buf in backing:
                qemu_iovec_add(qiov, buf)
