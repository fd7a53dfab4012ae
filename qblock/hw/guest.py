"""A minimal virtio-blk guest driver, the other side of :mod:`qblock.hw.virtio_blk`.

It does what a guest kernel's virtio_blk + virtio_ring do, reduced: reset the
device, negotiate features, read the config space, lay the split rings out in
guest memory, and then for each request allocate a header, data buffers and
a status byte in guest RAM, chain descriptors over them (header and write
data device-readable, read data and status device-writable), publish the
head in the avail ring and kick.  The interrupt handler walks the used ring
and completes requests.

Two interfaces:

* synchronous -- ``write(sector, data)``, ``read(sector, nbytes)``,
  ``flush()``, ``discard(sector, nb_sectors)``, ``write_zeroes(...)``,
  ``get_id()``: queue one request, kick, poll the main loop until it
  completed; each returns the completed :class:`GuestRequest`;
* queued -- ``queue_write``/``queue_read``/... fill descriptors and avail
  slots, ``kick()`` moves the avail index over all of them at once and
  notifies, ``wait_all()``: a batch the device sees in one pass, which is
  where merging shows.  (Linux moves the index per request; publishing the
  batch at the kick keeps an IOThread from seeing half of it.)

For tests it also builds broken requests: ``queue_chain`` (any buffers, any
order, zero lengths, addresses outside RAM), ``alloc_descs``/``write_desc``/
``publish_head`` (loops, out-of-range ``next``), ``publish_raw_head`` (an
out-of-range head index) and ``queue_request`` (any type, header and
payload).  After a device error the guest calls ``reset()``, as a driver does
when it sees VIRTIO_CONFIG_S_NEEDS_RESET.

Interrupts are taken in a bottom half of the main loop (the "vCPU"), whether
the device raised them there or from an IOThread.  The guest's own copies
(data in and out of its buffers) are the guest's business; the device side
never copies.
"""
from __future__ import annotations

import struct
from typing import Callable, Sequence

import attrs

from qblock.hw.memory import (
    AddressSpace,
    address_space_read,
    address_space_write,
    ldl_le_phys,
    ldub_phys,
    lduw_le_phys,
    stb_phys,
    stw_le_phys,
)
from qblock.hw.virtio import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    VirtIODevice,
    virtio_config_modern_readb,
    virtio_config_modern_readl,
    virtio_config_modern_readw,
    virtio_config_modern_writeb,
    virtio_queue_notify,
    virtio_transport_queue_max,
    virtio_transport_read_host_features,
    virtio_transport_read_status,
    virtio_transport_set_config_vector,
    virtio_transport_set_irq,
    virtio_transport_setup_queue,
    virtio_transport_write_guest_features,
    virtio_transport_write_status,
    vring_need_event,
)
from qblock.util.aio import (
    aio_bh_new,
    aio_dump_waiters,
    aio_poll,
    aio_timer_new,
    qemu_bh_delete,
    qemu_bh_schedule,
    qemu_get_aio_context,
)
from qblock.util.runstate import runstate_is_running
from qblock.util.timer import QEMU_CLOCK_REALTIME, SCALE_NS, qemu_clock_get_ns, timer_del, timer_mod_ns

__all__ = ["VirtioBlkGuest", "GuestRequest", "GuestAllocator", "GuestError", "virtio_blk_outhdr",
           "GUEST_FEATURES"]

# Feature bits, repeated from the spec so the guest needs nothing of the device model's code.
_F_SIZE_MAX, _F_SEG_MAX, _F_GEOMETRY, _F_RO, _F_BLK_SIZE = 1, 2, 4, 5, 6
_F_FLUSH, _F_TOPOLOGY, _F_CONFIG_WCE, _F_MQ, _F_DISCARD, _F_WRITE_ZEROES = 9, 10, 11, 12, 13, 14
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK = 0
ID_BYTES = 20

GUEST_FEATURES = sum(1 << b for b in (
    _F_SIZE_MAX, _F_SEG_MAX, _F_GEOMETRY, _F_RO, _F_BLK_SIZE, _F_FLUSH, _F_TOPOLOGY, _F_CONFIG_WCE, _F_MQ,
    _F_DISCARD, _F_WRITE_ZEROES, VIRTIO_RING_F_INDIRECT_DESC, VIRTIO_RING_F_EVENT_IDX, VIRTIO_F_VERSION_1))

