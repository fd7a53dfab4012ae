"""Virtqueues and the virtio device core: QEMU's hw/virtio/virtio.c and virtio-bus.c.

Guest memory (:mod:`qblock.hw.memory`) is mapped, not copied: a popped
element's buffers are ``memoryview`` slices of guest RAM, so a request's
data goes from guest memory to the block driver without a copy.

A :class:`VirtQueue` is a split ring laid out in guest memory as the virtio
1.x spec (and ``include/standard-headers/linux/virtio_ring.h``) lays it out::

    descriptor table  num x { le64 addr; le32 len; le16 flags; le16 next; }
    avail ring        le16 flags; le16 idx; le16 ring[num]; le16 used_event;
    used ring         le16 flags; le16 idx; { le32 id; le32 len; }[num]; le16 avail_event;

The guest places the three parts where it likes and tells the device their
addresses (``virtio_queue_set_rings``).  ``virtqueue_pop`` walks a descriptor
chain (direct or through an indirect table) into a :class:`VirtQueueElement`
whose ``out_sg``/``in_sg`` are memoryviews of guest RAM; a broken chain
(loop, out-of-range index or address, zero length, a device-readable
descriptor after a device-writable one) is ``virtio_error``: the device is
marked broken and does nothing until the guest resets it.

The transport (QEMU's virtio-pci proxy and virtio-bus) is folded in here:
the ``virtio_transport_*`` functions are what a guest reaches through the
common configuration registers; ``notify_cb`` is the interrupt line; with
ioeventfd the kick sets the queue's host EventNotifier, and guest notifiers
(irqfds) deliver interrupts through the main loop.

Little-endian (virtio 1.x) rings and config only: a legacy big-endian guest
is not modelled.  Left out: the packed ring, migration, vhost, IOMMUs.
"""
from __future__ import annotations

import struct
from typing import Any, Callable

import attrs

from qblock.hw.memory import (
    AddressSpace,
    address_space_map,
    address_space_memory,
    address_space_unmap,
)
from qblock.qom.object import (
    TYPE_DEVICE,
    DEFINE_PROP_BIT64,
    DEFINE_PROP_BOOL,
    DEFINE_PROP_LINK,
    DeviceState,
    ObjectClass,
    PropertyInfoLink,
    TypeInfo,
    device_class_set_props,
    type_init,
    type_register_static,
)
from qblock.trace.events import (
    trace_virtio_error,
    trace_virtio_notify,
    trace_virtio_notify_irqfd,
    trace_virtio_queue_notify,
    trace_virtio_set_status,
    trace_virtqueue_fill,
    trace_virtqueue_flush,
    trace_virtqueue_pop,
)
from qblock.util.aio import (
    AioContext,
    EventNotifier,
    aio_set_event_notifier,
    event_notifier_cleanup,
    event_notifier_init,
    event_notifier_set,
    event_notifier_test_and_clear,
    qemu_get_aio_context,
)
from qblock.util.error import Error, error_report
from qblock.util.runstate import (
    RunState,
    qemu_add_vm_change_state_handler,
    qemu_del_vm_change_state_handler,
    runstate_is_running,
)

__all__ = [
    "TYPE_VIRTIO_DEVICE", "VirtIODevice", "VirtQueue", "VirtQueueElement", "VRing",
    "virtio_init", "virtio_cleanup", "virtio_add_queue", "virtio_del_queue", "virtio_get_queue",
    "virtio_get_queue_index", "virtio_get_num_queues", "virtio_queue_get_num", "virtio_queue_set_num",
    "virtio_queue_set_rings", "virtio_queue_set_vector", "virtqueue_pop", "virtqueue_push", "virtqueue_fill",
    "virtqueue_flush", "virtqueue_detach_element", "virtio_queue_set_notification",
    "virtio_queue_get_notification", "virtio_queue_empty", "virtio_notify", "virtio_notify_irqfd",
    "virtio_notify_config", "virtio_notify_vector", "virtio_queue_notify", "virtio_error", "virtio_set_status",
    "virtio_reset", "virtio_set_features", "virtio_has_feature", "virtio_vdev_has_feature",
    "virtio_host_has_feature", "virtio_add_feature", "virtio_clear_feature", "virtio_ldl_p", "virtio_ldq_p",
    "virtio_config_modern_readb", "virtio_config_modern_readw", "virtio_config_modern_readl",
    "virtio_config_modern_writeb", "virtio_config_modern_writew", "virtio_config_modern_writel",
    "virtio_device_start_ioeventfd", "virtio_device_stop_ioeventfd", "virtio_device_ioeventfd_enabled",
    "virtio_bus_start_ioeventfd", "virtio_bus_stop_ioeventfd", "virtio_bus_set_host_notifier",
    "virtio_bus_cleanup_host_notifier", "virtio_bus_set_guest_notifiers", "virtio_queue_get_host_notifier",
    "virtio_queue_aio_set_host_notifier_handler", "virtio_transport_read_host_features",
    "virtio_transport_write_guest_features", "virtio_transport_read_status", "virtio_transport_write_status",
    "virtio_transport_queue_max", "virtio_transport_setup_queue", "virtio_transport_set_config_vector",
    "virtio_transport_set_irq", "virtio_transport_read_isr",
    "VIRTIO_QUEUE_MAX", "VIRTQUEUE_MAX_SIZE", "VIRTIO_NO_VECTOR", "VIRTIO_PCI_VRING_ALIGN",
    "VRING_DESC_F_NEXT", "VRING_DESC_F_WRITE", "VRING_DESC_F_INDIRECT", "VRING_USED_F_NO_NOTIFY",
    "VRING_AVAIL_F_NO_INTERRUPT", "VIRTIO_CONFIG_S_ACKNOWLEDGE", "VIRTIO_CONFIG_S_DRIVER",
    "VIRTIO_CONFIG_S_DRIVER_OK", "VIRTIO_CONFIG_S_FEATURES_OK", "VIRTIO_CONFIG_S_NEEDS_RESET",
    "VIRTIO_CONFIG_S_FAILED", "VIRTIO_F_NOTIFY_ON_EMPTY", "VIRTIO_F_ANY_LAYOUT", "VIRTIO_RING_F_INDIRECT_DESC",
    "VIRTIO_RING_F_EVENT_IDX", "VIRTIO_F_VERSION_1", "vring_need_event",
]

