"""ContextTable: QEMU's fixed context ids and LIST/SET query matching (behaviour.md a.6)."""
import pytest

from blockexport.nbd.metacontext import ContextTable, MetaContext

BASE = (0, "base:allocation")
DEPTH = (1, "qemu:allocation-depth")


def full():
    return ContextTable(allocation_depth=True, bitmaps=["a:b", "b0", "zz"])


def test_ids_are_fixed():
    assert full().names() == [BASE, DEPTH, (2, "qemu:dirty-bitmap:a:b"),
                              (3, "qemu:dirty-bitmap:b0"), (4, "qemu:dirty-bitmap:zz")]
    # without allocation depth the bitmaps keep their ids (no renumbering)
    assert ContextTable(False, ["x", "y"]).names() == [
        BASE, (2, "qemu:dirty-bitmap:x"), (3, "qemu:dirty-bitmap:y")]
    assert ContextTable().names() == [BASE]
    assert full().name_of(3) == "qemu:dirty-bitmap:b0"
    assert full().name_of(9) is None
    assert len(full()) == 5


@pytest.mark.parametrize("queries,expected", [
    ([], [0, 1, 2, 3, 4]),
    (["base:"], [0]),
    (["qemu:"], [1, 2, 3, 4]),
    (["qemu:dirty-bitmap:"], [2, 3, 4]),
    (["qemu:dirty-bitmap:b0", "base:allocation"], [0, 3]),
    (["qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b0", "qemu:"], [1, 2, 3, 4]),
    (["qemu:dirty-bitmap:a:"], []),                 # not a group, not a name
    (["qemu:dirty-bitmap:a:b"], [2]),
    (["BASE:", "base", "", "nbdkit:", "qemu:allocation"], []),
    (["base:allocation\0"], []),
    ([b"qemu:allocation-depth"], [1]),
    ([b"base:" + b"x" * 5000], []),
])
def test_match_list(queries, expected):
    t = full()
    assert [i for i, _ in t.match_list(queries)] == expected


@pytest.mark.parametrize("queries,expected", [
    ([], []),
    (["base:"], []),
    (["qemu:"], []),
    (["qemu:dirty-bitmap:"], []),
    (["qemu:dirty-bitmap:zz", "base:allocation", "qemu:allocation-depth"], [0, 1, 4]),
    (["base:allocation", "base:allocation"], [0]),
])
def test_match_set(queries, expected):
    assert [i for i, _ in full().match_set(queries)] == expected


def test_disabled_contexts_do_not_match():
    t = ContextTable(False, [])
    assert t.match_list(["qemu:"]) == []
    assert t.match_set(["qemu:allocation-depth"]) == []
    assert t.match_list(["qemu:allocation-depth", "base:"]) == [BASE]


def test_long_query_ignored():
    name = "x" * 4090
    t = ContextTable(False, [name])
    exact = "qemu:dirty-bitmap:" + name            # 4108 bytes > 4096
    assert t.match_set([exact]) == []
    assert t.match_list(["qemu:dirty-bitmap:"]) == [(2, exact)]


def test_pluggable_contexts_and_equality():
    t = ContextTable.from_contexts([
        MetaContext(7, "acme:thing", ("acme:",)),
        MetaContext(0, "base:allocation", ("base:",)),
    ])
    assert t.names() == [BASE, (7, "acme:thing")]
    assert t.match_list(["acme:"]) == [(7, "acme:thing")]
    assert t.match_set(["acme:"]) == []
    assert t.match_set(["acme:thing"]) == [(7, "acme:thing")]
    assert ContextTable(True, ["a"]) == ContextTable(True, ["a"])
    assert ContextTable(True, ["a"]) != ContextTable(False, ["a"])
    with pytest.raises(ValueError):
        ContextTable.from_contexts([MetaContext(0, "a:b"), MetaContext(0, "c:d")])
