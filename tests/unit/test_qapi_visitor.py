"""The QAPI input visitor (blockexport.qapi.visitor) against QEMU 7.2's messages.

Every expected message below was observed on qemu-storage-daemon 7.2; the ``*_on_qsd`` tests
run the same tables against the real daemon (one QMP session, or one short-lived process per
command line) to prove it.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess

import pytest

from blockexport.errors import Error
from blockexport.qapi.schema import default_schema

QSD = shutil.which("qemu-storage-daemon")
needs_qsd = pytest.mark.skipif(QSD is None, reason="qemu-storage-daemon is not installed")

ADDR_UNIX = {"type": "unix", "data": {"path": "/nonexistent/dir/s.sock"}}
NBD = {"type": "nbd", "id": "e", "node-name": "n0"}
VHOST = {"type": "vhost-user-blk", "id": "e", "node-name": "n0"}
RAW = {"driver": "raw", "node-name": "r"}

#: Export types QEMU has and we do not serve yet: our schema leaves them out of
#: BlockExportType, so they get "does not accept value" before any of their members are
#: checked (as from a QEMU build without them).  The QSD oracle tests still check QEMU's text.
NOT_YET = ("vduse-blk",)


def ours(arguments, message):
    """The message our schema gives for a case whose QEMU message is ``message``."""
    if isinstance(arguments, dict) and arguments.get("type") in NOT_YET:
        return "Parameter 'type' does not accept value '%s'" % arguments["type"]
    if isinstance(arguments, str):
        for t in NOT_YET:
            if arguments.startswith(t + ","):
                return "Parameter 'type' does not accept value '%s'" % t
    return message


# (command, raw JSON arguments or None, expected message).  None of these reach a handler.
JSON_CASES = [
    ("blockdev-del", "[]", "QMP input member 'arguments' must be an object"),
    ("blockdev-del", '"x"', "QMP input member 'arguments' must be an object"),
    ("query-version", "[]", "QMP input member 'arguments' must be an object"),
    ("blockdev-del", None, "Parameter 'node-name' is missing"),
    ("blockdev-del", {}, "Parameter 'node-name' is missing"),
    ("blockdev-del", {"foo": 1}, "Parameter 'node-name' is missing"),
    ("blockdev-del", {"node-name": "x", "foo": 1}, "Parameter 'foo' is unexpected"),
    ("query-version", {"a": 1}, "Parameter 'a' is unexpected"),
    ("quit", {"x": 1}, "Parameter 'x' is unexpected"),
    ("blockdev-del", {"node-name": 1}, "Invalid parameter type for 'node-name', expected: string"),
    ("blockdev-del", {"node-name": None}, "Invalid parameter type for 'node-name', expected: string"),
    ("blockdev-del", {"node-name": []}, "Invalid parameter type for 'node-name', expected: string"),
    ("blockdev-del", {"node-name": {}}, "Invalid parameter type for 'node-name', expected: string"),
    ("blockdev-del", {"node-name": True}, "Invalid parameter type for 'node-name', expected: string"),
    ("blockdev-del", {"node-name": 1.5}, "Invalid parameter type for 'node-name', expected: string"),
    # nested objects and flat unions
    ("nbd-server-start", {"addr": {"type": "unix", "data": {}}},
     "Parameter 'addr.data.path' is missing"),
    ("nbd-server-start", {"addr": {"type": "unix"}}, "Parameter 'addr.data' is missing"),
    ("nbd-server-start", {"addr": {"data": {}}}, "Parameter 'addr.type' is missing"),
    ("nbd-server-start", {"addr": {"type": "foo"}}, "Parameter 'type' does not accept value 'foo'"),
    ("nbd-server-start", {"addr": {"type": 1}},
     "Invalid parameter type for 'addr.type', expected: string"),
    ("nbd-server-start", {"addr": 1}, "Invalid parameter type for 'addr', expected: object"),
    ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "/x", "abstract": "yes"}}},
     "Invalid parameter type for 'addr.data.abstract', expected: boolean"),
    ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "/x", "zz": 1}}},
     "Parameter 'addr.data.zz' is unexpected"),
    ("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "x", "port": 1}}},
     "Invalid parameter type for 'addr.data.port', expected: string"),
    # integers
    ("nbd-server-start", {"addr": ADDR_UNIX, "max-connections": -1},
     "Parameter 'max-connections' expects uint32_t"),
    ("nbd-server-start", {"addr": ADDR_UNIX, "max-connections": 4294967296},
     "Parameter 'max-connections' expects uint32_t"),
    ("nbd-server-start", '{"addr": {"type": "unix", "data": {"path": "/x/y"}}, '
     '"max-connections": 1.0}', "Parameter 'max-connections' expects uint64"),
    ("nbd-server-start", {"addr": ADDR_UNIX, "max-connections": "1"},
     "Parameter 'max-connections' expects uint64"),
    ("nbd-server-start", {"addr": ADDR_UNIX, "max-connections": 18446744073709551616},
     "Parameter 'max-connections' expects uint64"),
    ("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "x", "port": "1",
                                                            "to": 70000}}},
     "Parameter 'to' expects uint16_t"),
    ("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "x", "port": "1",
                                                            "to": -1}}},
     "Parameter 'to' expects uint16_t"),
    ("block-dirty-bitmap-add", {"node": "n0", "name": "b", "granularity": -5},
     "Parameter 'granularity' expects uint32_t"),
    ("block-dirty-bitmap-add", {"node": "n0", "name": "b", "granularity": 1.0},
     "Parameter 'granularity' expects uint64"),
    ("object-add", {"qom-type": "iothread", "id": "i", "poll-max-ns": "x"},
     "Invalid parameter type for 'poll-max-ns', expected: integer"),
    ("object-add", {"qom-type": "iothread", "id": "i", "poll-max-ns": 1.5},
     "Invalid parameter type for 'poll-max-ns', expected: integer"),
    ("object-add", {"qom-type": "iothread", "id": "i", "poll-max-ns": 9223372036854775808},
     "Invalid parameter type for 'poll-max-ns', expected: integer"),
    ("object-add", {"qom-type": "iothread", "id": "i", "poll-max-ns": -9223372036854775809},
     "Invalid parameter type for 'poll-max-ns', expected: integer"),
    ("blockdev-add", dict(RAW, file="n0", offset=18446744073709551615),
     "Invalid parameter type for 'offset', expected: integer"),
    ("block-export-add", dict(VHOST, addr={"type": "unix", "path": "/x"}, **{"num-queues": 65536}),
     "Parameter 'num-queues' expects uint16_t"),
    # boxed unions
    ("block-export-add", {}, "Parameter 'type' is missing"),
    ("block-export-add", {"type": "x"}, "Parameter 'type' does not accept value 'x'"),
    ("block-export-add", {"type": "nbd"}, "Parameter 'id' is missing"),
    ("block-export-add", dict(NBD, foo=1), "Parameter 'foo' is unexpected"),
    ("block-export-add", dict(NBD, iothread=1),
     "Invalid parameter type for 'iothread', expected: string"),
    ("block-export-add", {"type": "fuse", "id": "e", "node-name": "n0"},
     "Parameter 'mountpoint' is missing"),
    ("block-export-add", {"type": "fuse", "id": "e", "node-name": "n0", "mountpoint": "/x",
                          "allow-other": "x"}, "Parameter 'allow-other' does not accept value 'x'"),
    ("block-export-add", {"type": "vduse-blk", "id": "e", "node-name": "n0"},
     "Parameter 'name' is missing"),
    ("block-export-add", dict(VHOST, addr={"type": "unix", "path": 1}),
     "Invalid parameter type for 'addr.path', expected: string"),
    ("block-export-add", dict(VHOST, addr={"type": "unix"}), "Parameter 'addr.path' is missing"),
    ("block-export-add", dict(VHOST, addr={}), "Parameter 'addr.type' is missing"),
    ("block-export-add", dict(VHOST, addr={"type": "bad"}),
     "Parameter 'type' does not accept value 'bad'"),
    ("block-export-del", {"id": "e", "mode": "x"}, "Parameter 'mode' does not accept value 'x'"),
    # lists and alternates
    ("block-export-add", dict(NBD, bitmaps=[1]),
     "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr"),
    ("block-export-add", dict(NBD, bitmaps=[None]),
     "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr"),
    ("block-export-add", dict(NBD, bitmaps=["a", {"node": "n0"}]),
     "Parameter 'bitmaps[1].name' is missing"),
    ("block-export-add", dict(NBD, bitmaps=["a", {"node": "n0", "name": "x", "z": 1}]),
     "Parameter 'bitmaps[1].z' is unexpected"),
    ("block-export-add", dict(NBD, bitmaps=[{"node": 1, "name": "x"}]),
     "Invalid parameter type for 'bitmaps[0].node', expected: string"),
    ("block-export-add", dict(NBD, bitmaps="a"),
     "Invalid parameter type for 'bitmaps', expected: array"),
    ("block-dirty-bitmap-merge", {"node": "n0", "target": "b", "bitmaps": [True]},
     "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr"),
    ("block-dirty-bitmap-merge", {"node": "n0", "target": "b", "bitmaps": [{"node": "n0"}]},
     "Parameter 'bitmaps[0].name' is missing"),
    ("qmp_capabilities", {"enable": ["x"]}, "Parameter 'null' does not accept value 'x'"),
    ("qmp_capabilities", {"enable": "oob"}, "Invalid parameter type for 'enable', expected: array"),
    # blockdev-add
    ("blockdev-add", {}, "Parameter 'driver' is missing"),
    ("blockdev-add", {"driver": "foo"}, "Parameter 'driver' does not accept value 'foo'"),
    ("blockdev-add", RAW, "Parameter 'file' is missing"),
    ("blockdev-add", dict(RAW, file=1), "Invalid parameter type for 'file', expected: BlockdevRef"),
    ("blockdev-add", dict(RAW, file=None),
     "Invalid parameter type for 'file', expected: BlockdevRef"),
    ("blockdev-add", dict(RAW, file={}), "Parameter 'file.driver' is missing"),
    ("blockdev-add", dict(RAW, file={"driver": "file"}), "Parameter 'file.filename' is missing"),
    ("blockdev-add", dict(RAW, file={"driver": "raw", "file": 1}),
     "Invalid parameter type for 'file', expected: BlockdevRef"),
    ("blockdev-add", dict(RAW, file={"driver": "file", "filename": "/x", "aio": "bad"}),
     "Parameter 'aio' does not accept value 'bad'"),
    ("blockdev-add", dict(RAW, file={"driver": "file", "filename": "/x", "aio-max-batch": "x"}),
     "Invalid parameter type for 'file.aio-max-batch', expected: integer"),
    ("blockdev-add", dict(RAW, file={"driver": "bad"}),
     "Parameter 'driver' does not accept value 'bad'"),
    ("blockdev-add", '{"driver": "raw", "node-name": "r", "file": {"driver": "null-co", '
     '"size": 1.5}}', "Invalid parameter type for 'file.size', expected: integer"),
    ("blockdev-add", {"driver": "null-co", "node-name": "r", "size": "1"},
     "Invalid parameter type for 'size', expected: integer"),
    ("blockdev-add", {"driver": "null-co", "node-name": "r", "cache": {"direct": 1}},
     "Invalid parameter type for 'cache.direct', expected: boolean"),
    ("blockdev-add", {"driver": "null-co", "node-name": "r", "cache": {"x": 1}},
     "Parameter 'cache.x' is unexpected"),
    ("blockdev-add", {"driver": "null-co", "node-name": "r", "cache": 1},
     "Invalid parameter type for 'cache', expected: object"),
    ("blockdev-add", {"driver": "file", "node-name": "r", "filename": "/x", "aio": None},
     "Invalid parameter type for 'aio', expected: string"),
    ("blockdev-add", {"driver": "file", "node-name": "r", "filename": "/x",
                      "x-check-cache-dropped": 1},
     "Invalid parameter type for 'x-check-cache-dropped', expected: boolean"),
    # object-add
    ("object-add", {"id": "i"}, "Parameter 'qom-type' is missing"),
    ("object-add", {"qom-type": "nope", "id": "i"},
     "Parameter 'qom-type' does not accept value 'nope'"),
    ("object-add", {"qom-type": "iothread"}, "Parameter 'id' is missing"),
    ("object-add", {"qom-type": "iothread", "id": "i", "foo": 1}, "Parameter 'foo' is unexpected"),
    ("object-add", {"qom-type": "secret", "id": "i", "data": "x", "format": "bad"},
     "Parameter 'format' does not accept value 'bad'"),
    ("object-add", {"qom-type": "tls-creds-x509", "id": "i", "endpoint": "bad"},
     "Parameter 'endpoint' does not accept value 'bad'"),
    ("object-add", {"qom-type": "authz-list", "id": "i",
                    "rules": [{"match": "x", "policy": "allow", "format": 1}]},
     "Invalid parameter type for 'rules[0].format', expected: string"),
    ("object-add", {"qom-type": "authz-list", "id": "i", "rules": [{"policy": "allow"}]},
     "Parameter 'rules[0].match' is missing"),
    ("object-add", {"qom-type": "authz-list", "id": "i",
                    "rules": [{"match": "x", "policy": "bad"}]},
     "Parameter 'policy' does not accept value 'bad'"),
    ("object-add", {"qom-type": "authz-list", "id": "i", "rules": {}},
     "Invalid parameter type for 'rules', expected: array"),
    ("object-add", {"qom-type": "authz-list", "id": "i", "rules": [1]},
     "Invalid parameter type for 'rules[0]', expected: object"),
    ("object-add", {"qom-type": "authz-simple", "id": "i"}, "Parameter 'identity' is missing"),
    # several unexpected members: QEMU names the first its GHashTable of leftover keys
    # returns (validate.first_unexpected), not the first in the request
    ("object-add", {"qom-type": "iothread", "id": "i", "policy": "deny", "rules": []},
     "Parameter 'rules' is unexpected"),
    ("object-add", {"qom-type": "secret", "id": "i", "aio-max-batch": 1, "thread-pool-min": 1,
                    "thread-pool-max": 1, "poll-max-ns": 1, "poll-grow": 1, "poll-shrink": 1},
     "Parameter 'poll-max-ns' is unexpected"),
    ("blockdev-add", {"driver": "null-aio", "node-name": "x", "file": "x", "offset": 1,
                      "size": 1}, "Parameter 'offset' is unexpected"),
    ("blockdev-add", {"driver": "null-co", "node-name": "r", "cache": {"x": 1, "y": 2, "z": 3}},
     "Parameter 'cache.z' is unexpected"),
    ("nbd-server-start", {"addr": {"type": "unix", "data": {
        "path": "/x", "a": 1, "b": 2, "c": 3, "d": 4, "e": 5, "f": 6, "g": 7, "h": 8, "i": 9}}},
     "Parameter 'addr.data.b' is unexpected"),
    # after negotiation QEMU still checks qmp_capabilities' arguments first
    ("qmp_capabilities", {"zz": 1}, "Parameter 'zz' is unexpected"),
]


def _args(raw):
    if isinstance(raw, str):
        return json.loads(raw)
    return raw


def _case_id(case):
    return f"{case[0]}:{case[2]}"


@pytest.mark.parametrize("command, arguments, message", JSON_CASES, ids=map(_case_id, JSON_CASES))
def test_json_errors(command, arguments, message):
    with pytest.raises(Error) as e:
        default_schema().check_command_args(command, _args(arguments))
    assert e.value.message == ours(arguments, message)
    assert e.value.qmp_class == "GenericError"


class _QsdQmp:
    """A bare synchronous QMP session with a qemu-storage-daemon (test oracle)."""

    def __init__(self, tmp_path, *args):
        sock = str(tmp_path / "qmp.sock")
        self.proc = subprocess.Popen(
            [QSD, "--chardev", f"socket,id=m,path={sock},server=on,wait=on",
             "--monitor", "chardev=m", *args], stderr=subprocess.PIPE)
        self.sock = socket.socket(socket.AF_UNIX)
        while True:   # the socket appears before QSD accepts: connect() retries are the wait
            try:
                self.sock.connect(sock)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if self.proc.poll() is not None:
                    raise RuntimeError(self.proc.stderr.read().decode())
                os.sched_yield()
        self.f = self.sock.makefile("rwb")
        self.f.readline()
        assert "return" in self.raw('{"execute": "qmp_capabilities"}')

    def raw(self, text: str) -> dict:
        self.f.write(text.encode() + b"\n")
        self.f.flush()
        while True:
            reply = json.loads(self.f.readline())
            if "event" not in reply:
                return reply

    def close(self):
        self.sock.close()
        self.proc.kill()
        self.proc.wait()
        self.proc.stderr.close()


@needs_qsd
def test_json_errors_on_qsd(tmp_path):
    q = _QsdQmp(tmp_path, "--blockdev", "null-co,node-name=n0")
    try:
        for command, arguments, message in JSON_CASES:
            text = '{"execute": "%s"' % command
            if arguments is not None:
                text += ', "arguments": ' + (arguments if isinstance(arguments, str)
                                             else json.dumps(arguments))
            reply = q.raw(text + "}")
            assert reply.get("error") == {"class": "GenericError", "desc": message}, text
    finally:
        q.close()


# ---- what passes, and how it comes back ------------------------------------------------------

def test_valid_arguments_come_back_unchanged():
    s = default_schema()
    args = {"type": "nbd", "id": "e", "node-name": "n", "bitmaps": ["a", {"node": "n", "name": "b"}],
            "writable": True}
    assert s.check_command_args("block-export-add", args) == args
    assert s.check_command_args("query-version", None) == {}
    assert s.check_command_args("nbd-server-stop", {}) == {}
    addr = {"addr": {"type": "inet", "data": {"host": "::1", "port": "10809", "ipv6": True}},
            "max-connections": 4294967295}
    assert s.check_command_args("nbd-server-start", addr) == addr
    # absent optional members stay absent; uint64 keeps negative numbers as given (QEMU wraps)
    assert s.check_type("BlockdevOptions", {"driver": "null-co", "latency-ns": -1}) == \
        {"driver": "null-co", "latency-ns": -1}
    # 'any' accepts everything; numbers accept integers
    assert s.check_type("SchemaInfoObjectMember", {"name": "a", "type": "b",
                                                   "default": [1, {}]})["default"] == [1, {}]
    assert s.check_type("BlockdevRefOrNull", None) is None
    assert s.check_type("StrOrNull", "x") == "x"


def test_unimplemented_union_branches_are_left_to_the_handler():
    s = default_schema()
    # a driver of QEMU's enum without a branch here: common members checked, the rest passes
    assert s.check_type("BlockdevOptions", {"driver": "vmdk", "file": "x", "zz": 1}) == \
        {"driver": "vmdk", "file": "x", "zz": 1}
    with pytest.raises(Error, match="^Invalid parameter type for 'read-only', expected: boolean$"):
        s.check_type("BlockdevOptions", {"driver": "vmdk", "read-only": 1})
    assert s.check_command_args("object-add", {"qom-type": "can-bus", "id": "c"})


def test_arguments_none_means_absent():
    # QEMU rejects an explicit "arguments": null in its dispatcher ("QMP input member
    # 'arguments' must be an object"); here None is "no arguments" (the caller's job).
    with pytest.raises(Error, match="^Parameter 'node-name' is missing$"):
        default_schema().check_command_args("blockdev-del", None)


def test_paths_and_unknown_commands():
    s = default_schema()
    with pytest.raises(Error, match=r"^Parameter 'file\.driver' is missing$"):
        s.check_type("BlockdevOptions", {}, path="file")
    with pytest.raises(Error) as e:
        s.check_command_args("nosuch", {})
    assert (e.value.message, e.value.qmp_class) == \
        ("The command nosuch has not been found", "CommandNotFound")


# ---- keyval (command line) -------------------------------------------------------------------

# (option, argument, expected message after "qemu-storage-daemon: OPTION ARG: ")
KEYVAL_CASES = [
    ("--blockdev", "null-co,node-name=n,read-only=maybe",
     "Parameter 'read-only' expects 'on' or 'off'"),
    ("--blockdev", "null-co,node-name=n,size=1k", "Parameter 'size' expects integer"),
    ("--blockdev", "null-co,node-name=n,read-zeroes=true,size=abc",
     "Parameter 'size' expects integer"),
    ("--blockdev", "driver=raw,node-name=r,file.driver=file,file.filename=/x,discard=bad",
     "Parameter 'discard' does not accept value 'bad'"),
    ("--blockdev", "raw,node-name=r,file.driver=file,file.filename=/x,file.zz=1",
     "Parameter 'file.zz' is unexpected"),
    ("--blockdev", "raw,node-name=r,file.driver=file,file.filename=/x,cache.direct=x",
     "Parameter 'cache.direct' expects 'on' or 'off'"),
    ("--blockdev", "raw,node-name=r,file.driver=file,file.filename=/x,cache=x",
     "Invalid parameter type for 'cache', expected: object"),
    ("--blockdev", "raw,file.driver=file,file.filename=/x,node-name.a=1",
     "Parameters 'node-name.*' are unexpected"),
    ("--blockdev", '{"driver":"raw","node-name":"r","file":1}',
     "Invalid parameter type for 'file', expected: BlockdevRef"),
    ("--blockdev", '{"driver":"raw","node-name":"r","file":"x","offset":"1"}',
     "Invalid parameter type for 'offset', expected: integer"),
    ("--nbd-server", "addr.type=inet,addr.host=x,addr.port=1,max-connections=x",
     "Parameter 'max-connections' expects integer"),
    ("--nbd-server", "addr.type=inet,addr.host=x,addr.port=1,max-connections=-1",
     "Parameter 'max-connections' expects uint32_t"),
    ("--nbd-server", "addr.type=inet,addr.host=x,addr.port=1,max-connections=4294967296",
     "Parameter 'max-connections' expects uint32_t"),
    ("--nbd-server", "addr.type=inet,addr.host=x,addr.port=1,addr.to=70000",
     "Parameter 'to' expects uint16_t"),
    ("--nbd-server", "addr.type=unix", "Parameter 'addr.path' is missing"),
    ("--nbd-server", "addr.type=unix,addr.path=/x,addr.abstract=1",
     "Parameter 'addr.abstract' expects 'on' or 'off'"),
    ("--nbd-server", "addr.type=foo", "Parameter 'type' does not accept value 'foo'"),
    ("--nbd-server", "addr.type=unix,addr.path=/x,addr.xx=1", "Parameter 'addr.xx' is unexpected"),
    ("--nbd-server", "addr.type=unix,addr.path.a=/x", "Parameters 'addr.path.*' are unexpected"),
    ("--nbd-server", "addr=x", "Invalid parameter type for 'addr', expected: object"),
    ("--nbd-server", '{"addr":{"type":"unix"}}', "Parameter 'addr.path' is missing"),
    ("--export", "nbd,id=e,node-name=n,writable=x", "Parameter 'writable' expects 'on' or 'off'"),
    ("--export", "nbd,id=e,node-name=n,bitmaps=x",
     "Invalid parameter type for 'bitmaps', expected: array"),
    ("--export", "nbd,id=e,node-name=n,bitmaps.0.node=x", "Parameter 'bitmaps.0.name' is missing"),
    ("--export", "bad,id=e", "Parameter 'type' does not accept value 'bad'"),
    ("--export", "id=e", "Parameter 'type' is missing"),
    ("--export", "vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path=/x,num-queues=x",
     "Parameter 'num-queues' expects integer"),
    ("--export", "vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path=/x,"
     "logical-block-size=1x", "Parameter 'logical-block-size' expects size"),
    ("--object", "iothread,id=m,poll-max-ns=x", "Parameter 'poll-max-ns' expects integer"),
    ("--object", "iothread,id=m,poll-max-ns=9223372036854775808",
     "Parameter 'poll-max-ns' expects integer"),
    ("--object", "iothread,id=m,poll-max-ns.a=1", "Parameters 'poll-max-ns.*' are unexpected"),
    ("--object", "authz-list,id=a,rules=x", "Invalid parameter type for 'rules', expected: array"),
    ("--object", "authz-list,id=a,rules.0.match=x,rules.0.policy=bad",
     "Parameter 'policy' does not accept value 'bad'"),
    ("--object", "authz-list,id=a,rules.0=x", "Invalid parameter type for 'rules.0', expected: object"),
    ("--object", "iothread,id=a,foo=1", "Parameter 'foo' is unexpected"),
    ("--object", "iothread,id=a,foo=1,bar=2,baz=3", "Parameter 'baz' is unexpected"),
    ("--blockdev", "null-co,node-name=n,zz=1,aa=2,bb=3", "Parameter 'aa' is unexpected"),
    ("--object", "nope,id=a", "Parameter 'qom-type' does not accept value 'nope'"),
    ("--object", "iothread", "Parameter 'id' is missing"),
    ("--monitor", "chardev=x,pretty=maybe", "Parameter 'pretty' expects 'on' or 'off'"),
    ("--monitor", "chardev=x,mode=bad", "Parameter 'mode' does not accept value 'bad'"),
    ("--monitor", "x,foo=1", "Parameter 'foo' is unexpected"),
]

_OPTION_TYPES = {"--blockdev": ("BlockdevOptions", "driver"),
                 "--nbd-server": ("NbdServerOptions", None),
                 "--export": ("BlockExportOptions", "type"),
                 "--object": ("ObjectOptions", "qom-type"),
                 "--monitor": ("MonitorOptions", "chardev")}


def check_option(option: str, arg: str):
    """What qemu-storage-daemon does with an option's argument before using it: JSON when
    it starts with '{', else keyval with the option's implied key."""
    from blockexport.util.keyval import keyval_parse
    type_name, implied = _OPTION_TYPES[option]
    if arg.startswith("{"):
        return default_schema().check_type(type_name, json.loads(arg))
    value, _ = keyval_parse(arg, implied)
    return default_schema().check_type(type_name, value, keyval=True)


