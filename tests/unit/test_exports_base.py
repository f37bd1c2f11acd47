"""The export framework (blockexport.exports.base): the common checks of export_add in QEMU's
order, the driver table, and the lifecycle an export type plugs into.

A small export type defined here goes through the same table and code as ``nbd``: that is all
FUSE and vhost-user-blk add.
"""
from __future__ import annotations

import asyncio

import pytest

from blockexport.block.graph import BlockGraph
from blockexport.block.node import PERM_ALL, PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE
from blockexport.errors import Error
from blockexport.exports import base
from blockexport.exports.base import BlockExport, ExportDriver, ExportEnv, export_add
from blockexport.objects import ObjectTable


class CountingDriver(ExportDriver):
    """An export type whose clients are a counter; it records what the framework calls."""
    type = "counting"
    calls: list = []

    def create(self, env, opts, node, attachment):
        self.calls.append(("create", opts["id"], attachment.perm, attachment.shared))
        if opts.get("fail"):
            raise Error("the type refuses")
        exp = BlockExport(self, opts["id"], node, attachment, opts.get("writable", False))
        exp.clients = 0
        exp.client_count = lambda: exp.clients
        return exp

    def request_shutdown(self, export, hard):
        self.calls.append(("request_shutdown", export.id, hard))
        if hard:
            export.clients = 0

    def delete(self, export):
        self.calls.append(("delete", export.id, export.attachment.attached))


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setitem(base.EXPORT_TYPES, "counting", (__name__, "CountingDriver"))
    CountingDriver.calls = []
    events = []
    graph = BlockGraph()
    graph.blockdev_add({"driver": "null-co", "node-name": "rw", "size": 1 << 20})
    graph.blockdev_add({"driver": "null-co", "node-name": "ro", "size": 1 << 20,
                        "read-only": True})
    e = ExportEnv(graph, ObjectTable(), base.ExportTable(lambda n, d=None: events.append((n, d))))
    e.events = events
    yield e
    graph.close()


def _opts(**kw):
    opts = {"type": "counting", "id": "e", "node-name": "rw"}
    opts.update(kw)
    return opts


def test_the_type_table_loads_a_driver_once(env):
    assert base.export_driver("counting") is base.export_driver("counting")
    assert isinstance(base.export_driver("nbd"), ExportDriver)
    with pytest.raises(Error, match="^Parameter 'type' does not accept value 'vduse-blk'$"):
        base.export_driver("vduse-blk")


@pytest.mark.parametrize("opts,message", [
    (_opts(id="1x"), "Invalid block export id"),
    (_opts(type="vduse-blk"), "Parameter 'type' does not accept value 'vduse-blk'"),
    (_opts(**{"node-name": "nope"}), "Cannot find device='' nor node-name='nope'"),
    (_opts(**{"node-name": "ro", "writable": True}), "Cannot export read-only node as writable"),
    (_opts(iothread="t"), 'iothread "t" not found'),
    # the id is checked first, as blk_exp_add does
    (_opts(id="1x", type="vduse-blk", writable=True, **{"node-name": "ro"}),
     "Invalid block export id"),
])
def test_common_checks_before_the_type(env, opts, message):
    with pytest.raises(Error) as ei:
        export_add(env, opts)
    assert ei.value.message == message
    assert CountingDriver.calls == []
    assert not env.graph.get("rw").users and not env.graph.get("ro").users


def test_the_type_gets_the_node_taken_sharing_everything(env):
    export_add(env, _opts(writable=True))
    export_add(env, _opts(id="r2"))
    assert CountingDriver.calls == [
        ("create", "e", PERM_CONSISTENT_READ | PERM_WRITE, PERM_ALL),
        ("create", "r2", PERM_CONSISTENT_READ, PERM_ALL)]
    assert [a.user for a in env.graph.get("rw").users] == ["an unnamed block device"] * 2
    assert [q["id"] for q in env.exports.query()] == ["r2", "e"]      # newest first
    with pytest.raises(Error, match="^Block export id 'e' is already in use$"):
        export_add(env, _opts())


