"""A logging filter: one line per request and one per completion, like nbdkit's log filter.

Put a ``log`` node on any edge of the graph to see exactly what one layer
hands the next::

    driver=log,logfile=/tmp/q.log,file.driver=qcow2,file.file.driver=file,...

Each line is ``key=value`` pairs in a fixed order, easy to parse::

    ts=1000000 node=log0 op=write id=3 req=7 offset=0x1000 count=0x1000 flags=0x10 fua=1
    ts=1000000 node=log0 op=write return id=3 ret=0 elapsed_ns=0

``ts`` is the virtual clock in qtest mode and the realtime clock otherwise;
``id`` numbers the requests of this node; ``req`` is the request id the
request is served for (the guest request, when there is one).  Operations:
read, write, write-zeroes, discard, flush.  Options: ``logfile`` (default:
stderr) and a ``file`` child.  Not in QEMU (nbdkit's idea, QEMU's names).
"""
from __future__ import annotations

import itertools
import sys
from typing import Any, TextIO

import attrs

from qblock.block.driver import (
    BDRV_REQ_FUA,
    BlockDriver,
    bdrv_register,
)
from qblock.block.graph import bdrv_pass_supported_flags, bdrv_getlength, bdrv_open_child, child_format
from qblock.block.io import (
    bdrv_co_block_status_from_file,
    bdrv_co_flush,
    bdrv_co_pdiscard,
    bdrv_co_preadv,
    bdrv_co_pwrite_zeroes,
    bdrv_co_pwritev,
)
from qblock.util.coroutine import request_id_get
from qblock.util.error import error_setg_errno
from qblock.util.qemu_option import QEMU_OPT_STRING, QemuOptDesc, QemuOptsList, qemu_opts_absorb_qdict
from qblock.util.timer import QEMU_CLOCK_REALTIME, QEMU_CLOCK_VIRTUAL, qemu_clock_get_ns, qtest_enabled

log_opts = QemuOptsList("log", [QemuOptDesc("logfile", QEMU_OPT_STRING, "where the lines go (default: stderr)")])


@attrs.define
class BDRVLogState:
    logfile: TextIO | None = None
    owns_file: bool = False
    ids: Any = attrs.field(factory=lambda: itertools.count(1))


def _clock() -> int:
    return QEMU_CLOCK_VIRTUAL if qtest_enabled() else QEMU_CLOCK_REALTIME


class LogDriver(BlockDriver):
    format_name = "log"
    state_class = BDRVLogState
    runtime_opts = log_opts
    is_filter = True

    def bdrv_open(self, bs, options: dict, flags: int) -> int:
        s: BDRVLogState = bs.opaque
        opts = qemu_opts_absorb_qdict(log_opts, options)
        path = opts.get("logfile")
        if path:
            try:
                s.logfile = open(path, "a", encoding="utf-8", buffering=1)
            except OSError as e:
                raise error_setg_errno(e.errno, f"Could not open log file '{path}'") from None
            s.owns_file = True
        bdrv_open_child(None, options, "file", bs, child_role=child_format)
        bdrv_pass_supported_flags(bs)
        return 0

    def bdrv_close(self, bs) -> None:
        s: BDRVLogState = bs.opaque
        if s.owns_file and s.logfile is not None:
            s.logfile.close()
        s.logfile = None

    def bdrv_getlength(self, bs) -> int:
        return bdrv_getlength(bs.file.bs)

    # -- logging ----------------------------------------------------------

    def _line(self, bs, text: str) -> None:
        s: BDRVLogState = bs.opaque
        f = s.logfile or sys.stderr
        f.write(f"ts={qemu_clock_get_ns(_clock())} node={bs.node_name} {text}\n")

    def _logged(self, bs, op: str, offset: int, count: int, flags: int, call) -> int:
        s: BDRVLogState = bs.opaque
        rid = next(s.ids)
        req = request_id_get()
        extra = f" flags={flags:#x} fua={int(bool(flags & BDRV_REQ_FUA))}" if op != "flush" else ""
        self._line(bs, f"op={op} id={rid} req={req if req is not None else '-'} "
                       f"offset={offset:#x} count={count:#x}{extra}")
        start = qemu_clock_get_ns(_clock())
        ret = call()
        self._line(bs, f"op={op} return id={rid} ret={ret} elapsed_ns={qemu_clock_get_ns(_clock()) - start}")
        return ret

    def bdrv_co_preadv(self, bs, offset: int, bytes: int, qiov, flags: int) -> int:
        return self._logged(bs, "read", offset, bytes, flags,
                            lambda: bdrv_co_preadv(bs.file, offset, bytes, qiov, flags))

    def bdrv_co_pwritev(self, bs, offset: int, bytes: int, qiov, flags: int) -> int:
        return self._logged(bs, "write", offset, bytes, flags,
                            lambda: bdrv_co_pwritev(bs.file, offset, bytes, qiov, flags))

    def bdrv_co_pwrite_zeroes(self, bs, offset: int, bytes: int, flags: int) -> int:
        return self._logged(bs, "write-zeroes", offset, bytes, flags,
                            lambda: bdrv_co_pwrite_zeroes(bs.file, offset, bytes, flags))

    def bdrv_co_pdiscard(self, bs, offset: int, bytes: int) -> int:
        return self._logged(bs, "discard", offset, bytes, 0, lambda: bdrv_co_pdiscard(bs.file, offset, bytes))

    def bdrv_co_flush(self, bs) -> int:
        return self._logged(bs, "flush", 0, 0, 0, lambda: bdrv_co_flush(bs.file.bs))

    def bdrv_co_block_status(self, bs, want_zero: bool, offset: int, bytes: int):
        return bdrv_co_block_status_from_file(bs, want_zero, offset, bytes)


bdrv_register(LogDriver)
