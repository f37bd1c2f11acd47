"""The blkdebug driver: the rule engine, its events and the node's request checks (the same
scenarios were run against QEMU 7.2's qemu-io / qemu-nbd to fix the expected outcomes)."""
from __future__ import annotations

import errno

import pytest

from blockexport.block.drivers.blkdebug import Rules, legacy_options, read_config, typed_rule
from blockexport.block.filename import display_name
from blockexport.block.graph import BlockGraph
from blockexport.block.node import PERM_ALL, PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE
from blockexport.block.probe import protocol_options, protocol_options_for
from blockexport.errors import Error


def fails(fn, *args, err=errno.EIO):
    with pytest.raises(OSError) as e:
        fn(*args)
    assert e.value.errno == err


# ---- the rule engine ---------------------------------------------------------------------------

def test_rules_activate_on_their_event_only():
    r = Rules([{"event": "write_aio", "iotype": "read"}])
    r.check("read", 0, 512)
    r.event("read_aio")
    r.check("read", 0, 512)
    r.event("write_aio")
    fails(r.check, "read", 0, 512)
    r.check("write", 0, 512)        # only reads


def test_default_iotypes_exclude_block_status():
    r = Rules([{"event": "none"}])
    r.event("none")
    for kind in ("read", "write", "write-zeroes", "discard", "flush"):
        fails(r.check, kind, 0, 512)
    r.check("block-status", 0, 512)


def test_sector_matches_covering_requests_and_never_flushes():
    r = Rules([{"event": "none", "sector": 3}])
    r.event("none")
    r.check("read", 0, 1536)
    fails(r.check, "read", 1536, 1)
    fails(r.check, "read", 1000, 1000)
    r.check("read", 2048, 512)
    r.check("flush", 0, 0)
    neg = Rules([{"event": "none", "sector": -2}])      # never matches (QEMU: unsigned)
    neg.event("none")
    neg.check("read", 0, 1 << 30)


def test_first_active_rule_in_definition_order_decides():
    r = Rules([{"event": "none", "iotype": "read", "errno": errno.ENOSPC},
               {"event": "none", "errno": errno.EPERM}])
    r.event("none")
    fails(r.check, "read", 0, 1, err=errno.ENOSPC)
    fails(r.check, "write", 0, 1, err=errno.EPERM)
    ok = Rules([{"event": "none", "errno": 0}, {"event": "none"}])
    ok.event("none")
    ok.check("read", 0, 1)          # errno 0: the first match lets the request through


def test_once_removes_the_rule_for_good():
    r = Rules([{"event": "pwritev", "iotype": "read", "once": True}])
    r.event("pwritev")
    fails(r.check, "read", 0, 1)
    r.check("read", 0, 1)
    r.event("pwritev")
    r.check("read", 0, 1)


def test_an_event_with_error_rules_replaces_the_active_set():
    r = Rules([{"event": "none", "iotype": "read"}, {"event": "pwritev", "iotype": "write"}])
    r.event("none")
    fails(r.check, "read", 0, 1)
    r.event("pwritev_done")         # no rules: nothing changes
    fails(r.check, "read", 0, 1)
    r.event("pwritev")
    r.check("read", 0, 1)
    fails(r.check, "write", 0, 1)


def test_states():
    r = Rules([{"event": "read_aio", "state": 2, "iotype": "read"}],
              [{"event": "write_aio", "new_state": 2},
               {"event": "write_aio", "state": 2, "new_state": 3}])
    r.event("read_aio")
    r.check("read", 0, 1)
    r.event("write_aio")            # rules see the state the event started in: 1 -> 2
    assert r.state == 2
    r.event("read_aio")
    fails(r.check, "read", 0, 1)
    r.event("write_aio")            # both apply; the first defined is processed last
    assert r.state == 2


# ---- legacy syntax and config files ----------------------------------------------------------

def test_typed_rule_errors_are_qemus():
    with pytest.raises(Error, match="^Missing event name for rule$"):
        typed_rule("inject-error", {"iotype": "read"})
    with pytest.raises(Error, match="^invalid parameter value: bogus$"):
        typed_rule("inject-error", {"event": "bogus"})
    with pytest.raises(Error, match="^invalid parameter value: sideways$"):
        typed_rule("inject-error", {"event": "none", "iotype": "sideways"})
    with pytest.raises(Error, match=r"^\[inject-error\] section doesn't support the option 'x'$"):
        typed_rule("inject-error", {"event": "none", "x": "1"})
    with pytest.raises(Error, match="^Parameter 'errno' expects a number$"):
        typed_rule("inject-error", {"event": "none", "errno": "x"})
    with pytest.raises(Error, match="^Parameter 'once' expects 'on' or 'off'$"):
        typed_rule("inject-error", {"event": "none", "once": "maybe"})
    assert typed_rule("inject-error", {"event": "none", "errno": "0x1c", "once": "on"}) == \
        {"event": "none", "errno": 28, "once": True}
    assert typed_rule("set-state", {"event": "none"}) == {"event": "none", "new_state": 0}