VIRTIO_QUEUE_MAX = 1024
VIRTQUEUE_MAX_SIZE = 1024
VIRTIO_NO_VECTOR = 0xFFFF
VIRTIO_PCI_VRING_ALIGN = 4096

# include/standard-headers/linux/virtio_ring.h
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_USED_F_NO_NOTIFY = 1
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_DESC_SIZE = 16
VRING_USED_ELEM_SIZE = 8

# include/standard-headers/linux/virtio_config.h
VIRTIO_CONFIG_S_ACKNOWLEDGE = 1
VIRTIO_CONFIG_S_DRIVER = 2
VIRTIO_CONFIG_S_DRIVER_OK = 4
VIRTIO_CONFIG_S_FEATURES_OK = 8
VIRTIO_CONFIG_S_NEEDS_RESET = 0x40
VIRTIO_CONFIG_S_FAILED = 0x80
VIRTIO_F_NOTIFY_ON_EMPTY = 24
VIRTIO_F_ANY_LAYOUT = 27
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_USED_ELEM = struct.Struct("<II")


# ---------------------------------------------------------------------------
# Features


def virtio_has_feature(features: int, fbit: int) -> bool:
    return bool(features >> fbit & 1)


def virtio_add_feature(features: int, fbit: int) -> int:
    return features | (1 << fbit)


def virtio_clear_feature(features: int, fbit: int) -> int:
    return features & ~(1 << fbit)


def virtio_vdev_has_feature(vdev: "VirtIODevice", fbit: int) -> bool:
    """Whether the guest acknowledged ``fbit``."""
    return virtio_has_feature(vdev.guest_features, fbit)


def virtio_host_has_feature(vdev: "VirtIODevice", fbit: int) -> bool:
    return virtio_has_feature(vdev.host_features, fbit)


def virtio_ldl_p(vdev: "VirtIODevice", buf, offset: int = 0) -> int:
    """A 32-bit field of a guest structure in the device's byte order (little endian here)."""
    return _U32.unpack_from(buf, offset)[0]


def virtio_ldq_p(vdev: "VirtIODevice", buf, offset: int = 0) -> int:
    return _U64.unpack_from(buf, offset)[0]


# ---------------------------------------------------------------------------
# Rings, queues, elements


@attrs.define(eq=False)
class VRing:
    """Where a split ring lives in guest memory (QEMU's VRing)."""

    num: int = 0
    num_default: int = 0
    align: int = 0
    desc: int = 0
    avail: int = 0
    used: int = 0
    caches_ok: bool = False   # QEMU: the region caches mapped the three parts (vring.caches != NULL)


@attrs.define(eq=False)
class VirtQueueElement:
    """One popped request: the head index and the guest buffers, device-readable then device-writable."""

    index: int
    ndescs: int = 1
    out_addr: list[int] = attrs.field(factory=list)
    in_addr: list[int] = attrs.field(factory=list)
    out_sg: list[memoryview] = attrs.field(factory=list, repr=False)
    in_sg: list[memoryview] = attrs.field(factory=list, repr=False)

    @property
    def out_num(self) -> int:
        return len(self.out_sg)

    @property
    def in_num(self) -> int:
        return len(self.in_sg)

    @property
    def trace_name(self) -> str:
        return f"elem{self.index}"


@attrs.define(eq=False)
class VirtQueue:
    """One virtqueue of a device (QEMU's VirtQueue)."""

    vdev: "VirtIODevice"
    queue_index: int
    vring: VRing = attrs.field(factory=VRing)
    last_avail_idx: int = 0
    shadow_avail_idx: int = 0
    used_idx: int = 0
    signalled_used: int = 0
    signalled_used_valid: bool = False
    notification: bool = True
    inuse: int = 0
    vector: int = VIRTIO_NO_VECTOR
    handle_output: Callable[["VirtIODevice", "VirtQueue"], None] | None = None
    handle_aio_output: Callable[["VirtIODevice", "VirtQueue"], bool] | None = None
    guest_notifier: EventNotifier | None = None
    host_notifier: EventNotifier | None = None
    host_notifier_enabled: bool = False

    @property
    def trace_name(self) -> str:
        return f"{self.vdev.trace_name}.vq{self.queue_index}"


@attrs.define(eq=False)
class VirtIODevice(DeviceState):
    """The virtio part every virtio device starts with (QEMU's VirtIODevice), with its transport's state."""

    name: str = ""
    device_id: int = 0
    status: int = 0
    isr: int = 0
    queue_sel: int = 0
    guest_features: int = 0
    host_features: int = 0
    backend_features: int = 0
    config_len: int = 0
    config: bytearray = attrs.field(factory=bytearray, repr=False)
    config_vector: int = VIRTIO_NO_VECTOR
    generation: int = 0
    vq: list[VirtQueue] = attrs.field(factory=list, repr=False)
    vm_running: bool = True
    broken: bool = False
    broken_reason: str | None = None      # qblock: the message virtio_error printed
    disabled: bool = False
    started: bool = False
    start_on_kick: bool = False
    dma_as: AddressSpace | None = None
    vmstate: Any = attrs.field(default=None, repr=False)
    # transport (virtio-pci proxy / virtio-bus) state
    ioeventfd: bool = True                 # the proxy's "ioeventfd" property
    ioeventfd_started: bool = False
    guest_notifiers_assigned: bool = False
    notify_cb: Callable[[int], None] | None = attrs.field(default=None, repr=False)


