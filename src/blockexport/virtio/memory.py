"""The frontend's memory, as the device sees it.

A vhost-user frontend shares its guest RAM as regions: each has a guest-physical address, a
size, the address where the frontend itself maps it (ring addresses are given in that space)
and an fd the backend maps.  :class:`GuestMemory` holds the caller's mappings and turns either
kind of address into a ``memoryview`` of the mapping.
"""
from __future__ import annotations

from blockexport.virtio.errors import VirtioError


class GuestMemory:
    """``regions``: (guest_phys_addr, size, frontend_addr, buffer) tuples, ``buffer`` being at
    least ``size`` bytes (the mapping, from the region's mmap offset on)."""

    __slots__ = ("regions", "_views", "regions_by_gpa")

    def __init__(self, regions):
        self.regions = tuple(regions)
        if not self.regions:
            raise VirtioError("an empty memory table")
        # (gpa, end, uva, uva_end, view) per region; views taken once
        self._views = tuple((gpa, gpa + size, uva, uva + size, memoryview(buf)[:size])
                            for gpa, size, uva, buf in self.regions)
        #: (gpa, end, view) per region, largest first (the ring walk's inlined lookup)
        self.regions_by_gpa = tuple(sorted(((g, e, v) for g, e, _u, _ue, v in self._views),
                                           key=lambda r: r[0] - r[1]))

    def gpa(self, addr: int, length: int) -> memoryview:
        """``length`` bytes at guest-physical ``addr``, within one region."""
        for start, end, _u, _ue, view in self._views:
            if start <= addr and addr + length <= end:
                return view[addr - start:addr - start + length]
        raise VirtioError("guest address 0x%x+%d is outside the memory table" % (addr, length))

    def gpa_segments(self, addr: int, length: int) -> list:
        """``length`` bytes at guest-physical ``addr`` as views, one per region crossed."""
        out = []
        while length:
            for start, end, _u, _ue, view in self._views:
                if start <= addr < end:
                    n = min(length, end - addr)
                    out.append(view[addr - start:addr - start + n])
                    addr += n
                    length -= n
                    break
            else:
                raise VirtioError("guest address 0x%x+%d is outside the memory table"
                                  % (addr, length))
        return out

    def uva(self, addr: int, length: int) -> memoryview:
        """``length`` bytes at the frontend's virtual address ``addr`` (ring addresses)."""
        for _s, _e, start, end, view in self._views:
            if start <= addr and addr + length <= end:
                return view[addr - start:addr - start + length]
        raise VirtioError("frontend address 0x%x+%d is outside the memory table"
                          % (addr, length))