def test_legacy_options_lists_from_keyval_and_single_rules():
    opts = legacy_options({"driver": "blkdebug", "inject-error": {
        "1": {"event": "none", "errno": "28"}, "0": {"event": "pwritev"}}})
    assert opts["inject-error"] == [{"event": "pwritev"}, {"event": "none", "errno": 28}]
    opts = legacy_options({"driver": "blkdebug", "inject-error": {"event": "none"}})
    assert opts["inject-error"] == [{"event": "none"}]
    with pytest.raises(Error, match="doesn't support the option 'inject-error'"):
        legacy_options({"driver": "blkdebug", "inject-error": "x"})


def test_config_file(tmp_path):
    conf = tmp_path / "rules.conf"
    conf.write_text('# comment\n[inject-error]\nevent = "none"\niotype = "read"\n'
                    'errno = "28"\n\n[set-state "s"]\nevent = "none"\nnew_state = "2"\n'
                    '[inject-error]\nevent nothing\n')
    assert read_config(str(conf)) == {
        "inject-error": [{"event": "none", "iotype": "read", "errno": "28"},
                         {"event": ""}],          # QEMU's parser: no quoted value -> ""
        "set-state": [{"event": "none", "new_state": "2"}]}
    conf.write_text('[foo]\n')
    with pytest.raises(Error, match="^There is no option group 'foo'$"):
        read_config(str(conf))
    with pytest.raises(Error, match="^Could not read blkdebug config file: No such file"):
        read_config(str(tmp_path / "missing"))


def test_filenames():
    assert protocol_options("blkdebug:rules.conf:disk.img") == {
        "driver": "blkdebug", "config": "rules.conf",
        "image": {"driver": "file", "filename": "disk.img"}}
    assert protocol_options("blkdebug::null-co://") == {
        "driver": "blkdebug", "image": {"driver": "null-co"}}
    assert protocol_options_for("blkdebug", "disk.img") == {
        "driver": "blkdebug", "image": {"driver": "file", "filename": "disk.img"}}
    with pytest.raises(Error, match="^blkdebug requires both config file and image path$"):
        protocol_options("blkdebug:disk.img")


# ---- nodes -------------------------------------------------------------------------------------

@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(b"\x11" * (1 << 20))
    return str(p)


def open_node(image, top="raw", **bd):
    g = BlockGraph()
    blk = {"driver": "blkdebug", "image": {"driver": "file", "filename": image}, **bd}
    opts = {"driver": "raw", "node-name": "top", "file": blk} if top == "raw" else \
        dict(blk, **{"node-name": "top"})
    node = g.blockdev_add(opts)
    att = node.attach("an unnamed block device", PERM_CONSISTENT_READ | PERM_WRITE,
                      PERM_ALL & ~PERM_RESIZE)
    return g, node, att


def test_open_errors_are_qemus(image):
    g = BlockGraph()
    base = {"driver": "blkdebug", "node-name": "b", "image": {"driver": "file", "filename": image}}
    for extra, msg in ((({"align": 3}), "Cannot meet constraints with align 3"),
                       (({"align": 4096, "max-transfer": 1024}),
                        "Cannot meet constraints with max-transfer 1024"),
                       (({"align": 1024, "opt-write-zero": 512}),
                        "Cannot meet constraints with opt-write-zero 512"),
                       (({"opt-discard": 4096, "max-discard": 2048}),
                        "Cannot meet constraints with max-discard 2048"),
                       (({"max-transfer": 3000000000}), "Parameter 'max-transfer' expects int32_t"),
                       (({"inject-error": [{"iotype": "read"}]}),
                        "Parameter 'inject-error[0].event' is missing"),
                       (({"set-state": [{"event": "none"}]}),
                        "Parameter 'set-state[0].new_state' is missing"),
                       (({"config": "/nonexistent"}),
                        "Could not read blkdebug config file: No such file or directory")):
        with pytest.raises(Error) as e:
            g.blockdev_add(dict(base, **extra))
        assert e.value.message == msg
    assert g.nodes() == []


def test_read_write_errors_and_second_request_unaffected(image):
    g, node, att = open_node(image, **{"inject-error": [
        {"event": "none", "iotype": "read", "sector": 8, "errno": errno.ENOSPC}]})
    buf = bytearray(512)
    node.read_into(0, buf)
    fails(node.read_into, 4096, buf, err=errno.ENOSPC)
    node.write(4096, b"\x22" * 512)
    node.read_into(4608, buf)
    assert buf == b"\x11" * 512


def test_events_from_raw_and_the_write_path(image):
    g, node, att = open_node(image, **{"inject-error": [{"event": "write_aio", "iotype": "read"}]})
    buf = bytearray(512)
    node.write_zeroes(0, 512)       # raw fires nothing for write-zeroes
    node.read_into(0, buf)
    node.write(0, b"x" * 512)
    fails(node.read_into, 0, buf)
    g, node, att = open_node(image, top="blkdebug",
                             **{"inject-error": [{"event": "pwritev_zero", "iotype": "read"}]})
    node.write(0, b"x" * 512)
    node.read_into(0, buf)
    node.write_zeroes(0, 512)
    fails(node.read_into, 0, buf)


