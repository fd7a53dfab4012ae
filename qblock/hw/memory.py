"""Guest memory: QEMU's AddressSpace and MemoryRegion API (include/exec/memory.h, softmmu/physmem.c), reduced.

Guest RAM is one ``bytearray`` starting at guest physical address 0.
``address_space_map`` returns a ``memoryview`` of it -- the device reads and
writes guest memory in place, as QEMU's DMA mapping does -- and the
``ld*_phys``/``st*_phys`` helpers access little-endian fields.  Left out:
MMIO regions, IOMMUs, dirty tracking, bounce buffers for unmapped memory.
"""
from __future__ import annotations

import struct

__all__ = ["AddressSpace", "address_space_memory", "address_space_map", "address_space_unmap",
           "address_space_read", "address_space_write", "ldub_phys", "lduw_le_phys", "ldl_le_phys",
           "ldq_le_phys", "stb_phys", "stw_le_phys", "stl_le_phys", "stq_le_phys"]

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class AddressSpace:
    """Guest physical memory: ``size`` bytes of RAM from address 0."""

    def __init__(self, size: int, name: str = "memory"):
        self.ram = bytearray(size)
        self.size = size
        self.name = name

    @property
    def trace_name(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<AddressSpace {self.name} {self.size} bytes>"


_address_space_memory: AddressSpace | None = None


def address_space_memory() -> AddressSpace:
    """The machine's system memory (64 MiB, created on first use); a device may be given another."""
    global _address_space_memory
    if _address_space_memory is None:
        _address_space_memory = AddressSpace(64 << 20, "system-memory")
    return _address_space_memory


def address_space_map(as_: AddressSpace, addr: int, length: int, is_write: bool) -> memoryview | None:
    """A view of guest RAM at ``addr``: up to ``length`` bytes (fewer at the end of RAM), None outside RAM."""
    if addr < 0 or addr >= as_.size or length <= 0:
        return None
    end = min(addr + length, as_.size)
    return memoryview(as_.ram)[addr:end]


def address_space_unmap(as_: AddressSpace, view: memoryview, is_write: bool, access_len: int) -> None:
    """Nothing to release: RAM is mapped directly (QEMU marks written pages dirty here)."""


def _check(as_: AddressSpace, addr: int, size: int) -> None:
    if addr < 0 or addr + size > as_.size:
        raise IndexError(f"guest access [{addr:#x}, +{size}) outside {as_.name}")


def address_space_read(as_: AddressSpace, addr: int, length: int) -> bytes:
    _check(as_, addr, length)
    return bytes(as_.ram[addr:addr + length])


def address_space_write(as_: AddressSpace, addr: int, buf) -> None:
    data = memoryview(buf).cast("B")
    _check(as_, addr, len(data))
    as_.ram[addr:addr + len(data)] = data


def ldub_phys(as_: AddressSpace, addr: int) -> int:
    _check(as_, addr, 1)
    return as_.ram[addr]


def lduw_le_phys(as_: AddressSpace, addr: int) -> int:
    _check(as_, addr, 2)
    return _U16.unpack_from(as_.ram, addr)[0]


def ldl_le_phys(as_: AddressSpace, addr: int) -> int:
    _check(as_, addr, 4)
    return _U32.unpack_from(as_.ram, addr)[0]


def ldq_le_phys(as_: AddressSpace, addr: int) -> int:
    _check(as_, addr, 8)
    return _U64.unpack_from(as_.ram, addr)[0]


def stb_phys(as_: AddressSpace, addr: int, val: int) -> None:
    _check(as_, addr, 1)
    as_.ram[addr] = val & 0xFF


def stw_le_phys(as_: AddressSpace, addr: int, val: int) -> None:
    _check(as_, addr, 2)
    _U16.pack_into(as_.ram, addr, val & 0xFFFF)


def stl_le_phys(as_: AddressSpace, addr: int, val: int) -> None:
    _check(as_, addr, 4)
    _U32.pack_into(as_.ram, addr, val & 0xFFFFFFFF)


def stq_le_phys(as_: AddressSpace, addr: int, val: int) -> None:
    _check(as_, addr, 8)
    _U64.pack_into(as_.ram, addr, val & 0xFFFFFFFFFFFFFFFF)
