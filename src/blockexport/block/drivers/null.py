"""The ``null-co`` / ``null-aio`` drivers: a sized sink that stores nothing.

As in QEMU 7.2, ``read-zeroes`` defaults to false and then reads leave the caller's buffer
untouched (no cost, contents undefined); block status reports nothing allocated (flags 0,
i.e. "hole, not known to be zero").  With ``read-zeroes=on`` reads fill zeroes and block
status reports ZERO|ALLOCATED.  Writes, discards and flushes succeed and are dropped;
``latency-ns`` delays reads, writes and flushes.  There is no fast way to write zeroes:
``write_zeroes(fast=True)`` fails with ENOTSUP (what QEMU answers to NBD FAST_ZERO), otherwise
it is a write that is dropped.
"""

from __future__ import annotations

import errno
import os
import time

from blockexport.block.node import BS_ALLOCATED, BS_ZERO, SECTOR_SIZE, BlockNode, zero_fill
from blockexport.errors import Error
from blockexport.util.cutils import round_up


def _ignore(*args, **kwargs):
    pass


def _zero_fill_at(offset, buf):
    zero_fill(buf)


def _write_read_only(offset, buf, fua=False):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))


class NullNode(BlockNode):
    driver = "null-co"

    def __init__(self, graph, node_name: str, options: dict):
        super().__init__(node_name, options)
        size = options.get("size", 1 << 30)
        if size < 0:
            raise Error("Parameter 'size' expects a non-negative number below 2^64")
        latency = options.get("latency-ns", 0)
        if latency < 0:
            raise Error("latency-ns is invalid")
        self.size = size
        self.latency_ns = latency
        self.read_zeroes = bool(options.get("read-zeroes", False))
        self.filename = f"{self.driver}://"
        delay = latency / 1e9
        sleep = time.sleep
        read_zeroes = self.read_zeroes

        if delay:
            def read_into(offset, buf):
                sleep(delay)
                if read_zeroes:
                    zero_fill(buf)

            def write(offset, buf, fua=False):
                sleep(delay)
        else:
            read_into = _zero_fill_at if read_zeroes else _ignore
            write = _ignore

        self._delay = delay
        self.read_into = read_into
        if self.read_only:
            write = _write_read_only
        elif self.detect_zeroes != "off":
            write = self._detect_zeroes_write(write)
        self.write = write
        self._status_flags = BS_ZERO | BS_ALLOCATED if read_zeroes else 0

    def memory_io(self) -> bool:
        return not self.latency_ns

    def memory_sync(self) -> bool:
        return not self._delay

    def length(self) -> int:
        return round_up(self.size, SECTOR_SIZE)

    def flush(self) -> None:
        if self._delay:
            time.sleep(self._delay)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False,
                     fast: bool = False, fua: bool = False) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        if fast:
            raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))
        if self._delay:
            time.sleep(self._delay)

    def block_status(self, offset: int, length: int) -> tuple[int, int]:
        return length, self._status_flags


class NullAioNode(NullNode):
    driver = "null-aio"
