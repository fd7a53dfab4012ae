"""An example filter driver for qblock: every byte is XORed with a key on its way to the child and back.

It is the driver ``docs/writing-a-driver.md`` builds step by step.  It sits
on a ``file`` child (any node), takes one option, ``key``, and shows the
three decisions every filter makes:

* which hooks pass straight through (flush is the block layer's job: it
  flushes every child written through);
* which hooks must NOT pass through: zeroes and discard on the child would
  read back as the key, not as zeroes or the old data, so the driver leaves
  ``bdrv_co_pwrite_zeroes`` and ``bdrv_co_pdiscard`` unset and the block layer
  falls back to writing a zeroed buffer (and treats discard as a no-op);
* never change the caller's buffer: writes go through a bounce buffer.
"""
from __future__ import annotations

import attrs

from qblock.block.driver import BDRV_REQ_FUA, BlockDriver
from qblock.block.graph import bdrv_open_child, child_format
from qblock.block.io import bdrv_co_preadv, bdrv_co_pwritev
from qblock.trace.control import trace_events_declare
from qblock.util.error import Error
from qblock.util.iov import QEMUIOVector, qemu_iovec_to_buf
from qblock.util.qemu_option import QEMU_OPT_NUMBER, QemuOptDesc, QemuOptsList, qemu_opts_absorb_qdict

_events = trace_events_declare('''
# qblock_xor.py
xor_co_preadv(void *bs, int64_t offset, int64_t bytes) "bs %p offset %" PRId64 " bytes %" PRId64
xor_co_pwritev(void *bs, int64_t offset, int64_t bytes, int flags) "bs %p offset %" PRId64 " bytes %" PRId64 " flags 0x%x"
''')
trace_xor_co_preadv = _events["trace_xor_co_preadv"]
trace_xor_co_pwritev = _events["trace_xor_co_pwritev"]

xor_opts = QemuOptsList("xor", [QemuOptDesc("key", QEMU_OPT_NUMBER, "the byte every byte is XORed with")])


@attrs.define
class BDRVXorState:
    key: int = 0x5A
    table: bytes = b""


def _xor(data: bytes | bytearray, table: bytes) -> bytes:
    return bytes(data).translate(table)


class XorDriver(BlockDriver):
    format_name = "xor"
    state_class = BDRVXorState
    runtime_opts = xor_opts
    is_filter = False   # it changes the data, so it is a format-like node, not a transparent filter

    def bdrv_open(self, bs, options: dict, flags: int) -> int:
        s: BDRVXorState = bs.opaque
        opts = qemu_opts_absorb_qdict(xor_opts, options)
        s.key = opts.get("key", 0x5A)
        if not 0 <= s.key <= 255:
            raise Error(f"Parameter 'key' must be a byte value (0-255), not {s.key}")
        s.table = bytes(i ^ s.key for i in range(256))
        bdrv_open_child(None, options, "file", bs, child_role=child_format)
        bs.supported_write_flags = BDRV_REQ_FUA & bs.file.bs.supported_write_flags
        return 0

    def bdrv_getlength(self, bs) -> int:
        from qblock.block.graph import bdrv_getlength
        return bdrv_getlength(bs.file.bs)

    def bdrv_co_preadv(self, bs, offset: int, bytes: int, qiov: QEMUIOVector, flags: int) -> int:
        trace_xor_co_preadv(bs, offset, bytes)
        ret = bdrv_co_preadv(bs.file, offset, bytes, qiov, flags)
        if ret < 0:
            return ret
        table = bs.opaque.table
        for v in qiov.iov:          # decode in place: the buffer is ours to fill
            v[:] = _xor(v, table)
        return 0

    def bdrv_co_pwritev(self, bs, offset: int, bytes: int, qiov: QEMUIOVector, flags: int) -> int:
        trace_xor_co_pwritev(bs, offset, bytes, flags)
        bounce = bytearray(bytes)
        qemu_iovec_to_buf(qiov, 0, bounce, bytes)
        encoded = _xor(bounce, bs.opaque.table)
        return bdrv_co_pwritev(bs.file, offset, bytes, QEMUIOVector([memoryview(encoded)], -1), flags)
