"""Split virtqueues in guest memory (hw/virtio/virtio.c): pop, push, notification, broken chains, negotiation."""
import struct

import attrs
import pytest

from qblock.hw.guest import GuestError, VirtioBlkGuest
from qblock.hw.memory import AddressSpace
from qblock.hw.virtio import (
    TYPE_VIRTIO_DEVICE,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VirtIODevice,
    virtio_add_queue,
    virtio_cleanup,
    virtio_config_modern_readl,
    virtio_del_queue,
    virtio_init,
    virtio_notify,
    virtio_queue_empty,
    virtio_queue_set_notification,
    virtio_set_features,
    virtio_transport_read_status,
    virtio_transport_write_status,
    virtqueue_detach_element,
    virtqueue_pop,
    virtqueue_push,
    vring_need_event,
)
from qblock.qom.object import (
    TypeInfo,
    object_class_by_name,
    object_unparent,
    qdev_device_add,
    type_register_static,
)
from qblock.util.aio import aio_poll, qemu_get_aio_context

GUEST_BASE_FEATURES = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_RING_F_EVENT_IDX)


@attrs.define(eq=False)
class VirtIOTestDev(VirtIODevice):
    popped: list = attrs.field(factory=list)
    auto_complete: bool = False


def _handle_output(vdev, vq):
    while (elem := virtqueue_pop(vq)) is not None:
        vdev.popped.append(elem)
        if vdev.auto_complete:
            virtqueue_push(vq, elem, sum(v.nbytes for v in elem.in_sg))
            virtio_notify(vdev, vq)


def _realize(vdev):
    virtio_init(vdev, "virtio-test", 0x42, 60)
    virtio_add_queue(vdev, 8, _handle_output)


def _unrealize(vdev):
    virtio_del_queue(vdev, 0)
    virtio_cleanup(vdev)


def _class_init(klass, data):
    klass.vdev_realize = _realize
    klass.vdev_unrealize = _unrealize
    klass.get_config = lambda vdev, config: config.__setitem__(slice(0, 4), struct.pack("<I", 0xC0FFEE))


if object_class_by_name("virtio-test-device") is None:
    type_register_static(TypeInfo(name="virtio-test-device", parent=TYPE_VIRTIO_DEVICE,
                                  instance_struct=VirtIOTestDev, class_init=_class_init))


@pytest.fixture
def dev():
    """A realized test device (one queue of 8, kicks served inside the kick) in 1 MiB of guest RAM."""
    d = qdev_device_add({"driver": "virtio-test-device", "memory": AddressSpace(1 << 20), "ioeventfd": False})
    yield d
    object_unparent(d)


def _guest(dev, **kw):
    kw.setdefault("accept", GUEST_BASE_FEATURES)
    return VirtioBlkGuest(dev, **kw)


def _buf(g, data=b"", size=None, fill=0):
    size = len(data) if size is None else size
    addr = g.alloc(size)
    g.write_mem(addr, data or bytes([fill]) * size)
    return addr


def test_pop_maps_chain_into_guest_memory_without_copying(dev):
    """virtqueue_pop turns a chain into out_sg then in_sg, each a memoryview of guest RAM itself."""
    g = _guest(dev)
    a, b, c = _buf(g, b"hello"), _buf(g, b"world!"), _buf(g, size=7)
    req = g.queue_chain([(a, 5, False), (b, 6, False), (c, 7, True)])
    g.kick()
    (elem,) = dev.popped
    assert elem.index == req.head
    assert [bytes(v) for v in elem.out_sg] == [b"hello", b"world!"]
    assert elem.out_addr == [a, b] and elem.in_addr == [c]
    assert all(v.obj is dev.dma_as.ram for v in elem.out_sg + elem.in_sg)
    elem.in_sg[0][:3] = b"abc"                      # the device writes straight into guest memory
    assert g.read_mem(c, 3) == b"abc"


def test_indirect_table_is_walked_like_a_direct_chain(dev):
    """A chain in an indirect table pops to the same element shape, using one ring descriptor."""
    g = _guest(dev)
    a, c = _buf(g, b"head"), _buf(g, size=4)
    req = g.queue_chain([(a, 4, False), (c, 4, True)], indirect=True)
    assert len(req.descs) == 1
    g.kick()
    (elem,) = dev.popped
    assert [bytes(v) for v in elem.out_sg] == [b"head"] and elem.in_num == 1


def test_push_fills_used_ring_and_interrupts_guest(dev):
    """virtqueue_push writes (head, len) to the used ring; virtio_notify raises the guest's interrupt."""
    dev.auto_complete = True
    g = _guest(dev)
    c = _buf(g, size=9)
    req = g.queue_chain([(_buf(g, b"x"), 1, False), (c, 9, True)])
    g.kick()
    g.wait(req)
    assert g.used_log == [(0, req.head, 9)] and req.used_len == 9
    assert g.interrupts == 1 and g.unexpected == []
    assert dev.vq[0].inuse == 0