def test_flush_fails_only_after_writes_and_fua_is_a_flush(image):
    rules = {"inject-error": [{"event": "none", "iotype": "flush"}]}
    g, node, att = open_node(image, **rules)
    node.flush()
    node.write(0, b"x" * 512)
    fails(node.flush)
    fails(node.flush)               # not flushed: still dirty
    fails(node.write, 0, b"y" * 512, True)
    # blkdebug as the top node: the emulated flush of the first FUA write runs before that
    # write counts, so it is clean (QEMU does the same)
    g, top, top_att = open_node(image, top="blkdebug", **rules)
    top.write(0, b"x" * 512, True)
    fails(top.write, 0, b"x" * 512, True)
    # raw flushes its child only while it holds write permission on it
    att.detach()
    node.attach("an unnamed block device", PERM_CONSISTENT_READ, PERM_ALL)
    node.flush()


def test_discard_reaches_the_rules_only_with_unmap(image):
    rules = {"inject-error": [{"event": "none", "iotype": "discard"}]}
    g, node, att = open_node(image, **rules)
    node.discard(0, 4096)                       # raw has discard=ignore
    g2 = BlockGraph()
    n2 = g2.blockdev_add({"driver": "raw", "node-name": "t", "discard": "unmap", "file": {
        "driver": "blkdebug", "image": {"driver": "file", "filename": image}, **rules}})
    n2.attach("an unnamed block device", PERM_CONSISTENT_READ | PERM_WRITE, PERM_ALL & ~PERM_RESIZE)
    fails(n2.discard, 0, 4096)


def test_alignment_pads_the_checks_and_rmw_events(image):
    g, node, att = open_node(image, top="blkdebug", align=4096,
                             **{"inject-error": [{"event": "none", "iotype": "write", "sector": 9}]})
    assert node.request_alignment == 4096
    fails(node.write, 4700, b"y" * 100)         # padded to [4096, 8192)
    node.write(8192, b"y" * 4096)
    fails(node.write_zeroes, 4096, 512)         # the unaligned block is written as data
    node.write_zeroes(8192, 4095)
    g, node, att = open_node(image, top="blkdebug", align=4096, **{"inject-error": [
        {"event": "pwritev_rmw_tail", "iotype": "write"}]})
    node.write(4096, b"x" * 8192)
    fails(node.write, 4000, b"x" * 4096)


def test_max_transfer_splits_and_earlier_pieces_are_written(image):
    g, node, att = open_node(image, top="blkdebug", **{"max-transfer": 1024, "inject-error": [
        {"event": "none", "iotype": "write", "sector": 2}]})
    fails(node.write, 0, b"z" * 4096)
    buf = bytearray(4096)
    node.read_into(0, buf)
    assert buf == b"z" * 1024 + b"\x11" * 3072


def test_write_zeroes_alignment_falls_back_to_writes(image):
    g, node, att = open_node(image, top="blkdebug", **{"opt-write-zero": 4096, "inject-error": [
        {"event": "none", "iotype": "write-zeroes"}]})
    node.write_zeroes(0, 512)                   # below the zero alignment: written as data
    fails(node.write_zeroes, 0, 512, False, True, err=errno.ENOTSUP)     # fast: no fallback
    fails(node.write_zeroes, 0, 4096)
    buf = bytearray(1024)
    node.read_into(0, buf)
    assert buf == bytes(512) + b"\x11" * 512
    g, node, att = open_node(image, top="blkdebug", **{"inject-error": [
        {"event": "none", "iotype": "write-zeroes", "errno": errno.ENOTSUP}]})
    node.write_zeroes(0, 4096)                  # an injected ENOTSUP falls back too


def test_block_status_and_cache_meet_block_status_rules(image):
    g, node, att = open_node(image, **{"inject-error": [{"event": "none", "iotype": "block-status"}]})
    fails(node.block_status, 0, 512)
    fails(node.cache, 0, 512)
    node.read_into(0, bytearray(512))


def test_take_and_unshare_child_perms(image):
    g, node, att = open_node(image, top="blkdebug", **{"take-child-perms": ["resize"],
                                                       "unshare-child-perms": ["write"]})
    child = node.children["image"]
    perm, shared = child.cumulative_perms()
    assert perm & PERM_RESIZE and not shared & PERM_WRITE


def test_display_names(image, tmp_path):
    g, node, att = open_node(image, top="blkdebug")
    assert display_name(node) == f"blkdebug::{image}"
    assert display_name(g.get("top")) == f"blkdebug::{image}"
    g, node, att = open_node(image, **{"align": 512})
    assert display_name(node) == (
        'json:{"driver": "raw", "file": {"image": {"driver": "file", "filename": "%s"}, '
        '"driver": "blkdebug", "align": 512}}' % image)
