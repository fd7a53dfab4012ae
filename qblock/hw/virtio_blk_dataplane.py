"""virtio-blk dataplane: QEMU's hw/block/dataplane/virtio-blk.c.

With ioeventfd, the guest's kick sets the queue's host EventNotifier and the
queue is served by whoever waits on it: the main loop, or the AioContext of
the device's ``iothread``.  Starting dataplane moves the BlockBackend into
that context (``blk_set_aio_context``) and registers the notifiers there;
completions ask for an interrupt through a BH that raises each queue's guest
notifier (the irqfd), which the main loop turns into the guest's interrupt.
Stopping (guest reset, VM stop, unplug) undoes it all and moves the
BlockBackend back to the main loop.

Later QEMU (8.0+) also detaches the notifiers while the BlockBackend is
drained; the seed's era has no such hook, so kicks during a drain queue in
the BlockBackend instead.
"""
from __future__ import annotations

from typing import Any

import attrs

from qblock.block.block_backend import blk_set_aio_context
from qblock.hw.virtio import (
    VirtIODevice,
    VirtQueue,
    virtio_bus_cleanup_host_notifier,
    virtio_bus_set_guest_notifiers,
    virtio_bus_set_host_notifier,
    virtio_device_ioeventfd_enabled,
    virtio_get_queue,
    virtio_notify_irqfd,
    virtio_queue_aio_set_host_notifier_handler,
    virtio_queue_get_host_notifier,
)
from qblock.trace.events import trace_virtio_blk_data_plane_start, trace_virtio_blk_data_plane_stop
from qblock.util.aio import (
    QEMUBH,
    AioContext,
    IOThread,
    aio_bh_new,
    aio_context_acquire,
    aio_context_release,
    aio_wait_bh_oneshot,
    event_notifier_set,
    iothread_get_aio_context,
    qemu_bh_cancel,
    qemu_bh_delete,
    qemu_bh_schedule,
    qemu_get_aio_context,
)
from qblock.util.error import Error, error_report

__all__ = ["VirtIOBlockDataPlane", "virtio_blk_data_plane_create", "virtio_blk_data_plane_destroy",
           "virtio_blk_data_plane_start", "virtio_blk_data_plane_stop", "virtio_blk_data_plane_notify"]


@attrs.define(eq=False)
class VirtIOBlockDataPlane:
    """Where a virtio-blk device's queues are served (QEMU's VirtIOBlockDataPlane)."""

    vdev: Any
    conf: Any
    ctx: AioContext
    iothread: IOThread | None = None
    bh: QEMUBH | None = None
    batch_notify_vqs: set[int] = attrs.field(factory=set)
    starting: bool = False
    stopping: bool = False

    @property
    def trace_name(self) -> str:
        return f"{self.vdev.trace_name}.dataplane"


def notify_guest_bh(s: VirtIOBlockDataPlane) -> None:
    """Interrupt the guest once for each queue that completed something since the last time."""
    batch = sorted(s.batch_notify_vqs)
    s.batch_notify_vqs.clear()
    for n in batch:
        virtio_notify_irqfd(s.vdev, virtio_get_queue(s.vdev, n))


def virtio_blk_data_plane_create(vdev: VirtIODevice, conf: Any) -> VirtIOBlockDataPlane | None:
    """Dataplane for a device whose transport has ioeventfd: in the iothread's context, or the main loop's."""
    if conf.iothread is not None and not virtio_device_ioeventfd_enabled(vdev):
        raise Error("ioeventfd is required for iothread")
    if not virtio_device_ioeventfd_enabled(vdev):
        return None
    if conf.iothread is not None:
        ctx = iothread_get_aio_context(conf.iothread)
    else:
        ctx = qemu_get_aio_context()
    s = VirtIOBlockDataPlane(vdev, conf, ctx, conf.iothread)
    s.bh = aio_bh_new(ctx, notify_guest_bh, s, "notify_guest_bh")
    return s


def virtio_blk_data_plane_destroy(s: VirtIOBlockDataPlane | None) -> None:
    if s is None:
        return
    assert not s.vdev.dataplane_started
    qemu_bh_delete(s.bh)