def test_detached_element_never_reaches_the_used_ring(dev):
    """virtqueue_detach_element gives the element up: the in-use count drops, nothing is published."""
    g = _guest(dev)
    g.queue_chain([(_buf(g, b"x"), 1, False)])
    g.kick()
    vq = dev.vq[0]
    assert vq.inuse == 1
    virtqueue_detach_element(vq, dev.popped[0], 0)
    assert vq.inuse == 0 and vq.used_idx == 0


def test_queue_empty_tracks_the_avail_index(dev):
    """virtio_queue_empty is false from the moment the guest moves the avail index until the device pops."""
    g = _guest(dev)
    vq = dev.vq[0]
    assert virtio_queue_empty(vq)
    g.queue_chain([(_buf(g, b"x"), 1, False)])
    assert virtio_queue_empty(vq)                  # queued, but the avail index has not moved yet
    g.publish()
    assert not virtio_queue_empty(vq)
    assert virtqueue_pop(vq) is not None
    assert virtio_queue_empty(vq) and virtqueue_pop(vq) is None


def test_notification_flag_decides_whether_the_guest_kicks(dev):
    """Without EVENT_IDX, notifications off set NO_NOTIFY and the guest skips its kick; back on, it kicks."""
    g = _guest(dev, accept=GUEST_BASE_FEATURES & ~(1 << VIRTIO_RING_F_EVENT_IDX))
    vq = dev.vq[0]
    g.queue_chain([(_buf(g, b"x"), 1, False)])
    assert g.kick() is True and len(dev.popped) == 1
    virtio_queue_set_notification(vq, False)
    g.queue_chain([(_buf(g, b"y"), 1, False)])
    assert g.kick() is False and len(dev.popped) == 1
    virtio_queue_set_notification(vq, True)
    g.queue_chain([(_buf(g, b"z"), 1, False)])
    assert g.kick() is True and len(dev.popped) == 3


def test_avail_event_decides_whether_the_guest_kicks(dev):
    """With EVENT_IDX the guest kicks only when its avail index passes the avail_event the device left."""
    g = _guest(dev)
    vq = dev.vq[0]
    g.queue_chain([(_buf(g, b"a"), 1, False)])
    assert g.kick() is True and len(dev.popped) == 1        # pop moved avail_event to 1
    virtio_queue_set_notification(vq, False)                 # avail_event now stays where it is
    g.queue_chain([(_buf(g, b"b"), 1, False)])
    assert g.kick() is True and len(dev.popped) == 2        # 1 -> 2 passes avail_event 1
    g.queue_chain([(_buf(g, b"c"), 1, False)])
    assert g.kick() is False and len(dev.popped) == 2       # 2 -> 3 does not
    virtio_queue_set_notification(vq, True)                  # avail_event = current avail index (3)
    g.queue_chain([(_buf(g, b"d"), 1, False)])
    assert g.kick() is True and len(dev.popped) == 4


def test_event_idx_interrupts_only_past_used_event(dev):
    """With EVENT_IDX the device interrupts only when the used index passes the guest's used_event."""
    dev.auto_complete = True
    g = _guest(dev)
    reqs = [g.queue_chain([(_buf(g, bytes([i])), 1, False)]) for i in range(3)]
    g.kick()
    g.wait_all()
    # One interrupt for the first completion; used_event (0) was passed once, later pushes did not cross it
    # again until the guest moved it.
    assert all(r.done for r in reqs) and g.interrupts == 1
    assert vring_need_event(0, 1, 0) and not vring_need_event(0, 2, 1)


