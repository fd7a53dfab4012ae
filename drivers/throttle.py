"""The throttle filter: QEMU's block/throttle.c.

A ``throttle`` node sits over its ``file`` child and makes every request
wait for the throttle group named by its ``throttle-group`` option, which
must exist already (a ``throttle-group`` object)::

    --object throttle-group,id=tg0,x-bps-write=1048576
    driver=throttle,throttle-group=tg0,file.driver=null-co

The node is a member of the group (its ``bs.opaque`` is the
ThrottleGroupMember), so several nodes, and BlockBackends with
``block_set_io_throttle`` limits in the same group, share the limits.
Reads, writes, write-zeroes and discards are throttled (the last two
count as writes); flush, length and block status pass through to the child.
Draining the node lets its queued requests go at once.

Reopen (``throttle_reopen_prepare``/``commit``/``abort``): prepare checks the
new ``throttle-group`` (it must exist), commit moves the member to that group
when the name changed, abort drops what prepare staged.

Differences from QEMU: drain uses the plain ``bdrv_drain_begin``/``end``
hooks of later QEMU (the seed has coroutine ones; the graph runs either).
"""
from __future__ import annotations

import errno

from qblock.block.driver import BDRV_REQ_WRITE_UNCHANGED, BlockDriver, bdrv_register
from qblock.block.graph import (
    bdrv_filter_default_perms,
    bdrv_get_aio_context,
    bdrv_getlength,
    bdrv_open_child,
    child_format,
)
from qblock.block.io import (
    bdrv_co_block_status_from_file,
    bdrv_co_flush,
    bdrv_co_pdiscard,
    bdrv_co_preadv,
    bdrv_co_pwrite_zeroes,
    bdrv_co_pwritev,
)
from qblock.block.throttle_groups import (
    ThrottleGroupMember,
    throttle_group_attach_aio_context,
    throttle_group_co_io_limits_intercept,
    throttle_group_detach_aio_context,
    throttle_group_exists,
    throttle_group_get_name,
    throttle_group_register_tgm,
    throttle_group_restart_tgm,
    throttle_group_unregister_tgm,
)
from qblock.util.error import Error
from qblock.util.qemu_option import QEMU_OPT_STRING, QemuOptDesc, QemuOptsList, qemu_opts_absorb_qdict

QEMU_OPT_THROTTLE_GROUP_NAME = "throttle-group"

throttle_opts = QemuOptsList("throttle", [
    QemuOptDesc(QEMU_OPT_THROTTLE_GROUP_NAME, QEMU_OPT_STRING, "Name of the throttle group"),
])


def throttle_parse_options(options: dict) -> str:
    """The group named by the options; it must exist."""
    opts = qemu_opts_absorb_qdict(throttle_opts, options)
    group_name = opts.get(QEMU_OPT_THROTTLE_GROUP_NAME)
    if not group_name:
        raise Error("Please specify a throttle group", errno=errno.EINVAL)
    if not throttle_group_exists(group_name):
        raise Error(f"Throttle group '{group_name}' does not exist", errno=errno.EINVAL)
    return group_name


class ThrottleDriver(BlockDriver):
    """throttle: a filter whose requests wait for their throttle group."""

    format_name = "throttle"
    state_class = ThrottleGroupMember
    runtime_opts = throttle_opts
    is_filter = True

    def bdrv_open(self, bs, options: dict, flags: int) -> int:
        tgm: ThrottleGroupMember = bs.opaque
        # The child first, as QEMU: a missing "file" is reported before a missing group.
        bdrv_open_child(None, options, "file", bs, child_role=child_format)
        bs.supported_write_flags = bs.file.bs.supported_write_flags | BDRV_REQ_WRITE_UNCHANGED
        bs.supported_zero_flags = bs.file.bs.supported_zero_flags | BDRV_REQ_WRITE_UNCHANGED

        group = throttle_parse_options(options)
        tgm.name = bs.node_name
        throttle_group_register_tgm(tgm, group, bdrv_get_aio_context(bs))
        return 0

    def bdrv_close(self, bs) -> None:
        throttle_group_unregister_tgm(bs.opaque)

    def bdrv_reopen_prepare(self, state, queue) -> int:
        state.opaque = throttle_parse_options(state.options)   # raises Error: nothing staged then
        return 0

    def bdrv_reopen_commit(self, state) -> None:
        bs = state.bs
        tgm: ThrottleGroupMember = bs.opaque
        group = state.opaque
        if group != throttle_group_get_name(tgm):
            throttle_group_unregister_tgm(tgm)
            throttle_group_register_tgm(tgm, group, bdrv_get_aio_context(bs))
        state.opaque = None

    def bdrv_reopen_abort(self, state) -> None:
        state.opaque = None

    def bdrv_child_perm(self, bs, c, role, reopen_queue, perm: int, shared: int) -> tuple[int, int]:
        return bdrv_filter_default_perms(bs, c, role, reopen_queue, perm, shared)

    def bdrv_getlength(self, bs) -> int:
        return bdrv_getlength(bs.file.bs)

    def bdrv_co_preadv(self, bs, offset: int, bytes: int, qiov, flags: int) -> int:
        throttle_group_co_io_limits_intercept(bs.opaque, bytes, False)
        return bdrv_co_preadv(bs.file, offset, bytes, qiov, flags)

    def bdrv_co_pwritev(self, bs, offset: int, bytes: int, qiov, flags: int) -> int:
        throttle_group_co_io_limits_intercept(bs.opaque, bytes, True)
        return bdrv_co_pwritev(bs.file, offset, bytes, qiov, flags)

    def bdrv_co_pwrite_zeroes(self, bs, offset: int, bytes: int, flags: int) -> int:
        throttle_group_co_io_limits_intercept(bs.opaque, bytes, True)
        return bdrv_co_pwrite_zeroes(bs.file, offset, bytes, flags)

    def bdrv_co_pdiscard(self, bs, offset: int, bytes: int) -> int:
        throttle_group_co_io_limits_intercept(bs.opaque, bytes, True)
        return bdrv_co_pdiscard(bs.file, offset, bytes)

    def bdrv_co_flush(self, bs) -> int:
        return bdrv_co_flush(bs.file.bs)

    def bdrv_co_block_status(self, bs, want_zero: bool, offset: int, bytes: int):
        return bdrv_co_block_status_from_file(bs, want_zero, offset, bytes)

    def bdrv_detach_aio_context(self, bs) -> None:
        throttle_group_detach_aio_context(bs.opaque)

    def bdrv_attach_aio_context(self, bs, new_context) -> None:
        throttle_group_attach_aio_context(bs.opaque, new_context)

    def bdrv_drain_begin(self, bs) -> None:
        tgm: ThrottleGroupMember = bs.opaque
        tgm.io_limits_disabled += 1
        if tgm.io_limits_disabled == 1:
            throttle_group_restart_tgm(tgm)

    def bdrv_drain_end(self, bs) -> None:
        tgm: ThrottleGroupMember = bs.opaque
        assert tgm.io_limits_disabled > 0, "throttle: drain end without drain begin"
        tgm.io_limits_disabled -= 1


bdrv_register(ThrottleDriver)