def virtio_blk_data_plane_notify(s: VirtIOBlockDataPlane, vq: VirtQueue) -> None:
    """Ask for an interrupt for ``vq``; the BH sends one per queue however many requests completed."""
    s.batch_notify_vqs.add(vq.queue_index)
    qemu_bh_schedule(s.bh)


def virtio_blk_data_plane_handle_output(vdev: VirtIODevice, vq: VirtQueue) -> bool:
    from qblock.hw.virtio_blk import virtio_blk_handle_vq
    assert vdev.dataplane is not None and vdev.dataplane_started
    return virtio_blk_handle_vq(vdev, vq)


def virtio_blk_data_plane_start(vdev: VirtIODevice) -> int:
    """Notifiers on, BlockBackend into the dataplane context, then serve the queues there."""
    vblk = vdev
    s: VirtIOBlockDataPlane = vblk.dataplane
    if vblk.dataplane_started or s.starting:
        return 0
    nvqs = s.conf.num_queues
    s.starting = True

    virtio_bus_set_guest_notifiers(vdev, nvqs, True)
    for i in range(nvqs):
        virtio_bus_set_host_notifier(vdev, i, True)

    s.starting = False
    vblk.dataplane_started = True
    if trace_virtio_blk_data_plane_start.event.enabled:
        trace_virtio_blk_data_plane_start(s)

    aio_context_acquire(s.ctx)
    try:
        blk_set_aio_context(s.conf.conf.blk, s.ctx)
    except Error as err:
        error_report(str(err))
        # later QEMU's cleanup: without it the kicks would go to notifiers nobody reads
        for i in range(nvqs):
            virtio_bus_set_host_notifier(vdev, i, False)
            virtio_bus_cleanup_host_notifier(vdev, i)
        virtio_bus_set_guest_notifiers(vdev, nvqs, False)
        vblk.dataplane_disabled = True
        return -38  # -ENOSYS: the device falls back to serving kicks in the vCPU thread
    finally:
        aio_context_release(s.ctx)

    # Kick at once for requests already in the rings.
    for i in range(nvqs):
        event_notifier_set(virtio_queue_get_host_notifier(virtio_get_queue(vdev, i)))

    aio_context_acquire(s.ctx)
    try:
        for i in range(nvqs):
            virtio_queue_aio_set_host_notifier_handler(virtio_get_queue(vdev, i), s.ctx,
                                                       virtio_blk_data_plane_handle_output)
    finally:
        aio_context_release(s.ctx)
    return 0


def _virtio_blk_data_plane_stop_bh(s: VirtIOBlockDataPlane) -> None:
    for i in range(s.conf.num_queues):
        virtio_queue_aio_set_host_notifier_handler(virtio_get_queue(s.vdev, i), s.ctx, None)


def virtio_blk_data_plane_stop(vdev: VirtIODevice) -> None:
    """Stop serving in the dataplane context and move the BlockBackend back to the main loop."""
    vblk = vdev
    s: VirtIOBlockDataPlane = vblk.dataplane
    if not vblk.dataplane_started or s.stopping:
        return
    if vblk.dataplane_disabled:
        # Better luck next time.
        vblk.dataplane_disabled = False
        vblk.dataplane_started = False
        return
    nvqs = s.conf.num_queues
    s.stopping = True
    if trace_virtio_blk_data_plane_stop.event.enabled:
        trace_virtio_blk_data_plane_stop(s)

    aio_context_acquire(s.ctx)
    try:
        aio_wait_bh_oneshot(s.ctx, _virtio_blk_data_plane_stop_bh, s)
        # Drains the requests in flight; fine if another user keeps the node in the iothread.
        try:
            blk_set_aio_context(s.conf.conf.blk, qemu_get_aio_context())
        except Error:
            pass
    finally:
        aio_context_release(s.ctx)

    for i in range(nvqs):
        virtio_bus_set_host_notifier(vdev, i, False)
        virtio_bus_cleanup_host_notifier(vdev, i)

    qemu_bh_cancel(s.bh)
    notify_guest_bh(s)          # a last chance to interrupt the guest
    virtio_bus_set_guest_notifiers(vdev, nvqs, False)

    vblk.dataplane_started = False
    s.stopping = False