_DESC = struct.Struct("<QIHH")


class GuestError(RuntimeError):
    """The guest cannot go on: the device refused it, broke, or never answered."""


def virtio_blk_outhdr(type: int, sector: int, ioprio: int = 0) -> bytes:
    """``struct virtio_blk_outhdr`` as the guest lays it in memory."""
    return struct.pack("<IIQ", type, ioprio, sector)


class GuestAllocator:
    """First-fit allocation of guest RAM in ``[base, end)``."""

    def __init__(self, base: int, end: int):
        self.base, self.end = base, end
        self.free_list: list[list[int]] = [[base, end]]
        self.used: dict[int, int] = {}

    def alloc(self, size: int, align: int = 16) -> int:
        size = max(size, 1)
        for i, (start, stop) in enumerate(self.free_list):
            addr = (start + align - 1) // align * align
            if addr + size <= stop:
                pieces = []
                if addr > start:
                    pieces.append([start, addr])
                if addr + size < stop:
                    pieces.append([addr + size, stop])
                self.free_list[i:i + 1] = pieces
                self.used[addr] = size
                return addr
        raise GuestError(f"guest memory exhausted ({size} bytes wanted)")

    def free(self, addr: int) -> None:
        size = self.used.pop(addr)
        self.free_list.append([addr, addr + size])
        self.free_list.sort()
        merged: list[list[int]] = []
        for start, stop in self.free_list:
            if merged and merged[-1][1] == start:
                merged[-1][1] = stop
            else:
                merged.append([start, stop])
        self.free_list = merged

    def reset(self) -> None:
        self.free_list = [[self.base, self.end]]
        self.used.clear()


@attrs.define(eq=False)
class GuestRequest:
    """One request as the guest tracks it, from queueing to completion."""

    kind: str
    queue: int
    head: int = -1
    sector: int = 0
    descs: list[int] = attrs.field(factory=list)
    bufs: list[int] = attrs.field(factory=list)
    status_addr: int | None = None
    in_data: list[tuple[int, int]] = attrs.field(factory=list)   # device-writable data buffers to read back
    done: bool = False
    lost: bool = False            # the guest reset the device before it completed
    status: int | None = None
    used_len: int | None = None
    data: bytes | None = None
    on_complete: Callable[["GuestRequest"], None] | None = attrs.field(default=None, repr=False)


@attrs.define(eq=False)
class _GuestQueue:
    index: int
    num: int
    desc: int
    avail: int
    used: int
    free: list[int]
    avail_idx: int = 0
    last_used: int = 0
    num_added: int = 0
    inflight: dict[int, GuestRequest] = attrs.field(factory=dict)