def _desc_read(as_: AddressSpace, base: int, i: int) -> tuple[int, int, int, int]:
    return _DESC.unpack_from(as_.ram, base + i * VRING_DESC_SIZE)


def vring_avail_flags(vq: VirtQueue) -> int:
    return _U16.unpack_from(vq.vdev.dma_as.ram, vq.vring.avail)[0]


def vring_avail_idx(vq: VirtQueue) -> int:
    vq.shadow_avail_idx = _U16.unpack_from(vq.vdev.dma_as.ram, vq.vring.avail + 2)[0]
    return vq.shadow_avail_idx


def vring_avail_ring(vq: VirtQueue, i: int) -> int:
    return _U16.unpack_from(vq.vdev.dma_as.ram, vq.vring.avail + 4 + 2 * i)[0]


def vring_get_used_event(vq: VirtQueue) -> int:
    return vring_avail_ring(vq, vq.vring.num)


def vring_used_write(vq: VirtQueue, id: int, len: int, i: int) -> None:
    _USED_ELEM.pack_into(vq.vdev.dma_as.ram, vq.vring.used + 4 + VRING_USED_ELEM_SIZE * i, id, len)


def vring_used_idx(vq: VirtQueue) -> int:
    return _U16.unpack_from(vq.vdev.dma_as.ram, vq.vring.used + 2)[0]


def vring_used_idx_set(vq: VirtQueue, val: int) -> None:
    _U16.pack_into(vq.vdev.dma_as.ram, vq.vring.used + 2, val & 0xFFFF)
    vq.used_idx = val & 0xFFFF


def _vring_used_flags(vq: VirtQueue, set_mask: int, clear_mask: int) -> None:
    ram = vq.vdev.dma_as.ram
    flags = _U16.unpack_from(ram, vq.vring.used)[0]
    _U16.pack_into(ram, vq.vring.used, (flags | set_mask) & ~clear_mask)


def vring_set_avail_event(vq: VirtQueue, val: int) -> None:
    if not vq.notification:
        return
    _U16.pack_into(vq.vdev.dma_as.ram, vq.vring.used + 4 + VRING_USED_ELEM_SIZE * vq.vring.num, val & 0xFFFF)


def vring_need_event(event_idx: int, new_idx: int, old: int) -> bool:
    """Whether moving an index from ``old`` to ``new_idx`` passed ``event_idx`` (virtio_ring.h)."""
    return (new_idx - event_idx - 1) & 0xFFFF < (new_idx - old) & 0xFFFF


def _virtio_device_disabled(vdev: VirtIODevice) -> bool:
    return vdev.disabled or vdev.broken


def virtio_queue_get_avail_size(vdev: VirtIODevice, n: int) -> int:
    s = 2 if virtio_vdev_has_feature(vdev, VIRTIO_RING_F_EVENT_IDX) else 0
    return 4 + 2 * vdev.vq[n].vring.num + s


def virtio_queue_get_used_size(vdev: VirtIODevice, n: int) -> int:
    s = 2 if virtio_vdev_has_feature(vdev, VIRTIO_RING_F_EVENT_IDX) else 0
    return 4 + VRING_USED_ELEM_SIZE * vdev.vq[n].vring.num + s


def _mapped_len(as_: AddressSpace, addr: int, size: int) -> int:
    view = address_space_map(as_, addr, size, False)
    return 0 if view is None else len(view)


def virtio_init_region_cache(vdev: VirtIODevice, n: int) -> None:
    """Check that the guest's three ring parts lie in RAM ("Cannot map ..." otherwise)."""
    vq = vdev.vq[n]
    vq.vring.caches_ok = False
    if not vq.vring.desc:
        return
    as_ = vdev.dma_as
    if _mapped_len(as_, vq.vring.desc, vq.vring.num * VRING_DESC_SIZE) < vq.vring.num * VRING_DESC_SIZE:
        virtio_error(vdev, "Cannot map desc")
        return
    size = virtio_queue_get_used_size(vdev, n)
    if _mapped_len(as_, vq.vring.used, size) < size:
        virtio_error(vdev, "Cannot map used")
        return
    size = virtio_queue_get_avail_size(vdev, n)
    if _mapped_len(as_, vq.vring.avail, size) < size:
        virtio_error(vdev, "Cannot map avail")
        return
    vq.vring.caches_ok = True


def virtio_queue_set_rings(vdev: VirtIODevice, n: int, desc: int, avail: int, used: int) -> None:
    """The guest placed queue ``n``'s descriptor table, avail and used rings at these addresses."""
    vq = vdev.vq[n]
    if not vq.vring.num:
        return
    vq.vring.desc = desc
    vq.vring.avail = avail
    vq.vring.used = used
    virtio_init_region_cache(vdev, n)


def virtio_queue_set_num(vdev: VirtIODevice, n: int, num: int) -> None:
    """The guest chose a queue size (ignored, as in QEMU, if out of range or for an absent queue)."""
    vq = vdev.vq[n]
    if bool(num) != bool(vq.vring.num) or num > VIRTQUEUE_MAX_SIZE or num < 0:
        return
    vq.vring.num = num


def virtio_queue_get_num(vdev: VirtIODevice, n: int) -> int:
    return vdev.vq[n].vring.num


def virtio_queue_set_vector(vdev: VirtIODevice, n: int, vector: int) -> None:
    if n < VIRTIO_QUEUE_MAX:
        vdev.vq[n].vector = vector


def virtio_get_queue(vdev: VirtIODevice, n: int) -> VirtQueue:
    return vdev.vq[n]


def virtio_get_queue_index(vq: VirtQueue) -> int:
    return vq.queue_index


def virtio_get_num_queues(vdev: VirtIODevice) -> int:
    return sum(1 for vq in vdev.vq if vq.vring.num)


def virtio_queue_empty(vq: VirtQueue) -> bool:
    """True when the guest has made nothing new available (or the queue cannot be used)."""
    if _virtio_device_disabled(vq.vdev) or not vq.vring.avail or not vq.vring.caches_ok:
        return True
    if vq.shadow_avail_idx != vq.last_avail_idx:
        return False
    return vring_avail_idx(vq) == vq.last_avail_idx


