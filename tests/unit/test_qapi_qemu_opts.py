"""Block options from the QemuOpts syntax typed by the schema (blockexport.qapi.qemu_opts)."""
from __future__ import annotations

import pytest

from blockexport.errors import Error
from blockexport.qapi.qemu_opts import blockdev_typed
from blockexport.util import keyval


def test_crumple_and_types():
    flat, _ = keyval.qemu_opts_parse(
        "driver=raw,file.driver=file,file.filename=x,read-only=on,cache.direct=yes,"
        "cache.no-flush=off,offset=1k,size=0x200,file.read-only=false", None)
    opts = blockdev_typed(keyval.crumple(flat))
    assert opts == {"driver": "raw", "read-only": True, "offset": 1024, "size": 512,
                    "cache": {"direct": True, "no-flush": False},
                    "file": {"driver": "file", "filename": "x", "read-only": False}}
    with pytest.raises(Error, match=r"^Parameter 'cache.direct' expects 'on' or 'off'$"):
        blockdev_typed({"cache": {"direct": "On"}})
    with pytest.raises(Error, match=r"^Parameter 'read-only' expects 'on' or 'off'$"):
        blockdev_typed({"file": {"read-only": "x"}})


def test_blockdev_typed_through_the_schema():
    opts = {"driver": "raw", "offset": "1k", "file": {"driver": "null-co", "latency-ns": "-1",
                                                      "read-zeroes": "yes", "size": "0x200",
                                                      "x": "unknown stays"},
            "cache": {"no-flush": "off"}, "discard": "unmap"}
    assert blockdev_typed(opts) == {
        "driver": "raw", "offset": 1024, "cache": {"no-flush": False}, "discard": "unmap",
        "file": {"driver": "null-co", "latency-ns": -1, "read-zeroes": True, "size": 512,
                 "x": "unknown stays"}}
    with pytest.raises(Error, match="^Parameter 'latency-ns' expects a number$"):
        blockdev_typed({"driver": "null-co", "latency-ns": "abc"})
    with pytest.raises(Error, match="^Parameter 'aio-max-batch' expects a number$"):
        blockdev_typed({"driver": "raw", "file": {"driver": "file", "aio-max-batch": "x"}})