class VirtioBlkGuest:
    """A virtio-blk driver running "in the guest" against a realized device."""

    def __init__(self, vdev: VirtIODevice, *, accept: int = GUEST_FEATURES, queue_size: int | None = None,
                 mem_base: int = 0x1000, mem_end: int | None = None, timeout_ns: int = 10_000_000_000,
                 init: bool = True):
        self.vdev = vdev
        self.mem: AddressSpace = vdev.dma_as
        self.accept = accept
        self.queue_size = queue_size
        self.alloc_ = GuestAllocator(mem_base, mem_end if mem_end is not None else self.mem.size)
        self.ctx = qemu_get_aio_context()
        self.timeout_ns = timeout_ns
        self.features = 0
        self.config: dict[str, int] = {}
        self.queues: list[_GuestQueue] = []
        self.completed: list[GuestRequest] = []      # in used-ring order
        self.used_log: list[tuple[int, int, int]] = []  # (queue, id, len) as read from the used rings
        self.unexpected: list[tuple[int, int]] = []  # used entries for heads not in flight (double completions)
        self.interrupts = 0
        self.config_interrupts = 0
        self.needs_reset = False
        self.pending_vectors: set[int] = set()
        self.irq_bh = aio_bh_new(self.ctx, self._interrupt, None, "guest_interrupt")
        if init:
            self.init()

    # -- bring-up ----------------------------------------------------------

    def _set_status(self, bits: int) -> None:
        virtio_transport_write_status(self.vdev, virtio_transport_read_status(self.vdev) | bits)

    def init(self) -> None:
        """Reset the device and drive it to DRIVER_OK (virtio 1.x initialization sequence)."""
        vdev = self.vdev
        virtio_transport_write_status(vdev, 0)
        self.needs_reset = False
        self._set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE)
        self._set_status(VIRTIO_CONFIG_S_DRIVER)
        host = virtio_transport_read_host_features(vdev)
        self.features = host & self.accept
        if not self.features >> VIRTIO_F_VERSION_1 & 1:
            self._set_status(VIRTIO_CONFIG_S_FAILED)
            raise GuestError("device does not offer VIRTIO_F_VERSION_1")
        virtio_transport_write_guest_features(vdev, self.features)
        self._set_status(VIRTIO_CONFIG_S_FEATURES_OK)
        if not virtio_transport_read_status(vdev) & VIRTIO_CONFIG_S_FEATURES_OK:
            self._set_status(VIRTIO_CONFIG_S_FAILED)
            raise GuestError("device refused the features")
        self.read_config()
        nq = self.config["num_queues"] if self.has(_F_MQ) else 1
        self.queues = []
        for n in range(nq):
            qmax = virtio_transport_queue_max(vdev, n)
            if not qmax:
                raise GuestError(f"queue {n} does not exist")
            num = min(self.queue_size or qmax, qmax)
            desc = self.alloc_.alloc(16 * num, 16)
            avail = self.alloc_.alloc(6 + 2 * num, 2)
            used = self.alloc_.alloc(6 + 8 * num, 4)
            for addr, size in ((desc, 16 * num), (avail, 6 + 2 * num), (used, 6 + 8 * num)):
                address_space_write(self.mem, addr, bytes(size))
            virtio_transport_setup_queue(vdev, n, num, desc, avail, used, vector=n)
            self.queues.append(_GuestQueue(n, num, desc, avail, used, list(range(num))))
        virtio_transport_set_config_vector(vdev, nq)
        virtio_transport_set_irq(vdev, self._irq)
        self._set_status(VIRTIO_CONFIG_S_DRIVER_OK)

    def reset(self) -> None:
        """Reset the device, forget every request in flight, free all guest buffers and start again."""
        virtio_transport_write_status(self.vdev, 0)
        for q in self.queues:
            for req in q.inflight.values():
                req.lost = True
        self.queues = []
        self.pending_vectors.clear()
        self.alloc_.reset()
        self.init()

    def shutdown(self) -> None:
        """Reset the device and stop listening to it (call before unplugging the device)."""
        virtio_transport_write_status(self.vdev, 0)
        virtio_transport_set_irq(self.vdev, None)
        qemu_bh_delete(self.irq_bh)

    def has(self, fbit: int) -> bool:
        return bool(self.features >> fbit & 1)

    def read_config(self) -> dict[str, int]:
        v = self.vdev
        c = {
            "capacity": virtio_config_modern_readl(v, 0) | virtio_config_modern_readl(v, 4) << 32,
            "size_max": virtio_config_modern_readl(v, 8),
            "seg_max": virtio_config_modern_readl(v, 12),
            "cylinders": virtio_config_modern_readw(v, 16),
            "heads": virtio_config_modern_readb(v, 18),
            "sectors": virtio_config_modern_readb(v, 19),
            "blk_size": virtio_config_modern_readl(v, 20),
            "physical_block_exp": virtio_config_modern_readb(v, 24),
            "min_io_size": virtio_config_modern_readw(v, 26),
            "opt_io_size": virtio_config_modern_readl(v, 28),
            "wce": virtio_config_modern_readb(v, 32),
            "num_queues": virtio_config_modern_readw(v, 34),
            "max_discard_sectors": virtio_config_modern_readl(v, 36),
            "max_discard_seg": virtio_config_modern_readl(v, 40),
            "discard_sector_alignment": virtio_config_modern_readl(v, 44),
            "max_write_zeroes_sectors": virtio_config_modern_readl(v, 48),
            "max_write_zeroes_seg": virtio_config_modern_readl(v, 52),
            "write_zeroes_may_unmap": virtio_config_modern_readb(v, 56),
        }
        self.config = c
        return c

    def set_writeback(self, on: bool) -> None:
        """Write the config space's ``wce`` byte (needs VIRTIO_BLK_F_CONFIG_WCE)."""
        virtio_config_modern_writeb(self.vdev, 32, int(on))

    # -- guest memory ------------------------------------------------------

    def alloc(self, size: int, align: int = 16) -> int:
        return self.alloc_.alloc(size, align)

    def free(self, addr: int) -> None:
        self.alloc_.free(addr)

    def write_mem(self, addr: int, data) -> None:
        address_space_write(self.mem, addr, data)

    def read_mem(self, addr: int, size: int) -> bytes:
        return address_space_read(self.mem, addr, size)

    # -- descriptors and the avail ring ---------------------------------------

    def alloc_descs(self, n: int, queue: int = 0) -> list[int]:
        q = self.queues[queue]
        if len(q.free) < n:
            raise GuestError(f"queue {queue}: {n} descriptors wanted, {len(q.free)} free")
        taken, q.free = q.free[:n], q.free[n:]
        return taken

    def write_desc(self, i: int, addr: int, length: int, flags: int, next: int = 0, queue: int = 0,
                   table: int | None = None) -> None:
        """Write descriptor ``i`` of the queue's table (or of an indirect ``table``)."""
        base = self.queues[queue].desc if table is None else table
        self.write_mem(base + 16 * i, _DESC.pack(addr, length, flags, next))

    def publish_raw_head(self, value: int, queue: int = 0) -> None:
        """Put ``value`` in the next avail slot, whatever it is; the avail index moves at the next kick."""
        q = self.queues[queue]
        stw_le_phys(self.mem, q.avail + 4 + 2 * (q.avail_idx % q.num), value)
        q.avail_idx = (q.avail_idx + 1) & 0xFFFF
        q.num_added += 1

    def publish_head(self, req: GuestRequest) -> GuestRequest:
        """Make ``req`` (whose chain starts at ``req.head``) available to the device; no kick."""
        q = self.queues[req.queue]
        q.inflight[req.head] = req
        self.publish_raw_head(req.head, req.queue)
        return req

    def queue_chain(self, segments: Sequence[tuple[int, int, bool]], *, kind: str = "raw", queue: int = 0,
                    status_addr: int | None = None, in_data: Sequence[tuple[int, int]] = (),
                    bufs: Sequence[int] = (), indirect: bool = False, sector: int = 0) -> GuestRequest:
        """Chain ``(addr, len, device_writable)`` segments as given and publish the chain (no kick).

        ``indirect`` puts the chain in an indirect table (one ring descriptor).
        Nothing is checked: this is also how broken chains are built.
        """
        req = GuestRequest(kind, queue, sector=sector, status_addr=status_addr, in_data=list(in_data),
                           bufs=list(bufs))
        n = len(segments)
        if indirect:
            table = self.alloc(16 * max(n, 1), 16)
            req.bufs.append(table)
            for i, (addr, length, writable) in enumerate(segments):
                flags = (VRING_DESC_F_WRITE if writable else 0) | (VRING_DESC_F_NEXT if i + 1 < n else 0)
                self.write_desc(i, addr, length, flags, i + 1 if i + 1 < n else 0, table=table)
            (head,) = self.alloc_descs(1, queue)
            self.write_desc(head, table, 16 * n, VRING_DESC_F_INDIRECT, 0, queue)
            req.descs = [head]
        else:
            idx = self.alloc_descs(n, queue)
            for i, (addr, length, writable) in enumerate(segments):
                flags = (VRING_DESC_F_WRITE if writable else 0) | (VRING_DESC_F_NEXT if i + 1 < n else 0)
                self.write_desc(idx[i], addr, length, flags, idx[i + 1] if i + 1 < n else 0, queue)
            req.descs = idx
        req.head = req.descs[0]
        return self.publish_head(req)

    def queue_request(self, type: int, sector: int = 0, out_data: Sequence[bytes] = (),
                      in_sizes: Sequence[int] = (), *, kind: str | None = None, ioprio: int = 0,
                      queue: int = 0, indirect: bool = False) -> GuestRequest:
        """A well-formed chain: header, ``out_data`` segments, ``in_sizes`` buffers, status byte."""
        segs: list[tuple[int, int, bool]] = []
        bufs: list[int] = []
        hdr = self.alloc(16)
        self.write_mem(hdr, virtio_blk_outhdr(type, sector, ioprio))
        bufs.append(hdr)
        segs.append((hdr, 16, False))
        for chunk in out_data:
            addr = self.alloc(len(chunk))
            self.write_mem(addr, chunk)
            bufs.append(addr)
            segs.append((addr, len(chunk), False))
        in_data = []
        for size in in_sizes:
            addr = self.alloc(size)
            self.write_mem(addr, bytes(size))
            bufs.append(addr)
            segs.append((addr, size, True))
            in_data.append((addr, size))
        status = self.alloc(1, 1)
        stb_phys(self.mem, status, 0xFF)        # not a status the device can write
        bufs.append(status)
        segs.append((status, 1, True))
        return self.queue_chain(segs, kind=kind or f"type{type}", queue=queue, status_addr=status,
                                in_data=in_data, bufs=bufs, indirect=indirect, sector=sector)

    @staticmethod
    def _split(data: bytes, segs: Sequence[int] | None) -> list[bytes]:
        if not segs:
            return [bytes(data)]
        if sum(segs) != len(data):
            raise ValueError("segment sizes must add up to the data length")
        out, pos = [], 0
        for size in segs:
            out.append(bytes(data[pos:pos + size]))
            pos += size
        return out

    def queue_write(self, sector: int, data: bytes, *, segs: Sequence[int] | None = None, queue: int = 0,
                    indirect: bool = False) -> GuestRequest:
        return self.queue_request(T_OUT, sector, self._split(data, segs), kind="write", queue=queue,
                                  indirect=indirect)

    def queue_read(self, sector: int, nbytes: int, *, segs: Sequence[int] | None = None, queue: int = 0,
                   indirect: bool = False) -> GuestRequest:
        sizes = list(segs) if segs else [nbytes]
        if sum(sizes) != nbytes:
            raise ValueError("segment sizes must add up to nbytes")
        return self.queue_request(T_IN, sector, (), sizes if nbytes else (), kind="read", queue=queue,
                                  indirect=indirect)

    def queue_flush(self, queue: int = 0) -> GuestRequest:
        return self.queue_request(T_FLUSH, 0, kind="flush", queue=queue)

    def queue_get_id(self, queue: int = 0) -> GuestRequest:
        return self.queue_request(T_GET_ID, 0, (), [ID_BYTES], kind="get_id", queue=queue)

    def queue_discard(self, sector: int, nb_sectors: int, flags: int = 0, queue: int = 0) -> GuestRequest:
        seg = struct.pack("<QII", sector, nb_sectors, flags)
        return self.queue_request(T_DISCARD, 0, [seg], kind="discard", queue=queue)

    def queue_write_zeroes(self, sector: int, nb_sectors: int, unmap: bool = False, flags: int | None = None,
                           queue: int = 0) -> GuestRequest:
        seg = struct.pack("<QII", sector, nb_sectors, (1 if unmap else 0) if flags is None else flags)
        return self.queue_request(T_WRITE_ZEROES, 0, [seg], kind="write_zeroes", queue=queue)

    # -- kick, interrupt, wait ------------------------------------------------

    def publish(self, queue: int = 0) -> None:
        """Move the avail index over everything queued: a device polling the ring sees all of it or none."""
        q = self.queues[queue]
        stw_le_phys(self.mem, q.avail + 2, q.avail_idx)

    def kick(self, queue: int = 0, force: bool = False) -> bool:
        """Publish the queued requests (the avail index) and notify the device unless it asked not to be."""
        if not runstate_is_running():
            raise GuestError("the VM is paused: the guest cannot run")
        q = self.queues[queue]
        new = q.avail_idx
        old = (new - q.num_added) & 0xFFFF
        q.num_added = 0
        self.publish(queue)
        if self.has(VIRTIO_RING_F_EVENT_IDX):
            needed = vring_need_event(lduw_le_phys(self.mem, q.used + 4 + 8 * q.num), new, old)
        else:
            needed = not lduw_le_phys(self.mem, q.used) & VRING_USED_F_NO_NOTIFY
        if needed or force:
            virtio_queue_notify(self.vdev, queue)
        return needed

    def _irq(self, vector: int) -> None:
        # The interrupt line: may be raised from an IOThread; the guest handles it in its own loop.
        self.pending_vectors.add(vector)
        qemu_bh_schedule(self.irq_bh)

    def _interrupt(self, opaque) -> None:
        vectors, self.pending_vectors = self.pending_vectors, set()
        self.interrupts += 1
        if len(self.queues) in vectors:
            self.config_interrupts += 1
            if virtio_transport_read_status(self.vdev) & VIRTIO_CONFIG_S_NEEDS_RESET:
                self.needs_reset = True
        for q in self.queues:
            self._process_used(q)

    def _process_used(self, q: _GuestQueue) -> None:
        mem = self.mem
        while True:
            used_idx = lduw_le_phys(mem, q.used + 2)
            while q.last_used != used_idx:
                slot = q.used + 4 + 8 * (q.last_used % q.num)
                head, length = ldl_le_phys(mem, slot), ldl_le_phys(mem, slot + 4)
                q.last_used = (q.last_used + 1) & 0xFFFF
                self.used_log.append((q.index, head, length))
                req = q.inflight.pop(head, None)
                if req is None:
                    self.unexpected.append((q.index, head))
                    continue
                self._complete(q, req, length)
            if self.has(VIRTIO_RING_F_EVENT_IDX):
                stw_le_phys(mem, q.avail + 4 + 2 * q.num, q.last_used)   # used_event: interrupt me next time
            if lduw_le_phys(mem, q.used + 2) == q.last_used:
                break

    def _complete(self, q: _GuestQueue, req: GuestRequest, length: int) -> None:
        req.used_len = length
        if req.status_addr is not None:
            req.status = ldub_phys(self.mem, req.status_addr)
        if req.in_data:
            req.data = b"".join(self.read_mem(addr, size) for addr, size in req.in_data)
        for addr in req.bufs:
            self.free(addr)
        q.free.extend(req.descs)
        req.done = True
        self.completed.append(req)
        if req.on_complete is not None:
            req.on_complete(req)

    def poll_until(self, cond: Callable[[], bool], what: str = "the device") -> None:
        """Run the main loop until ``cond()``; GuestError if the device broke or nothing happens."""
        timer = None
        if self.vdev.ioeventfd:
            # Notifier fds keep the main loop's deadlock check quiet: bound the wait in real time.
            expired = []
            timer = aio_timer_new(self.ctx, QEMU_CLOCK_REALTIME, SCALE_NS, lambda _: expired.append(True))
            timer_mod_ns(timer, qemu_clock_get_ns(QEMU_CLOCK_REALTIME) + self.timeout_ns)
        try:
            while not cond():
                if self.needs_reset:
                    raise GuestError(f"waiting for {what}: the device needs a reset "
                                     f"({self.vdev.broken_reason})")
                aio_poll(self.ctx, True)
                if timer is not None and expired:
                    raise GuestError(f"waiting for {what}: no answer\n{aio_dump_waiters()}")
        finally:
            if timer is not None:
                timer_del(timer)

    def wait(self, req: GuestRequest) -> GuestRequest:
        self.poll_until(lambda: req.done, f"{req.kind} request (head {req.head})")
        return req

    def inflight(self) -> int:
        return sum(len(q.inflight) for q in self.queues)

    def wait_all(self) -> None:
        self.poll_until(lambda: self.inflight() == 0, "every request")

    def _sync(self, req: GuestRequest) -> GuestRequest:
        self.kick(req.queue)
        return self.wait(req)

    # -- synchronous interface ------------------------------------------------

    def write(self, sector: int, data: bytes, **kw) -> GuestRequest:
        return self._sync(self.queue_write(sector, data, **kw))

    def read(self, sector: int, nbytes: int, **kw) -> GuestRequest:
        return self._sync(self.queue_read(sector, nbytes, **kw))

    def flush(self) -> GuestRequest:
        return self._sync(self.queue_flush())

    def get_id(self) -> GuestRequest:
        return self._sync(self.queue_get_id())

    def discard(self, sector: int, nb_sectors: int, flags: int = 0) -> GuestRequest:
        return self._sync(self.queue_discard(sector, nb_sectors, flags))

    def write_zeroes(self, sector: int, nb_sectors: int, unmap: bool = False,
                     flags: int | None = None) -> GuestRequest:
        return self._sync(self.queue_write_zeroes(sector, nb_sectors, unmap, flags))

