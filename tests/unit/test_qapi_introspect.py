"""query-qmp-schema and query-commands: QEMU's SchemaInfo shape, compared with the real
qemu-storage-daemon 7.2, and consumable by the qemu.qmp tooling."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess

import pytest

from blockexport.qapi.schema import default_schema

QSD = shutil.which("qemu-storage-daemon")
needs_qsd = pytest.mark.skipif(QSD is None, reason="qemu-storage-daemon is not installed")

# Where our schema deliberately differs from QEMU 7.2's (see the report in the schema docs):
# union branches of drivers / object types we do not implement are empty here, and
# ImageInfo has no 'format-specific' (no format driver reports one yet).
MISSING_MEMBERS = {"format-specific"}
# ... and members of newer QEMU releases we follow (a security fix: QEMU 10.0's
# handshake-max-seconds of NbdServerOptions / nbd-server-start, CVE-2024-7409)
NEWER_MEMBERS = {"handshake-max-seconds"}


def qsd_query(*commands):
    """Run ``commands`` on a fresh qemu-storage-daemon and return their results."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "qmp.sock")
        proc = subprocess.Popen([QSD, "--chardev", f"socket,id=m,path={path},server=on,wait=on",
                                 "--monitor", "chardev=m"], stderr=subprocess.DEVNULL)
        try:
            s = socket.socket(socket.AF_UNIX)
            while True:
                try:
                    s.connect(path)
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    assert proc.poll() is None
                    os.sched_yield()
            with s, s.makefile("rwb") as f:
                f.readline()
                out = []
                for cmd in ("qmp_capabilities",) + commands:
                    f.write(json.dumps({"execute": cmd}).encode() + b"\n")
                    f.flush()
                    out.append(json.loads(f.readline())["return"])
                return out[1:]
        finally:
            proc.kill()
            proc.wait()


def canon(entities: dict, name: str, stack=()):
    """A comparable tree for type ``name`` of a SchemaInfo list (masked names resolved)."""
    if name in stack:
        return ("cycle", stack.index(name))
    e = entities[name]
    stack = stack + (name,)
    mt = e["meta-type"]
    feats = tuple(e.get("features", ()))
    if mt == "builtin":
        return ("builtin", e["json-type"])
    if mt == "enum":
        return ("enum", tuple(e["values"]),
                tuple((m["name"], tuple(m.get("features", ()))) for m in e["members"]), feats)
    if mt == "array":
        return ("array", canon(entities, e["element-type"], stack))
    if mt == "alternate":
        return ("alternate", tuple(sorted(repr(canon(entities, m["type"], stack))
                                          for m in e["members"])))
    members = tuple((m["name"], "default" in m, tuple(m.get("features", ())),
                     canon(entities, m["type"], stack)) for m in e["members"]
                    if m["name"] not in NEWER_MEMBERS)
    variants = tuple(sorted((v["case"], canon(entities, v["type"], stack))
                            for v in e.get("variants", ())))
    return ("object", members, e.get("tag"), variants, feats)


def prune(ours, theirs):
    """Drop from ``theirs`` what ``ours`` deliberately lacks, recursively."""
    if not (isinstance(ours, tuple) and isinstance(theirs, tuple)) or not ours or \
            ours[0] != theirs[0]:
        return theirs
    if ours[0] == "object":
        our_members = {m[0]: m for m in ours[1]}
        members = tuple(m[:3] + (prune(our_members[m[0]][3], m[3]),) if m[0] in our_members
                        else m for m in theirs[1] if m[0] in our_members
                        or m[0] not in MISSING_MEMBERS)
        empty = ("object", (), None, (), ())
        our_variants = dict(ours[3])
        # Export types we do not serve yet are absent from our enum and union (a QEMU build
        # without them looks the same).
        variants = tuple((c, our_variants[c] if our_variants.get(c) == empty
                          else prune(our_variants.get(c), t)) for c, t in theirs[3]
                         if c in our_variants or not ours[3])
        return ("object", members, theirs[2], variants, theirs[4])
    if ours[0] == "array":
        return ("array", prune(ours[1], theirs[1]))
    if ours[0] == "enum" and set(ours[1]) < set(theirs[1]):
        keep = set(ours[1])
        return ("enum", tuple(v for v in theirs[1] if v in keep),
                tuple(m for m in theirs[2] if m[0] in keep), theirs[3])
    return theirs


