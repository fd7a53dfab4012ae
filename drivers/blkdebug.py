"""Fault injection and request suspension: QEMU's block/blkdebug.c.

``blkdebug`` is a filter over an ``image`` child.  Rules fire on the debug
events the block layer and format drivers raise (``bdrv_debug_event`` /
``BLKDBG_EVENT``: ``pwritev``, ``pwritev_rmw_head``, ``l2_update``,
``flush_to_disk`` ...), under a small state machine (``state`` starts at 1):

* ``inject-error`` (event, state, errno (default EIO), sector (default any),
  once, immediately, iotype (read, write, write-zeroes, discard, flush,
  block-status; default all but block-status)): the next matching request
  on this node fails with ``-errno``.  Unless ``immediately``, the failure
  comes back asynchronously (the coroutine reschedules itself first).
* ``set-state`` (event, state, new_state).
* ``break``/``resume``/``remove_break``/``wait_break`` (qemu-io's commands)
  suspend a request at an event until it is resumed.

Rules come from a config file in QEMU's blkdebug syntax (``config=FILE``, or
the ``blkdebug:CONFIG:IMAGE`` filename) and from inline options
``inject-error.N.event=...``/``set-state.N.*``.  ``align``, ``max-transfer``,
``opt-write-zero``, ``max-write-zero``, ``opt-discard`` and ``max-discard``
override the node's limits (and are checked the way QEMU checks them), so
any driver can be run against unusual alignments.
"""
from __future__ import annotations

import errno
import re
import sys

import attrs

from qblock.block.driver import (
    BDRV_SECTOR_SIZE,
    INT_MAX,
    BlkdebugEvent,
    BlockDriver,
    bdrv_register,
)
from qblock.block.graph import bdrv_get_info, bdrv_getlength, bdrv_open_child, bdrv_pass_supported_flags, child_format
from qblock.block.io import (
    bdrv_co_block_status_from_file,
    bdrv_co_flush,
    bdrv_co_pdiscard,
    bdrv_co_preadv,
    bdrv_co_pwrite_zeroes,
    bdrv_co_pwritev,
    bdrv_debug_event,
)
from qblock.util.aio import aio_co_schedule, qemu_get_current_aio_context
from qblock.util.coroutine import qemu_coroutine_enter, qemu_coroutine_self, qemu_coroutine_yield
from qblock.util.cutils import is_power_of_2
from qblock.util.error import Error, error_setg_errno
from qblock.util.qemu_option import (
    QEMU_OPT_BOOL,
    QEMU_OPT_NUMBER,
    QEMU_OPT_SIZE,
    QEMU_OPT_STRING,
    QemuOptDesc,
    QemuOptsList,
    qdict_extract_subqdict,
    qemu_opts_absorb_qdict,
)
from qblock.util.timer import qtest_enabled

ACTION_INJECT_ERROR = 0
ACTION_SET_STATE = 1
ACTION_SUSPEND = 2

# BlkdebugIOType (qapi/block-core.json)
IO_TYPES = ("read", "write", "write-zeroes", "discard", "flush", "block-status")
BLKDEBUG_IO_TYPE_READ, BLKDEBUG_IO_TYPE_WRITE, BLKDEBUG_IO_TYPE_WRITE_ZEROES, BLKDEBUG_IO_TYPE_DISCARD, \
    BLKDEBUG_IO_TYPE_FLUSH, BLKDEBUG_IO_TYPE_BLOCK_STATUS = range(6)
_DEFAULT_IOTYPES = sum(1 << t for t in range(5))   # everything but block-status

_EVENTS = {e.config_name: e for e in BlkdebugEvent}