def virtio_queue_set_notification(vq: VirtQueue, enable: bool) -> None:
    """Ask the guest to kick (enable) or not to (used ring NO_NOTIFY flag / avail_event)."""
    vq.notification = bool(enable)
    if not vq.vring.desc or not vq.vring.caches_ok:
        return
    if virtio_vdev_has_feature(vq.vdev, VIRTIO_RING_F_EVENT_IDX):
        vring_set_avail_event(vq, vring_avail_idx(vq))
    elif enable:
        _vring_used_flags(vq, 0, VRING_USED_F_NO_NOTIFY)
    else:
        _vring_used_flags(vq, VRING_USED_F_NO_NOTIFY, 0)


def virtio_queue_get_notification(vq: VirtQueue) -> bool:
    return vq.notification


def _virtqueue_get_head(vq: VirtQueue, idx: int) -> int | None:
    head = vring_avail_ring(vq, idx % vq.vring.num)
    if head >= vq.vring.num:
        virtio_error(vq.vdev, f"Guest says index {head} is available")
        return None
    return head


def _virtqueue_map_desc(vdev: VirtIODevice, sg: list[memoryview], addrs: list[int], max_num_sg: int,
                        is_write: bool, pa: int, sz: int) -> bool:
    if not sz:
        virtio_error(vdev, "virtio: zero sized buffers are not allowed")
        return False
    while sz:
        if len(sg) == max_num_sg:
            virtio_error(vdev, "virtio: too many write descriptors in indirect table")
            return False
        view = address_space_map(vdev.dma_as, pa, sz, is_write)
        if view is None:
            virtio_error(vdev, "virtio: bogus descriptor or out of resources")
            return False
        sg.append(view)
        addrs.append(pa)
        sz -= len(view)
        pa += len(view)
    return True


def virtqueue_pop(vq: VirtQueue) -> VirtQueueElement | None:
    """Take the next available chain off the queue, mapped (no copy); None if there is none or it is broken."""
    vdev = vq.vdev
    if vdev.broken:
        return None
    if virtio_queue_empty(vq):
        return None
    max_ = vq.vring.num
    if vq.inuse >= vq.vring.num:
        virtio_error(vdev, "Virtqueue size exceeded")
        return None
    head = _virtqueue_get_head(vq, vq.last_avail_idx)
    vq.last_avail_idx = (vq.last_avail_idx + 1) & 0xFFFF
    if head is None:
        return None
    if virtio_vdev_has_feature(vdev, VIRTIO_RING_F_EVENT_IDX):
        vring_set_avail_event(vq, vq.last_avail_idx)

    as_ = vdev.dma_as
    table = vq.vring.desc
    i = head
    addr, length, flags, nxt = _desc_read(as_, table, i)
    if flags & VRING_DESC_F_INDIRECT:
        if not length or length % VRING_DESC_SIZE:
            virtio_error(vdev, "Invalid size for indirect buffer table")
            return None
        if _mapped_len(as_, addr, length) < length:
            virtio_error(vdev, "Cannot map indirect buffer")
            return None
        table = addr
        max_ = length // VRING_DESC_SIZE
        i = 0
        addr, length, flags, nxt = _desc_read(as_, table, i)

    out_sg: list[memoryview] = []
    in_sg: list[memoryview] = []
    out_addr: list[int] = []
    in_addr: list[int] = []
    elem_entries = 0
    while True:
        if flags & VRING_DESC_F_WRITE:
            ok = _virtqueue_map_desc(vdev, in_sg, in_addr, VIRTQUEUE_MAX_SIZE - len(out_sg), True, addr, length)
        else:
            if in_sg:
                virtio_error(vdev, "Incorrect order for descriptors")
                return None
            ok = _virtqueue_map_desc(vdev, out_sg, out_addr, VIRTQUEUE_MAX_SIZE, False, addr, length)
        if not ok:
            return None
        elem_entries += 1
        if elem_entries > max_:
            # A chain longer than its table can only be one that loops.
            virtio_error(vdev, "Looped descriptor")
            return None
        if not flags & VRING_DESC_F_NEXT:
            break
        i = nxt
        if i >= max_:
            virtio_error(vdev, f"Desc next is {i}")
            return None
        addr, length, flags, nxt = _desc_read(as_, table, i)

    elem = VirtQueueElement(head, 1, out_addr, in_addr, out_sg, in_sg)
    vq.inuse += 1
    if trace_virtqueue_pop.event.enabled:
        trace_virtqueue_pop(vq, elem, elem.in_num, elem.out_num)
    return elem


def _virtqueue_unmap_sg(vq: VirtQueue, elem: VirtQueueElement, len: int) -> None:
    as_ = vq.vdev.dma_as
    offset = 0
    for view in elem.in_sg:
        size = min(view.nbytes, max(len - offset, 0))
        address_space_unmap(as_, view, True, size)
        offset += size
    for view in elem.out_sg:
        address_space_unmap(as_, view, False, view.nbytes)


def virtqueue_detach_element(vq: VirtQueue, elem: VirtQueueElement, len: int) -> None:
    """Give up an element without returning it to the guest (it stays out of the used ring)."""
    vq.inuse -= elem.ndescs
    _virtqueue_unmap_sg(vq, elem, len)


def virtqueue_fill(vq: VirtQueue, elem: VirtQueueElement, len: int, idx: int) -> None:
    """Write ``elem``'s used entry (head id, bytes written) ``idx`` places after the used index."""
    if trace_virtqueue_fill.event.enabled:
        trace_virtqueue_fill(vq, elem, len, idx)
    _virtqueue_unmap_sg(vq, elem, len)
    if _virtio_device_disabled(vq.vdev) or not vq.vring.used or not vq.vring.caches_ok:
        return
    vring_used_write(vq, elem.index, len, (idx + vq.used_idx) % vq.vring.num)