@pytest.mark.parametrize("option, arg, message", KEYVAL_CASES,
                         ids=[f"{o} {a}" for o, a, _ in KEYVAL_CASES])
def test_keyval_errors(option, arg, message):
    with pytest.raises(Error) as e:
        check_option(option, arg)
    assert e.value.message == ours(arg, message)


@needs_qsd
def test_keyval_errors_on_qsd():
    for option, arg, message in KEYVAL_CASES:
        r = subprocess.run([QSD, option, arg], capture_output=True, text=True, timeout=10)
        assert r.returncode == 1
        assert r.stderr == f"qemu-storage-daemon: {option} {arg}: {message}\n"


def test_keyval_conversions():
    assert check_option("--nbd-server", "addr.type=inet,addr.host=::,addr.port=10809,"
                        "addr.to=0x2a30,addr.ipv6=yes,max-connections=010") == \
        {"addr": {"type": "inet", "host": "::", "port": "10809", "to": 10800, "ipv6": True},
         "max-connections": 8}
    assert check_option("--export", "nbd,id=e,node-name=n,bitmaps.0=a,bitmaps.1.node=n,"
                        "bitmaps.1.name=b,allocation-depth=off") == \
        {"type": "nbd", "id": "e", "node-name": "n",
         "bitmaps": ["a", {"node": "n", "name": "b"}], "allocation-depth": False}
    assert check_option("--blockdev", "raw,node-name=r,file.driver=null-co,file.size=-0x10,"
                        "file.latency-ns=-1,offset=512") == \
        {"driver": "raw", "node-name": "r", "offset": 512,
         "file": {"driver": "null-co", "size": -16, "latency-ns": 2**64 - 1}}
    assert check_option("--object", "iothread,id=i,poll-grow=2") == \
        {"qom-type": "iothread", "id": "i", "poll-grow": 2}
    assert check_option("--monitor", "mon0,pretty=on") == {"chardev": "mon0", "pretty": True}
    for text, value in [("on", True), ("yes", True), ("true", True), ("y", True),
                        ("off", False), ("no", False), ("false", False), ("n", False)]:
        assert check_option("--monitor", "m,pretty=" + text)["pretty"] is value
    for text in ("Y", "ON", "1", ""):
        with pytest.raises(Error, match="^Parameter 'pretty' expects 'on' or 'off'$"):
            check_option("--monitor", "m,pretty=" + text)
    with pytest.raises(Error, match="^Parameter 'poll-max-ns' expects integer$"):
        check_option("--object", "iothread,id=i,poll-max-ns=5 ")
    assert check_option("--object", "iothread,id=i,poll-max-ns= -0x10")["poll-max-ns"] == -16