@pytest.mark.parametrize("build, message", [
    ("loop", "Looped descriptor"),
    ("next_out_of_range", "Desc next is 9"),
    ("head_out_of_range", "Guest says index 8 is available"),
    ("zero_length", "virtio: zero sized buffers are not allowed"),
    ("outside_ram", "virtio: bogus descriptor or out of resources"),
    ("crosses_end_of_ram", "virtio: bogus descriptor or out of resources"),
    ("read_after_write", "Incorrect order for descriptors"),
    ("indirect_bad_size", "Invalid size for indirect buffer table"),
    ("indirect_outside_ram", "Cannot map indirect buffer"),
])
def test_broken_chains_mark_the_device_broken(dev, build, message):
    """Each malformed chain is virtio_error: nothing popped, device broken, NEEDS_RESET, config interrupt."""
    g = _guest(dev)
    a = _buf(g, b"data")
    ram = dev.dma_as.size
    if build == "loop":
        i, j = g.alloc_descs(2)
        g.write_desc(i, a, 4, VRING_DESC_F_NEXT, j)
        g.write_desc(j, a, 4, VRING_DESC_F_NEXT, i)
        g.publish_raw_head(i)
    elif build == "next_out_of_range":
        (i,) = g.alloc_descs(1)
        g.write_desc(i, a, 4, VRING_DESC_F_NEXT, 9)
        g.publish_raw_head(i)
    elif build == "head_out_of_range":
        g.publish_raw_head(8)
    elif build == "zero_length":
        g.queue_chain([(a, 4, False), (a, 0, True)])
    elif build == "outside_ram":
        g.queue_chain([(ram + 4096, 4, False)])
    elif build == "crosses_end_of_ram":
        g.queue_chain([(ram - 2, 4, False)])
    elif build == "read_after_write":
        g.queue_chain([(a, 4, True), (a, 4, False)])
    elif build == "indirect_bad_size":
        (i,) = g.alloc_descs(1)
        g.write_desc(i, a, 15, 4)                  # VRING_DESC_F_INDIRECT with a length not 16*n
        g.publish_raw_head(i)
    elif build == "indirect_outside_ram":
        (i,) = g.alloc_descs(1)
        g.write_desc(i, ram - 16, 32, 4)
        g.publish_raw_head(i)
    g.kick()
    assert dev.popped == []
    assert dev.broken and dev.broken_reason == message
    assert virtio_transport_read_status(dev) & VIRTIO_CONFIG_S_NEEDS_RESET
    aio_poll(qemu_get_aio_context(), False)
    assert g.needs_reset and g.config_interrupts == 1
    # A broken device ignores kicks until the guest resets it; then it works again.
    g.queue_chain([(_buf(g, b"x"), 1, False)])
    g.kick()
    assert dev.popped == []
    g.reset()
    assert not dev.broken and not g.needs_reset
    g.queue_chain([(_buf(g, b"ok"), 2, False)])
    g.kick()
    assert [bytes(v) for v in dev.popped[0].out_sg] == [b"ok"]


def test_more_chains_in_use_than_queue_entries_is_an_error(dev):
    """Popping while every entry is in use (a guest reusing heads) is "Virtqueue size exceeded"."""
    g = _guest(dev)
    reqs = [g.queue_chain([(_buf(g, bytes([i])), 1, False)]) for i in range(8)]
    g.kick()
    assert len(dev.popped) == 8 and dev.vq[0].inuse == 8
    g.publish_raw_head(reqs[0].head)
    g.kick()
    assert dev.broken_reason == "Virtqueue size exceeded"


def test_rings_outside_guest_memory_cannot_be_mapped(dev):
    """Ring addresses beyond RAM are refused when the guest enables the queue ("Cannot map ...")."""
    from qblock.hw.virtio import virtio_transport_setup_queue
    g = _guest(dev)
    virtio_transport_setup_queue(dev, 0, 8, dev.dma_as.size - 64, 0x100, 0x400)
    assert dev.broken_reason == "Cannot map desc"
    g.reset()
    virtio_transport_setup_queue(dev, 0, 8, 0x2000, 0x3000, dev.dma_as.size - 8)
    assert dev.broken_reason == "Cannot map used"


def test_feature_negotiation_keeps_only_offered_bits(dev):
    """The device keeps what it offered of the guest's features; asking more, or too late, is refused."""
    virtio_transport_write_status(dev, 0)
    offered = dev.host_features
    assert offered >> VIRTIO_F_VERSION_1 & 1
    assert virtio_set_features(dev, offered | (1 << 50)) == -1
    assert dev.guest_features == offered
    virtio_transport_write_status(dev, VIRTIO_CONFIG_S_FEATURES_OK)
    assert virtio_set_features(dev, 0) < 0 and dev.guest_features == offered


def test_guest_without_version_1_gives_up(dev):
    """A guest that does not accept VIRTIO_F_VERSION_1 marks the device FAILED."""
    with pytest.raises(GuestError, match="VERSION_1"):
        _guest(dev, accept=0)
    assert not virtio_transport_read_status(dev) & VIRTIO_CONFIG_S_DRIVER_OK


def test_config_space_reads_go_through_get_config(dev):
    """Config reads refresh from the device; reads past the config space return all ones."""
    assert virtio_config_modern_readl(dev, 0) == 0xC0FFEE
    assert virtio_config_modern_readl(dev, 58) == 0xFFFFFFFF


def test_reset_forgets_the_rings(dev):
    """A status write of 0 resets queue state; a new bring-up starts from index 0."""
    dev.auto_complete = True
    g = _guest(dev)
    g.wait(g._sync(g.queue_chain([(_buf(g, b"x"), 1, False), (_buf(g, size=1), 1, True)])))
    assert dev.vq[0].used_idx == 1
    g.reset()
    vq = dev.vq[0]
    assert (vq.last_avail_idx, vq.used_idx, vq.inuse) == (0, 0, 0)
    req = g._sync(g.queue_chain([(_buf(g, b"y"), 1, False), (_buf(g, size=1), 1, True)]))
    assert req.done and vq.used_idx == 1