def virtqueue_flush(vq: VirtQueue, count: int) -> None:
    """Publish ``count`` filled entries by moving the used index."""
    if _virtio_device_disabled(vq.vdev) or not vq.vring.used or not vq.vring.caches_ok:
        vq.inuse -= count
        return
    if trace_virtqueue_flush.event.enabled:
        trace_virtqueue_flush(vq, count)
    old = vq.used_idx
    new = (old + count) & 0xFFFF
    vring_used_idx_set(vq, new)
    vq.inuse -= count
    # (int16_t)(new - signalled_used) < (uint16_t)(new - old): the guest's event index may have been passed
    diff = (new - vq.signalled_used) & 0xFFFF
    if (diff - 0x10000 if diff >= 0x8000 else diff) < (new - old) & 0xFFFF:
        vq.signalled_used_valid = False


def virtqueue_push(vq: VirtQueue, elem: VirtQueueElement, len: int) -> None:
    """Return a completed element to the guest: fill its used entry and flush."""
    virtqueue_fill(vq, elem, len, 0)
    virtqueue_flush(vq, 1)


# ---------------------------------------------------------------------------
# Interrupts


def virtio_set_isr(vdev: VirtIODevice, value: int) -> None:
    vdev.isr |= value


def virtio_notify_vector(vdev: VirtIODevice, vector: int) -> None:
    """Raise the interrupt line the transport gives ``vector`` (the guest's handler)."""
    if vdev.broken:
        return
    if vdev.notify_cb is not None:
        vdev.notify_cb(vector)


def _virtio_should_notify(vdev: VirtIODevice, vq: VirtQueue) -> bool:
    if (virtio_vdev_has_feature(vdev, VIRTIO_F_NOTIFY_ON_EMPTY) and not vq.inuse
            and virtio_queue_empty(vq)):
        return True
    if not vq.vring.caches_ok:
        return False
    if not virtio_vdev_has_feature(vdev, VIRTIO_RING_F_EVENT_IDX):
        return not vring_avail_flags(vq) & VRING_AVAIL_F_NO_INTERRUPT
    v = vq.signalled_used_valid
    vq.signalled_used_valid = True
    old = vq.signalled_used
    new = vq.signalled_used = vq.used_idx
    return not v or vring_need_event(vring_get_used_event(vq), new, old)


def virtio_irq(vq: VirtQueue) -> None:
    virtio_set_isr(vq.vdev, 0x1)
    virtio_notify_vector(vq.vdev, vq.vector)


def virtio_notify(vdev: VirtIODevice, vq: VirtQueue) -> None:
    """Interrupt the guest about ``vq`` unless it asked not to be (NO_INTERRUPT flag or used_event)."""
    if not _virtio_should_notify(vdev, vq):
        return
    if trace_virtio_notify.event.enabled:
        trace_virtio_notify(vdev, vq)
    virtio_irq(vq)


def virtio_notify_irqfd(vdev: VirtIODevice, vq: VirtQueue) -> None:
    """Interrupt the guest through the queue's guest notifier (the irqfd dataplane uses from its thread)."""
    if not _virtio_should_notify(vdev, vq):
        return
    if trace_virtio_notify_irqfd.event.enabled:
        trace_virtio_notify_irqfd(vdev, vq)
    virtio_set_isr(vdev, 0x1)
    event_notifier_set(vq.guest_notifier)


def virtio_notify_config(vdev: VirtIODevice) -> None:
    """Tell a running driver that the config space (or the status) changed."""
    if not vdev.status & VIRTIO_CONFIG_S_DRIVER_OK:
        return
    virtio_set_isr(vdev, 0x3)
    vdev.generation += 1
    virtio_notify_vector(vdev, vdev.config_vector)


def virtio_error(vdev: VirtIODevice, msg: str) -> None:
    """The guest broke the protocol: report it and stop the device until the guest resets it."""
    error_report(msg)
    if trace_virtio_error.event.enabled:
        trace_virtio_error(vdev, msg)
    vdev.broken_reason = msg
    if virtio_vdev_has_feature(vdev, VIRTIO_F_VERSION_1):
        vdev.status |= VIRTIO_CONFIG_S_NEEDS_RESET
        virtio_notify_config(vdev)
    vdev.broken = True


# ---------------------------------------------------------------------------
# The guest's kick


def virtio_queue_notify(vdev: VirtIODevice, n: int) -> None:
    """The guest kicked queue ``n``: set its host notifier (ioeventfd) or run the handler now."""
    vq = vdev.vq[n]
    if not vq.vring.desc or vdev.broken:
        return
    if trace_virtio_queue_notify.event.enabled:
        trace_virtio_queue_notify(vdev, n, vq)
    if vq.host_notifier_enabled:
        event_notifier_set(vq.host_notifier)
    elif vq.handle_output is not None:
        vq.handle_output(vdev, vq)
        if vdev.start_on_kick:
            _virtio_set_started(vdev, True)


def _virtio_queue_notify_aio_vq(vq: VirtQueue) -> bool:
    if vq.vring.desc and vq.handle_aio_output is not None:
        vdev = vq.vdev
        if trace_virtio_queue_notify.event.enabled:
            trace_virtio_queue_notify(vdev, vq.queue_index, vq)
        return bool(vq.handle_aio_output(vdev, vq))
    return False


def _virtio_queue_host_notifier_aio_read(n: EventNotifier) -> None:
    vq: VirtQueue = n.vq
    if event_notifier_test_and_clear(n):
        _virtio_queue_notify_aio_vq(vq)


def virtio_queue_get_host_notifier(vq: VirtQueue) -> EventNotifier:
    return vq.host_notifier