def test_a_permission_conflict_comes_before_the_type(env):
    node = env.graph.get("rw")
    other = node.attach("an unnamed block device", PERM_CONSISTENT_READ,
                        PERM_ALL & ~PERM_WRITE)
    with pytest.raises(Error, match="^Permission conflict on node 'rw': permissions 'write' "
                       "are both required by an unnamed block device "):
        export_add(env, _opts(writable=True))
    assert CountingDriver.calls == [] and node.users == [other]
    other.detach()


def test_a_failing_type_leaves_the_node_free(env):
    with pytest.raises(Error, match="^the type refuses$"):
        export_add(env, _opts(fail=True))
    assert not env.graph.get("rw").users and env.exports.query() == []


def test_iothread_lookup(env):
    env.objects.add({"qom-type": "iothread", "id": "t"})
    export_add(env, _opts(iothread="t"))
    export_add(env, _opts(id="e2", iothread=""))       # "" finds the only iothread
    env.objects.add({"qom-type": "secret", "id": "s", "data": "x"})
    with pytest.raises(Error, match='^iothread "s" not found$'):
        export_add(env, _opts(id="e3", iothread="s"))


def test_safe_removal_waits_for_the_last_client_then_deletes(env):
    exp = export_add(env, _opts())
    exp.clients = 1

    async def scenario():
        with pytest.raises(Error) as ei:
            await env.exports.remove(exp, hard=False)
        assert ei.value.message == "export 'e' still in use"
        assert ei.value.hint == "Use mode='hard' to force client disconnect"
        assert not exp.shutting_down
        # hard: the type is asked to drop its clients (this one does at once)
        await env.exports.remove(exp, hard=True)
        await env.exports.wait_gone(exp)
    asyncio.run(scenario())
    assert CountingDriver.calls[1:] == [("request_shutdown", "e", True),
                                        ("delete", "e", True)]   # attachment released after
    assert not env.graph.get("rw").users
    assert env.events == [("BLOCK_EXPORT_DELETED", {"id": "e"})]
    export_add(env, _opts())                                   # the id is free again


def test_the_last_client_leaving_deletes_a_shutting_down_export(env):
    exp = export_add(env, _opts())
    exp.clients = 2
    exp.driver.request_shutdown = lambda e, hard: None          # clients leave on their own

    async def scenario():
        await env.exports.remove(exp, hard=True)
        assert exp.shutting_down and env.exports.find("e") is exp
        with pytest.raises(Error, match="^Export 'e' is already shutting down$"):
            await env.exports.remove(exp, hard=True)
        exp.clients = 1
        exp.client_gone()
        assert env.exports.find("e") is exp
        exp.clients = 0
        exp.client_gone()
        assert env.exports.find("e") is None
    asyncio.run(scenario())
    assert env.events == [("BLOCK_EXPORT_DELETED", {"id": "e"})]
    assert not env.graph.get("rw").users


def test_nbd_needs_a_server_and_frees_the_node(env):
    with pytest.raises(Error, match="^NBD server not running$"):
        export_add(env, {"type": "nbd", "id": "n", "node-name": "rw", "writable": True})
    assert not env.graph.get("rw").users


def test_nbd_unshares_resize(env):
    from blockexport.exports.nbd_server import NbdServer
    env.nbd_server = NbdServer()
    exp = export_add(env, {"type": "nbd", "id": "n", "node-name": "rw"})
    assert (exp.attachment.perm, exp.attachment.shared) == (PERM_CONSISTENT_READ,
                                                            PERM_ALL & ~PERM_RESIZE)
    assert exp.name == "rw" and exp.size == 1 << 20
    exp.close()
    exp.close()                                                 # idempotent
    assert not env.graph.get("rw").users