inject_error_opts = QemuOptsList("inject-error", [
    QemuOptDesc("event", QEMU_OPT_STRING), QemuOptDesc("state", QEMU_OPT_NUMBER),
    QemuOptDesc("iotype", QEMU_OPT_STRING), QemuOptDesc("errno", QEMU_OPT_NUMBER),
    QemuOptDesc("sector", QEMU_OPT_NUMBER), QemuOptDesc("once", QEMU_OPT_BOOL),
    QemuOptDesc("immediately", QEMU_OPT_BOOL),
])
set_state_opts = QemuOptsList("set-state", [
    QemuOptDesc("event", QEMU_OPT_STRING), QemuOptDesc("state", QEMU_OPT_NUMBER),
    QemuOptDesc("new_state", QEMU_OPT_NUMBER),
])
runtime_opts = QemuOptsList("blkdebug", [
    QemuOptDesc("config", QEMU_OPT_STRING, "Path to the configuration file"),
    QemuOptDesc("x-image", QEMU_OPT_STRING, "[internal use only, will be removed]"),
    QemuOptDesc("align", QEMU_OPT_SIZE, "Required alignment in bytes"),
    QemuOptDesc("max-transfer", QEMU_OPT_SIZE, "Maximum transfer size in bytes"),
    QemuOptDesc("opt-write-zero", QEMU_OPT_SIZE, "Optimum write zero alignment in bytes"),
    QemuOptDesc("max-write-zero", QEMU_OPT_SIZE, "Maximum write zero size in bytes"),
    QemuOptDesc("opt-discard", QEMU_OPT_SIZE, "Optimum discard alignment in bytes"),
    QemuOptDesc("max-discard", QEMU_OPT_SIZE, "Maximum discard size in bytes"),
])


@attrs.define(eq=False)
class BlkdebugRule:
    event: BlkdebugEvent
    action: int
    state: int = 0
    iotype_mask: int = _DEFAULT_IOTYPES
    error: int = errno.EIO
    immediately: bool = False
    once: bool = False
    offset: int = -1
    new_state: int = 0
    tag: str = ""


@attrs.define(eq=False)
class BlkdebugSuspendedReq:
    co: object
    tag: str

    def describe_wait(self) -> str:
        return f"blkdebug breakpoint '{self.tag}' (resume it)"


@attrs.define
class BDRVBlkdebugState:
    state: int = 1
    new_state: int = 1
    align: int = 0
    max_transfer: int = 0
    opt_write_zero: int = 0
    max_write_zero: int = 0
    opt_discard: int = 0
    max_discard: int = 0
    config_file: str | None = None
    rules: dict = attrs.field(factory=dict)        # event -> [rules], newest first
    active_rules: list = attrs.field(factory=list)
    suspended_reqs: list = attrs.field(factory=list)


def _parse_event(name: str) -> BlkdebugEvent:
    ev = _EVENTS.get(name)
    if ev is None:
        raise Error(f"invalid parameter value: {name}")
    return ev


def _add_rule(s: BDRVBlkdebugState, action: int, opts) -> None:
    name = opts.get("event")
    if not name:
        raise Error("Missing event name for rule")
    rule = BlkdebugRule(_parse_event(name), action, opts.get("state", 0))
    if action == ACTION_INJECT_ERROR:
        rule.error = opts.get("errno", errno.EIO)
        rule.once = opts.get("once", False)
        rule.immediately = opts.get("immediately", False)
        sector = opts.get("sector", None)
        if sector is not None and sector >= 1 << 63:
            sector -= 1 << 64   # -1 given as a number wraps like QEMU's uint64 parse
        rule.offset = -1 if sector is None or sector == -1 else sector * BDRV_SECTOR_SIZE
        iotype = opts.get("iotype")
        if iotype is not None:
            if iotype not in IO_TYPES:
                raise Error(f"invalid parameter value: {iotype}", hint=f"Valid values: {', '.join(IO_TYPES)}")
            rule.iotype_mask = 1 << IO_TYPES.index(iotype)
    elif action == ACTION_SET_STATE:
        rule.new_state = opts.get("new_state", 0)
    s.rules.setdefault(rule.event, []).insert(0, rule)


def _remove_rule(s: BDRVBlkdebugState, rule: BlkdebugRule) -> None:
    lst = s.rules.get(rule.event, [])
    if rule in lst:
        lst.remove(rule)