def virtio_queue_aio_set_host_notifier_handler(vq: VirtQueue, ctx: AioContext,
                                               handle_output: Callable[[VirtIODevice, VirtQueue], bool] | None
                                               ) -> None:
    """Serve the queue's kicks in ``ctx`` with ``handle_output``; None stops (serving a kick still pending)."""
    if handle_output is not None:
        vq.handle_aio_output = handle_output
        aio_set_event_notifier(ctx, vq.host_notifier, _virtio_queue_host_notifier_aio_read, is_external=True)
    else:
        aio_set_event_notifier(ctx, vq.host_notifier, None, is_external=True)
        _virtio_queue_host_notifier_aio_read(vq.host_notifier)
        vq.handle_aio_output = None


def _virtio_queue_host_notifier_read(n: EventNotifier) -> None:
    vq: VirtQueue = n.vq
    if event_notifier_test_and_clear(n):
        if vq.vring.desc and vq.handle_output is not None:
            vq.handle_output(vq.vdev, vq)


def _virtio_queue_guest_notifier_read(n: EventNotifier) -> None:
    vq: VirtQueue = n.vq
    if event_notifier_test_and_clear(n):
        virtio_irq(vq)


# ---------------------------------------------------------------------------
# virtio-bus: ioeventfd and notifiers


def virtio_device_ioeventfd_enabled(vdev: VirtIODevice) -> bool:
    return vdev.ioeventfd


def virtio_bus_set_host_notifier(vdev: VirtIODevice, n: int, assign: bool) -> int:
    """Back queue ``n``'s kick with an EventNotifier (created set, so a pending kick is not lost)."""
    vq = vdev.vq[n]
    if assign:
        vq.host_notifier = event_notifier_init(True)
        vq.host_notifier.vq = vq
    vq.host_notifier_enabled = assign
    return 0


def virtio_bus_cleanup_host_notifier(vdev: VirtIODevice, n: int) -> None:
    vq = vdev.vq[n]
    if vq.host_notifier is not None:
        event_notifier_cleanup(vq.host_notifier)
        vq.host_notifier = None


def virtio_bus_set_guest_notifiers(vdev: VirtIODevice, nvqs: int, assign: bool) -> int:
    """Deliver queue interrupts through EventNotifiers read by the main loop (virtio-pci without irqfd)."""
    main = qemu_get_aio_context()
    for n in range(nvqs):
        vq = vdev.vq[n]
        if assign:
            vq.guest_notifier = event_notifier_init(False)
            vq.guest_notifier.vq = vq
            aio_set_event_notifier(main, vq.guest_notifier, _virtio_queue_guest_notifier_read)
        elif vq.guest_notifier is not None:
            aio_set_event_notifier(main, vq.guest_notifier, None)
            _virtio_queue_guest_notifier_read(vq.guest_notifier)   # an interrupt still pending is delivered
            event_notifier_cleanup(vq.guest_notifier)
            vq.guest_notifier = None
    vdev.guest_notifiers_assigned = assign
    return 0


def _virtio_device_start_ioeventfd_impl(vdev: VirtIODevice) -> int:
    """The generic ioeventfd: host notifiers served by the main loop with each queue's handle_output."""
    main = qemu_get_aio_context()
    for n, vq in enumerate(vdev.vq):
        if not vq.vring.num:
            continue
        virtio_bus_set_host_notifier(vdev, n, True)
        aio_set_event_notifier(main, vq.host_notifier, _virtio_queue_host_notifier_read, is_external=True)
    return 0


def _virtio_device_stop_ioeventfd_impl(vdev: VirtIODevice) -> None:
    main = qemu_get_aio_context()
    for n, vq in enumerate(vdev.vq):
        if vq.host_notifier is None:
            continue
        aio_set_event_notifier(main, vq.host_notifier, None, is_external=True)
        _virtio_queue_host_notifier_read(vq.host_notifier)
        virtio_bus_set_host_notifier(vdev, n, False)
        virtio_bus_cleanup_host_notifier(vdev, n)


def virtio_bus_start_ioeventfd(vdev: VirtIODevice) -> int:
    if not vdev.ioeventfd:
        return -1
    if vdev.ioeventfd_started:
        return 0
    r = vdev.class_.start_ioeventfd(vdev)
    if r < 0:
        error_report("virtio_bus_start_ioeventfd: failed. Fallback to userspace (slower).")
        return r
    vdev.ioeventfd_started = True
    return 0


def virtio_bus_stop_ioeventfd(vdev: VirtIODevice) -> None:
    if not vdev.ioeventfd_started:
        return
    vdev.class_.stop_ioeventfd(vdev)
    vdev.ioeventfd_started = False


def virtio_device_start_ioeventfd(vdev: VirtIODevice) -> int:
    return virtio_bus_start_ioeventfd(vdev)


def virtio_device_stop_ioeventfd(vdev: VirtIODevice) -> None:
    virtio_bus_stop_ioeventfd(vdev)


# ---------------------------------------------------------------------------
# Status, features, config, reset


def _virtio_set_started(vdev: VirtIODevice, started: bool) -> None:
    if started:
        vdev.start_on_kick = False
    vdev.started = started


def virtio_set_status(vdev: VirtIODevice, val: int) -> int:
    """Store the driver's status byte, letting the device react (set_status) first."""
    k = vdev.class_
    if trace_virtio_set_status.event.enabled:
        trace_virtio_set_status(vdev, val)
    if virtio_vdev_has_feature(vdev, VIRTIO_F_VERSION_1):
        if not vdev.status & VIRTIO_CONFIG_S_FEATURES_OK and val & VIRTIO_CONFIG_S_FEATURES_OK:
            if k.validate_features is not None:
                ret = k.validate_features(vdev)
                if ret:
                    return ret
    if (vdev.status & VIRTIO_CONFIG_S_DRIVER_OK) != (val & VIRTIO_CONFIG_S_DRIVER_OK):
        _virtio_set_started(vdev, bool(val & VIRTIO_CONFIG_S_DRIVER_OK))
    if k.set_status is not None:
        k.set_status(vdev, val)
    vdev.status = val
    return 0