@needs_qsd
def test_same_commands_and_types_as_qemu():
    ours = default_schema().introspect()
    theirs, = qsd_query("query-qmp-schema")
    o_by = {e["name"]: e for e in ours}
    t_by = {e["name"]: e for e in theirs}
    names = [e["name"] for e in ours if e["meta-type"] in ("command", "event")]
    assert len(names) == 24
    for name in names:
        o, t = o_by[name], t_by[name]
        assert o["meta-type"] == t["meta-type"], name
        assert o.get("features") == t.get("features"), name
        assert o.get("allow-oob") == t.get("allow-oob"), name
        for key in ("arg-type", "ret-type"):
            if key not in t:
                continue
            mine = canon(o_by, o[key])
            assert mine == prune(mine, canon(t_by, t[key])), (name, key)


def test_schema_info_shape():
    s = default_schema()
    info = s.introspect()
    for e in info:      # every entity is a valid SchemaInfo of our own schema
        s.check_type("SchemaInfo", e)
    by = {e["name"]: e for e in info}
    assert len(by) == len(info)
    # commands and events first, in definition order; then the types they reach
    kinds = [e["meta-type"] for e in info]
    first_type = min(i for i, k in enumerate(kinds) if k not in ("command", "event"))
    assert all(k not in ("command", "event") for k in kinds[first_type:])
    # no type names leak: numbers, builtins and [arrays] only
    for e in info[first_type:]:
        n = e["name"]
        assert n.isdigit() or n.startswith("[") or e["meta-type"] == "builtin", n
    assert {e["name"] for e in info if e["meta-type"] == "builtin"} <= \
        {"str", "int", "number", "bool", "null", "any"}
    # commands without arguments/return value use the empty object, like QEMU's "0"
    stop = by["nbd-server-stop"]
    assert by[stop["arg-type"]] == {"name": stop["arg-type"], "meta-type": "object",
                                    "members": []}
    assert stop["ret-type"] == stop["arg-type"]
    assert by["nbd-server-add"]["features"] == ["deprecated"]
    exports = by[by["query-block-exports"]["ret-type"]]
    assert exports["meta-type"] == "array" and \
        exports["name"] == "[" + exports["element-type"] + "]"
    bea = by[by["block-export-add"]["arg-type"]]
    assert bea["tag"] == "type"
    assert [v["case"] for v in bea["variants"]] == ["nbd", "vhost-user-blk", "fuse"]  # QEMU order
    assert {"name": "writable", "type": "bool", "default": None} in bea["members"]
    enum = by[[m for m in bea["members"] if m["name"] == "type"][0]["type"]]
    assert enum["values"] == [m["name"] for m in enum["members"]]
    # a union value without a branch points to the empty object (QEMU's implicit branch)
    bdo = by[by["blockdev-add"]["arg-type"]]
    vmdk = [v for v in bdo["variants"] if v["case"] == "vmdk"][0]
    assert by[vmdk["type"]]["members"] == []
    qcow2 = [v for v in bdo["variants"] if v["case"] == "qcow2"][0]
    assert {"name": "backing", "type": by[qcow2["type"]]["members"][1]["type"],
            "default": None} in by[qcow2["type"]]["members"]
    assert len(bdo["variants"]) == 42
    assert s.introspect() == info and s.introspect() is not info


def test_query_commands():
    s = default_schema()
    names = [c["name"] for c in s.query_commands()]
    assert sorted(names) == sorted(s.commands)
    assert len(names) == 23
    assert names[-1] == "blockdev-add" and names[0] == "query-qmp-schema"  # newest first


@needs_qsd
def test_commands_are_a_subset_of_qemus():
    qemu, = qsd_query("query-commands")
    assert {c["name"] for c in default_schema().query_commands()} <= {c["name"] for c in qemu}


def test_qmp_shell_completion_consumes_query_commands():
    from qemu.qmp.qmp_shell import QMPCompleter
    completer = QMPCompleter()
    for cmd in default_schema().query_commands():
        completer.append(cmd["name"])
    assert completer.complete("block-export-a", 0) == "block-export-add"
    assert completer.complete("query-q", 0) == "query-qmp-schema"