_SECTION_RE = re.compile(r"^\[\s*([\w-]+)\s*\]$")
_KV_RE = re.compile(r'^([\w-]+)\s*=\s*"?(.*?)"?\s*$')


def parse_blkdebug_config(text: str, filename: str = "config") -> list[tuple[str, dict]]:
    """QEMU's config-file syntax: ``[inject-error]`` sections of ``key = "value"`` lines, ``#`` comments."""
    groups: list[tuple[str, dict]] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _SECTION_RE.match(line)
        if m:
            groups.append((m.group(1), {}))
            continue
        m = _KV_RE.match(line)
        if not m or not groups:
            raise Error(f"{filename}:{lineno}: parse error")
        groups[-1][1][m.group(1)] = m.group(2)
    return groups


def _read_config(s: BDRVBlkdebugState, filename: str | None, options: dict) -> None:
    groups: list[tuple[str, dict]] = []
    if filename:
        try:
            with open(filename, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise error_setg_errno(e.errno, "Could not read blkdebug config file") from None
        try:
            groups = parse_blkdebug_config(text, filename)
        except Error:
            raise Error("Could not parse blkdebug config file") from None
    # Inline options: inject-error.N.key=... (or inject-error.key=... for one rule).
    for group in ("inject-error", "set-state"):
        sub = qdict_extract_subqdict(options, group + ".")
        indexed: dict[str, dict] = {}
        for key, val in sub.items():
            head, _, rest = key.partition(".")
            if rest and head.isdigit():
                indexed.setdefault(head, {})[rest] = val
            else:
                indexed.setdefault("", {})[key] = val
        for k in sorted(indexed, key=lambda x: (x != "", int(x) if x.isdigit() else -1)):
            groups.append((group, indexed[k]))
    for name, values in groups:
        if name == "inject-error":
            opts = qemu_opts_absorb_qdict(inject_error_opts, values)
            action = ACTION_INJECT_ERROR
        elif name == "set-state":
            opts = qemu_opts_absorb_qdict(set_state_opts, values)
            action = ACTION_SET_STATE
        else:
            raise Error(f"There is no option group '{name}'")
        if values:
            raise Error(f"Invalid parameter '{next(iter(values))}'")
        _add_rule(s, action, opts)


class BlkdebugDriver(BlockDriver):
    format_name = "blkdebug"
    protocol_name = "blkdebug"
    state_class = BDRVBlkdebugState
    runtime_opts = runtime_opts
    is_filter = True

    def bdrv_parse_filename(self, filename: str, options: dict) -> None:
        # blkdebug:path/to/config:path/to/image
        if not filename.startswith("blkdebug:"):
            options["x-image"] = filename
            return
        rest = filename[len("blkdebug:"):]
        if ":" not in rest:
            raise Error("blkdebug requires both config file and image path")
        config, image = rest.split(":", 1)
        if config:
            options["config"] = config
        options["x-image"] = image

    def bdrv_file_open(self, bs, options: dict, flags: int) -> int:
        s: BDRVBlkdebugState = bs.opaque
        opts = qemu_opts_absorb_qdict(runtime_opts, options)
        s.config_file = opts.get("config")
        _read_config(s, s.config_file, options)
        s.state = 1
        bdrv_open_child(opts.get("x-image"), options, "image", bs, child_role=child_format)
        fbs = bs.file.bs
        bdrv_pass_supported_flags(bs)
        s.align = opts.get("align", 0)
        if s.align and (s.align >= INT_MAX or not is_power_of_2(s.align)):
            raise Error(f"Cannot meet constraints with align {s.align}", errno=errno.EINVAL)
        align = max(s.align, fbs.bl.request_alignment)
        for key, attr, base in (("max-transfer", "max_transfer", None), ("opt-write-zero", "opt_write_zero", None),
                                ("max-write-zero", "max_write_zero", "opt_write_zero"),
                                ("opt-discard", "opt_discard", None), ("max-discard", "max_discard", "opt_discard")):
            val = opts.get(key, 0)
            need = max(getattr(s, base), align) if base else align
            if val and (val >= INT_MAX or val % need):
                raise Error(f"Cannot meet constraints with {key} {val}", errno=errno.EINVAL)
            setattr(s, attr, val)
        bdrv_debug_event(bs, BlkdebugEvent.BLKDBG_NONE)
        return 0

    def bdrv_close(self, bs) -> None:
        bs.opaque.rules.clear()

    def bdrv_reopen_prepare(self, state, queue) -> int:
        # As blkdebug_reopen_prepare: nothing of its own can change; the generic check then refuses
        # any changed option ("Cannot change the option ...") and accepts unchanged ones.
        return 0

    def bdrv_refresh_limits(self, bs) -> None:
        s: BDRVBlkdebugState = bs.opaque
        if s.align:
            bs.bl.request_alignment = s.align
        if s.max_transfer:
            bs.bl.max_transfer = s.max_transfer
        if s.opt_write_zero:
            bs.bl.pwrite_zeroes_alignment = s.opt_write_zero
        if s.max_write_zero:
            bs.bl.max_pwrite_zeroes = s.max_write_zero
        if s.opt_discard:
            bs.bl.pdiscard_alignment = s.opt_discard
        if s.max_discard:
            bs.bl.max_pdiscard = s.max_discard

    def bdrv_getlength(self, bs) -> int:
        return bdrv_getlength(bs.file.bs)

    def bdrv_get_info(self, bs, bdi) -> int:
        return bdrv_get_info(bs.file.bs, bdi)

    # -- rules ------------------------------------------------------------

    def _rule_check(self, bs, offset: int, bytes: int, iotype: int) -> int:
        s: BDRVBlkdebugState = bs.opaque
        rule = None
        for r in s.active_rules:
            if ((r.offset == -1 or (bytes and offset <= r.offset < offset + bytes))
                    and r.iotype_mask & (1 << iotype)):
                rule = r
                break
        if rule is None or not rule.error:
            return 0
        if rule.once:
            s.active_rules.remove(rule)
            _remove_rule(s, rule)
        if not rule.immediately:
            # Fail asynchronously: come back through the event loop first.
            aio_co_schedule(qemu_get_current_aio_context(), qemu_coroutine_self())
            qemu_coroutine_yield()
        return -rule.error

    def _check_aligned(self, bs, offset: int, bytes: int) -> None:
        align = bs.bl.request_alignment
        if offset % align or bytes % align:
            raise AssertionError(f"blkdebug: the block layer passed an unaligned request [{offset}, +{bytes})")
        if bs.bl.max_transfer and bytes > bs.bl.max_transfer:
            raise AssertionError(f"blkdebug: the block layer passed {bytes} bytes, above max_transfer")

    def bdrv_co_preadv(self, bs, offset: int, bytes: int, qiov, flags: int) -> int:
        self._check_aligned(bs, offset, bytes)
        err = self._rule_check(bs, offset, bytes, BLKDEBUG_IO_TYPE_READ)
        return err if err else bdrv_co_preadv(bs.file, offset, bytes, qiov, flags)

    def bdrv_co_pwritev(self, bs, offset: int, bytes: int, qiov, flags: int) -> int:
        self._check_aligned(bs, offset, bytes)
        err = self._rule_check(bs, offset, bytes, BLKDEBUG_IO_TYPE_WRITE)
        return err if err else bdrv_co_pwritev(bs.file, offset, bytes, qiov, flags)

    def bdrv_co_flush_to_disk(self, bs) -> int:
        err = self._rule_check(bs, 0, 0, BLKDEBUG_IO_TYPE_FLUSH)
        return err if err else bdrv_co_flush(bs.file.bs)

    def bdrv_co_pwrite_zeroes(self, bs, offset: int, bytes: int, flags: int) -> int:
        align = max(bs.bl.request_alignment, bs.bl.pwrite_zeroes_alignment)
        if bytes < align:
            # Only larger requests pass, so the fallback to writes on unaligned parts gets tested.
            return -errno.ENOTSUP
        if offset % align or bytes % align:
            raise AssertionError("blkdebug: unaligned write-zeroes crossing an alignment boundary")
        err = self._rule_check(bs, offset, bytes, BLKDEBUG_IO_TYPE_WRITE_ZEROES)
        return err if err else bdrv_co_pwrite_zeroes(bs.file, offset, bytes, flags)

    def bdrv_co_pdiscard(self, bs, offset: int, bytes: int) -> int:
        align = bs.bl.pdiscard_alignment
        if align and bytes < align:
            return -errno.ENOTSUP
        err = self._rule_check(bs, offset, bytes, BLKDEBUG_IO_TYPE_DISCARD)
        return err if err else bdrv_co_pdiscard(bs.file, offset, bytes)

    def bdrv_co_block_status(self, bs, want_zero: bool, offset: int, bytes: int):
        err = self._rule_check(bs, offset, bytes, BLKDEBUG_IO_TYPE_BLOCK_STATUS)
        if err:
            return err, 0, 0, None
        return bdrv_co_block_status_from_file(bs, want_zero, offset, bytes)

    # -- events and breakpoints -------------------------------------------

    def _suspend_request(self, bs, rule: BlkdebugRule) -> None:
        s: BDRVBlkdebugState = bs.opaque
        co = qemu_coroutine_self()
        r = BlkdebugSuspendedReq(co, rule.tag)
        _remove_rule(s, rule)
        s.suspended_reqs.insert(0, r)
        if not qtest_enabled():
            sys.stdout.write(f"blkdebug: Suspended request '{r.tag}'\n")
        co.waiting_on = r
        qemu_coroutine_yield()
        if not qtest_enabled():
            sys.stdout.write(f"blkdebug: Resuming request '{r.tag}'\n")
        s.suspended_reqs.remove(r)

    def bdrv_debug_event(self, bs, event: BlkdebugEvent) -> None:
        s: BDRVBlkdebugState = bs.opaque
        injected = False
        s.new_state = s.state
        for rule in list(s.rules.get(event, ())):
            if rule.state and rule.state != s.state:
                continue  # rules see the state from before this event
            if rule.action == ACTION_INJECT_ERROR:
                if not injected:
                    s.active_rules = []
                    injected = True
                s.active_rules.insert(0, rule)
            elif rule.action == ACTION_SET_STATE:
                s.new_state = rule.new_state
            else:
                self._suspend_request(bs, rule)
        s.state = s.new_state

    def bdrv_debug_breakpoint(self, bs, event: str, tag: str) -> int:
        ev = _EVENTS.get(event)
        if ev is None:
            return -errno.ENOENT
        bs.opaque.rules.setdefault(ev, []).insert(0, BlkdebugRule(ev, ACTION_SUSPEND, tag=tag))
        return 0

    def bdrv_debug_resume(self, bs, tag: str) -> int:
        for r in list(bs.opaque.suspended_reqs):
            if r.tag == tag:
                qemu_coroutine_enter(r.co)
                return 0
        return -errno.ENOENT

    def bdrv_debug_remove_breakpoint(self, bs, tag: str) -> int:
        s: BDRVBlkdebugState = bs.opaque
        ret = -errno.ENOENT
        for rules in s.rules.values():
            for rule in list(rules):
                if rule.action == ACTION_SUSPEND and rule.tag == tag:
                    rules.remove(rule)
                    ret = 0
        for r in list(s.suspended_reqs):
            if r.tag == tag:
                qemu_coroutine_enter(r.co)
                ret = 0
        return ret

    def bdrv_debug_is_suspended(self, bs, tag: str) -> bool:
        return any(r.tag == tag for r in bs.opaque.suspended_reqs)


bdrv_register(BlkdebugDriver)