def virtio_set_features(vdev: VirtIODevice, val: int) -> int:
    """Take the features the guest acknowledged (only those offered); -1 if it asked for others."""
    if vdev.status & VIRTIO_CONFIG_S_FEATURES_OK:
        return -22  # -EINVAL: negotiation is over
    bad = (val & ~vdev.host_features) != 0
    val &= vdev.host_features
    k = vdev.class_
    if k.set_features is not None:
        k.set_features(vdev, val)
    vdev.guest_features = val
    if virtio_vdev_has_feature(vdev, VIRTIO_RING_F_EVENT_IDX):
        for n, vq in enumerate(vdev.vq):
            if vq.vring.num:
                virtio_init_region_cache(vdev, n)
    if not vdev.started and not virtio_vdev_has_feature(vdev, VIRTIO_F_VERSION_1):
        vdev.start_on_kick = True
    return -1 if bad else 0


def virtio_reset(vdev: VirtIODevice) -> None:
    """Device reset: the device forgets the driver, its queues and any broken state."""
    virtio_set_status(vdev, 0)
    k = vdev.class_
    if k.reset is not None:
        k.reset(vdev)
    vdev.start_on_kick = False
    vdev.started = False
    vdev.broken = False
    vdev.broken_reason = None
    vdev.guest_features = 0
    vdev.queue_sel = 0
    vdev.status = 0
    vdev.disabled = False
    vdev.isr = 0
    vdev.config_vector = VIRTIO_NO_VECTOR
    for vq in vdev.vq:
        vq.vring.desc = vq.vring.avail = vq.vring.used = 0
        vq.vring.caches_ok = False
        vq.last_avail_idx = vq.shadow_avail_idx = vq.used_idx = 0
        vq.vector = VIRTIO_NO_VECTOR
        vq.signalled_used = 0
        vq.signalled_used_valid = False
        vq.notification = True
        vq.vring.num = vq.vring.num_default
        vq.inuse = 0


def _config_read(vdev: VirtIODevice, addr: int, fmt: struct.Struct) -> int:
    if addr + fmt.size > vdev.config_len:
        return (1 << (8 * fmt.size)) - 1
    vdev.class_.get_config(vdev, vdev.config)
    return fmt.unpack_from(vdev.config, addr)[0]


def _config_write(vdev: VirtIODevice, addr: int, fmt: struct.Struct, val: int) -> None:
    if addr + fmt.size > vdev.config_len:
        return
    fmt.pack_into(vdev.config, addr, val & ((1 << (8 * fmt.size)) - 1))
    if vdev.class_.set_config is not None:
        vdev.class_.set_config(vdev, vdev.config)


_U8 = struct.Struct("<B")


def virtio_config_modern_readb(vdev: VirtIODevice, addr: int) -> int:
    return _config_read(vdev, addr, _U8)


def virtio_config_modern_readw(vdev: VirtIODevice, addr: int) -> int:
    return _config_read(vdev, addr, _U16)


def virtio_config_modern_readl(vdev: VirtIODevice, addr: int) -> int:
    return _config_read(vdev, addr, _U32)


def virtio_config_modern_writeb(vdev: VirtIODevice, addr: int, val: int) -> None:
    _config_write(vdev, addr, _U8, val)


def virtio_config_modern_writew(vdev: VirtIODevice, addr: int, val: int) -> None:
    _config_write(vdev, addr, _U16, val)


def virtio_config_modern_writel(vdev: VirtIODevice, addr: int, val: int) -> None:
    _config_write(vdev, addr, _U32, val)


# ---------------------------------------------------------------------------
# The transport as the guest sees it (virtio-pci's common configuration, reduced)


def virtio_transport_read_host_features(vdev: VirtIODevice) -> int:
    return vdev.host_features


def virtio_transport_write_guest_features(vdev: VirtIODevice, val: int) -> int:
    return virtio_set_features(vdev, val)


def virtio_transport_read_status(vdev: VirtIODevice) -> int:
    return vdev.status


def virtio_transport_write_status(vdev: VirtIODevice, val: int) -> None:
    """A status register write: ioeventfd stops without DRIVER_OK, starts with it; 0 resets the device."""
    if not val & VIRTIO_CONFIG_S_DRIVER_OK:
        virtio_bus_stop_ioeventfd(vdev)
    virtio_set_status(vdev, val & 0xFF)
    if val & VIRTIO_CONFIG_S_DRIVER_OK:
        virtio_bus_start_ioeventfd(vdev)
    if vdev.status == 0:
        virtio_reset(vdev)


def virtio_transport_read_isr(vdev: VirtIODevice) -> int:
    """Reading the ISR register returns it and clears it."""
    val, vdev.isr = vdev.isr, 0
    return val


def virtio_transport_queue_max(vdev: VirtIODevice, n: int) -> int:
    """The queue size register before the guest writes it (0: no such queue)."""
    return vdev.vq[n].vring.num if n < VIRTIO_QUEUE_MAX else 0


def virtio_transport_setup_queue(vdev: VirtIODevice, n: int, num: int, desc: int, avail: int, used: int,
                                 vector: int = VIRTIO_NO_VECTOR) -> None:
    """Size, interrupt vector and ring addresses of queue ``n``, then queue_enable (virtio 1.x order)."""
    virtio_queue_set_num(vdev, n, num)
    virtio_queue_set_vector(vdev, n, vector)
    virtio_queue_set_rings(vdev, n, desc, avail, used)


def virtio_transport_set_config_vector(vdev: VirtIODevice, vector: int) -> None:
    vdev.config_vector = vector


def virtio_transport_set_irq(vdev: VirtIODevice, notify_cb: Callable[[int], None] | None) -> None:
    """Connect the guest's interrupt handler: ``notify_cb(vector)``."""
    vdev.notify_cb = notify_cb


# ---------------------------------------------------------------------------
# Realize, queues, the VM's run state


def virtio_vmstate_change(vdev: VirtIODevice, running: bool, state: RunState) -> None:
    """The VM stopped or runs again: the transport stops or restarts ioeventfd (and so dataplane)."""
    backend_run = running and bool(vdev.status & VIRTIO_CONFIG_S_DRIVER_OK)
    vdev.vm_running = running
    if backend_run:
        virtio_set_status(vdev, vdev.status)
        virtio_bus_start_ioeventfd(vdev)
    else:
        virtio_bus_stop_ioeventfd(vdev)
        virtio_set_status(vdev, vdev.status)


def virtio_init(vdev: VirtIODevice, name: str, device_id: int, config_size: int) -> None:
    """Set up the virtio core of a device being realized: queues (all absent), config space, vmstate handler."""
    vdev.device_id = device_id
    vdev.status = 0
    vdev.isr = 0
    vdev.queue_sel = 0
    vdev.config_vector = VIRTIO_NO_VECTOR
    vdev.vq = [VirtQueue(vdev, i) for i in range(VIRTIO_QUEUE_MAX)]
    vdev.vm_running = runstate_is_running()
    vdev.broken = False
    vdev.name = name
    vdev.config_len = config_size
    vdev.config = bytearray(config_size)
    vdev.vmstate = qemu_add_vm_change_state_handler(virtio_vmstate_change, vdev)


def virtio_cleanup(vdev: VirtIODevice) -> None:
    if vdev.vmstate is not None:
        qemu_del_vm_change_state_handler(vdev.vmstate)
        vdev.vmstate = None
    vdev.config = bytearray()
    vdev.vq = []


def virtio_add_queue(vdev: VirtIODevice, queue_size: int,
                     handle_output: Callable[[VirtIODevice, VirtQueue], None]) -> VirtQueue:
    """Add the first absent queue with ``queue_size`` entries; ``handle_output`` serves its kicks."""
    for i, vq in enumerate(vdev.vq):
        if vq.vring.num == 0:
            break
    else:
        raise AssertionError("virtio_add_queue: all VIRTIO_QUEUE_MAX queues in use")
    if queue_size > VIRTQUEUE_MAX_SIZE:
        raise AssertionError(f"virtio_add_queue: queue size {queue_size} > VIRTQUEUE_MAX_SIZE")
    vq.vring.num = queue_size
    vq.vring.num_default = queue_size
    vq.vring.align = VIRTIO_PCI_VRING_ALIGN
    vq.handle_output = handle_output
    vq.handle_aio_output = None
    return vq


def virtio_del_queue(vdev: VirtIODevice, n: int) -> None:
    vq = vdev.vq[n]
    vq.vring.num = 0
    vq.vring.num_default = 0
    vq.handle_output = None
    vq.handle_aio_output = None


def _virtio_bus_device_plugged(vdev: VirtIODevice) -> None:
    # virtio-pci's pre_plugged offers VERSION_1 (a modern device), then the device adds its features.
    if vdev.dma_as is None:
        vdev.dma_as = address_space_memory()
    vdev.host_features = virtio_add_feature(vdev.host_features, VIRTIO_F_VERSION_1)
    vdev.host_features = vdev.class_.get_features(vdev, vdev.host_features)


def virtio_device_realize(dev: VirtIODevice) -> None:
    vdc = dev.class_
    if vdc.vdev_realize is not None:
        vdc.vdev_realize(dev)
    try:
        _virtio_bus_device_plugged(dev)
    except Error:
        vdc.vdev_unrealize(dev)
        raise


def virtio_device_unrealize(dev: VirtIODevice) -> None:
    vdc = dev.class_
    virtio_bus_stop_ioeventfd(dev)     # virtio_bus_device_unplugged: the proxy stops ioeventfd
    if vdc.vdev_unrealize is not None:
        vdc.vdev_unrealize(dev)


TYPE_VIRTIO_DEVICE = "virtio-device"


def _resolve_address_space(name: str) -> AddressSpace | None:
    mem = address_space_memory()
    return mem if name == mem.name else None


_prop_memory = PropertyInfoLink("memory-region", AddressSpace, _resolve_address_space)

virtio_properties = [
    # DEFINE_VIRTIO_COMMON_FEATURES
    DEFINE_PROP_BIT64("indirect_desc", "host_features", VIRTIO_RING_F_INDIRECT_DESC, True),
    DEFINE_PROP_BIT64("event_idx", "host_features", VIRTIO_RING_F_EVENT_IDX, True),
    DEFINE_PROP_BIT64("notify_on_empty", "host_features", VIRTIO_F_NOTIFY_ON_EMPTY, True),
    DEFINE_PROP_BIT64("any_layout", "host_features", VIRTIO_F_ANY_LAYOUT, True),
    # qblock: the transport's properties live on the device (there is no separate proxy)
    DEFINE_PROP_BOOL("ioeventfd", "ioeventfd", True),
    DEFINE_PROP_LINK("memory", "dma_as", _prop_memory),
]


def _virtio_device_class_init(klass: ObjectClass, data: Any) -> None:
    klass.realize = virtio_device_realize
    klass.unrealize = virtio_device_unrealize
    device_class_set_props(klass, virtio_properties)
    # VirtioDeviceClass: what a concrete device fills in
    klass.vdev_realize = None          # QEMU: vdc->realize (dc->realize is virtio_device_realize)
    klass.vdev_unrealize = None
    klass.get_features = lambda vdev, features: features
    klass.set_features = None
    klass.validate_features = None
    klass.get_config = lambda vdev, config: None
    klass.set_config = None
    klass.set_status = None
    klass.reset = None
    klass.start_ioeventfd = _virtio_device_start_ioeventfd_impl
    klass.stop_ioeventfd = _virtio_device_stop_ioeventfd_impl


def _register_types() -> None:
    type_register_static(TypeInfo(name=TYPE_VIRTIO_DEVICE, parent=TYPE_DEVICE, instance_struct=VirtIODevice,
                                  abstract=True, class_init=_virtio_device_class_init))


type_init(_register_types)
