"""Introspection and block-graph commands: query-version, query-commands, query-qmp-schema,
blockdev-add, blockdev-del, query-named-block-nodes. Expectations are qemu-storage-daemon 7.2's."""
from __future__ import annotations

from helpers.daemons import file_node, make_image

# The commands this project implements (behaviour.md §b).
OURS = {
    "qmp_capabilities", "query-version", "query-commands", "query-qmp-schema", "quit",
    "blockdev-add", "blockdev-del", "query-named-block-nodes",
    "nbd-server-start", "nbd-server-stop", "nbd-server-add", "nbd-server-remove",
    "block-export-add", "block-export-del", "query-block-exports",
    "block-dirty-bitmap-add", "block-dirty-bitmap-remove", "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable", "block-dirty-bitmap-disable", "block-dirty-bitmap-merge",
    "object-add", "object-del",
}
# qemu-storage-daemon 7.2's 74 commands: we may implement fewer, never others.
QSD_COMMANDS = OURS | {
    "block-commit", "block-job-cancel", "block-job-complete", "block-job-dismiss",
    "block-job-finalize", "block-job-pause", "block-job-resume", "block-job-set-speed",
    "block-set-write-threshold", "block-stream", "block_resize", "blockdev-backup",
    "blockdev-create", "blockdev-mirror", "blockdev-reopen", "blockdev-snapshot",
    "blockdev-snapshot-delete-internal-sync", "blockdev-snapshot-internal-sync",
    "blockdev-snapshot-sync", "change-backing-file", "chardev-add", "chardev-change",
    "chardev-remove", "chardev-send-break", "drive-backup", "drive-mirror", "job-cancel",
    "job-complete", "job-dismiss", "job-finalize", "job-pause", "job-resume", "qom-get",
    "qom-list", "qom-list-properties", "qom-list-types", "qom-set", "query-block",
    "query-block-jobs", "query-blockstats", "query-chardev", "query-chardev-backends",
    "query-jobs", "ringbuf-read", "ringbuf-write", "transaction", "x-blockdev-amend",
    "x-blockdev-change", "x-blockdev-set-iothread", "x-debug-block-dirty-bitmap-sha256",
    "x-debug-query-block-graph",
}


def test_query_version(qmp):
    v = qmp.cmd("query-version")
    assert set(v) == {"qemu", "package"}
    assert (v["qemu"]["major"], v["qemu"]["minor"]) == (7, 2)
    assert isinstance(v["qemu"]["micro"], int) and isinstance(v["package"], str)


def test_query_commands(qmp, daemon_kind):
    cmds = qmp.cmd("query-commands")
    assert all(set(c) == {"name"} for c in cmds)
    names = {c["name"] for c in cmds}
    assert len(names) == len(cmds)
    assert OURS <= names
    assert names <= QSD_COMMANDS
    if daemon_kind == "qemu-storage-daemon":
        assert len(QSD_COMMANDS) == 74 and names == QSD_COMMANDS


META = {"builtin", "enum", "array", "object", "alternate", "command", "event"}


def test_query_qmp_schema_is_consistent(qmp):
    """A list of SchemaInfo whose every type reference resolves (qmp-shell itself only uses
    query-commands; this is what any introspecting client relies on)."""
    schema = qmp.cmd("query-qmp-schema")
    by_name = {}
    for e in schema:
        assert e["meta-type"] in META, e
        key = (e["meta-type"] in ("command", "event"), e["name"])
        assert key not in by_name, f"duplicate {e}"
        by_name[key] = e
    types = {name: e for (is_entity, name), e in by_name.items() if not is_entity}

    def ref(t):
        assert t in types, f"dangling type reference {t!r}"
        return types[t]

    for e in schema:
        mt = e["meta-type"]
        if mt == "builtin":
            assert e["json-type"] in ("string", "number", "int", "boolean", "null", "object",
                                      "array", "value")
        elif mt == "enum":
            assert all(isinstance(v, str) for v in e["values"])
        elif mt == "array":
            ref(e["element-type"])
        elif mt == "object":
            for m in e["members"]:
                ref(m["type"])
            for v in e.get("variants", []):
                ref(v["type"])
            if "tag" in e:
                assert e["tag"] in {m["name"] for m in e["members"]}
        elif mt == "alternate":
            for m in e["members"]:
                ref(m["type"])
        elif mt == "command":
            assert ref(e["arg-type"])["meta-type"] == "object"
            ref(e["ret-type"])
        elif mt == "event":
            assert ref(e["arg-type"])["meta-type"] == "object"

    commands = {n for (ent, n), e in by_name.items() if ent and e["meta-type"] == "command"}
    assert commands == {c["name"] for c in qmp.cmd("query-commands")}
    assert OURS <= commands

    # the types of the block-export commands, as QEMU introspects them
    deleted = by_name[(True, "BLOCK_EXPORT_DELETED")]
    assert deleted["meta-type"] == "event"
    assert ref(deleted["arg-type"])["members"] == [{"name": "id", "type": "str"}]
    dele = ref(by_name[(True, "block-export-del")]["arg-type"])
    assert [m["name"] for m in dele["members"]] == ["id", "mode"]
    assert dele["members"][0]["type"] == "str"
    assert dele["members"][1]["default"] is None
    assert ref(dele["members"][1]["type"])["values"] == ["safe", "hard"]
    query = by_name[(True, "query-block-exports")]
    info = ref(ref(query["ret-type"])["element-type"])
    assert {m["name"]: ref(m["type"]).get("json-type") for m in info["members"]} == {
        "id": "string", "type": None, "node-name": "string", "shutting-down": "boolean"}
    add = ref(by_name[(True, "block-export-add")]["arg-type"])
    assert add["tag"] == "type"
    assert "nbd" in {v["case"] for v in add["variants"]}


# --- blockdev-add -------------------------------------------------------------------------
def test_blockdev_add_errors(qmp, tmp_path, image):
    T = str(tmp_path)
    assert qmp.cmd("blockdev-add", file_node(image)) == {}
    assert qmp.cmd("object-add", {"qom-type": "iothread", "id": "io0"}) == {}
    cases = [
        (file_node(image), "Duplicate nodes with node-name='f'"),
        (file_node(tmp_path / "missing.img", "g"),
         f"Could not open '{T}/missing.img': No such file or directory"),
        ({"driver": "nosuch", "node-name": "g"}, "Parameter 'driver' does not accept value 'nosuch'"),
        ({"driver": "file", "node-name": "g", "filename": 5},
         "Invalid parameter type for 'filename', expected: string"),
        (file_node(image, "g", **{"read-only": "yes"}),
         "Invalid parameter type for 'read-only', expected: boolean"),
        ({"driver": "file", "node-name": "g"}, "Parameter 'filename' is missing"),
        ({"node-name": "g", "filename": str(image)}, "Parameter 'driver' is missing"),
        (file_node(image, "g", bogus=1), "Parameter 'bogus' is unexpected"),
        (file_node(image, "1g"), "Invalid node-name: '1g'"),
        ({"driver": "raw", "node-name": "r", "file": "nof"},
         "Cannot find device='nof' nor node-name='nof'"),
        ({"driver": "raw", "node-name": "r", "file": "f", "offset": "x"},
         "Invalid parameter type for 'offset', expected: integer"),
        ({"driver": "raw", "node-name": "r", "file": "f", "offset": 5 << 20},
         "Offset (5242880) cannot be greater than size of the containing file (4194304)"),
        ({"driver": "raw", "node-name": "r", "file": "f", "offset": 4096, "size": 1 << 30},
         "The sum of offset (4096) and size (1073741824) has to be smaller or equal to the "
         " actual size of the containing file (4194304)"),
        ({"driver": "null-co", "node-name": "n", "size": "big"},
         "Invalid parameter type for 'size', expected: integer"),
        # bdrv_open_common()'s order: force-share, file name, detect-zeroes, node name, then
        # the driver (pr-manager, open, aio); a format node's child is opened first
        (file_node(image, "f", **{"detect-zeroes": "unmap"}),
         "setting detect-zeroes to unmap is not allowed without setting discard operation "
         "to unmap"),
        ({"driver": "file", "node-name": "f", "filename": ""},
         "The 'file' block driver requires a file name"),
        ({"driver": "raw", "node-name": "f", "file": {"driver": "file", "filename": ""}},
         "The 'file' block driver requires a file name"),
        ({"driver": "raw", "node-name": "r", "file": "nof", "force-share": True},
         "Cannot find device='nof' nor node-name='nof'"),
        (file_node(image, "g", **{"pr-manager": "nopr"}),
         "No persistent reservation manager with id 'nopr'"),
        (file_node(image, "g", **{"pr-manager": "io0"}),
         "Object with id 'io0' is not a persistent reservation manager"),
        (file_node(tmp_path / "missing.img", "g", aio="native"),
         f"Could not open '{T}/missing.img': No such file or directory"),
        # an empty "cache": {} is not flattened away: an unknown option once the node is open
        ({"driver": "null-co", "node-name": "n", "cache": {}},
         "Block protocol 'null-co' doesn't support the option 'cache'"),
        ({"driver": "raw", "node-name": "r", "file": "f", "cache": {}},
         "Block format 'raw' does not support the option 'cache'"),
        ({"driver": "raw", "node-name": "f", "cache": {"direct": False},
          "file": {"driver": "null-co", "cache": {}}},
         "Block protocol 'null-co' doesn't support the option 'cache'"),
    ]
    for args, desc in cases:
        assert qmp.error("blockdev-add", args) == desc, args
    # nothing half-made was left behind
    assert [n["node-name"] for n in qmp.cmd("query-named-block-nodes")] == ["f"]


def _summary(node: dict) -> dict:
    """The keys of a query-named-block-nodes entry that matter to exports."""
    out = {k: node[k] for k in ("node-name", "drv", "ro", "file")}
    out["image"] = {k: node["image"].get(k) for k in ("filename", "format", "virtual-size")}
    out["dirty-bitmaps"] = node.get("dirty-bitmaps")
    return out


def test_query_named_block_nodes(qmp, tmp_path, image):
    ro = make_image(tmp_path / "ro.img", 1 << 20)
    qmp.cmd("blockdev-add", file_node(image))
    qmp.cmd("blockdev-add", {"driver": "raw", "node-name": "r", "file": "f",
                             "offset": 4096, "size": 65536})
    qmp.cmd("blockdev-add", {"driver": "raw", "node-name": "ro", "read-only": True,
                             "file": {"driver": "file", "filename": str(ro)}})
    qmp.cmd("blockdev-add", {"driver": "null-co", "node-name": "n", "size": 1 << 20})
    qmp.cmd("blockdev-add", {"driver": "null-co", "node-name": "n2"})
    nodes = qmp.cmd("query-named-block-nodes")
    assert qmp.cmd("query-named-block-nodes", {"flat": True}) == nodes
    implicit = nodes[3]["node-name"]
    assert implicit.startswith("#block")
    raw_json = ('json:{"offset": 4096, "driver": "raw", "size": 65536, '
                f'"file": {{"driver": "file", "filename": "{image}"}}}}')
    # newest first; the implicit file child of "ro" is listed right after it
    assert [_summary(n) for n in nodes] == [
        {"node-name": "n2", "drv": "null-co", "ro": False, "file": "null-co://",
         "image": {"filename": "null-co://", "format": "null-co", "virtual-size": 1 << 30},
         "dirty-bitmaps": None},
        {"node-name": "n", "drv": "null-co", "ro": False,
         "file": 'json:{"driver": "null-co", "size": 1048576}',
         "image": {"filename": 'json:{"driver": "null-co", "size": 1048576}',
                   "format": "null-co", "virtual-size": 1 << 20},
         "dirty-bitmaps": None},
        {"node-name": "ro", "drv": "raw", "ro": True, "file": str(ro),
         "image": {"filename": str(ro), "format": "raw", "virtual-size": 1 << 20},
         "dirty-bitmaps": None},
        {"node-name": implicit, "drv": "file", "ro": True, "file": str(ro),
         "image": {"filename": str(ro), "format": "file", "virtual-size": 1 << 20},
         "dirty-bitmaps": None},
        {"node-name": "r", "drv": "raw", "ro": False, "file": raw_json,
         "image": {"filename": raw_json, "format": "raw", "virtual-size": 65536},
         "dirty-bitmaps": None},
        {"node-name": "f", "drv": "file", "ro": False, "file": str(image),
         "image": {"filename": str(image), "format": "file", "virtual-size": 4 << 20},
         "dirty-bitmaps": None},
    ]
    for n in nodes:
        assert n["cache"] == {"direct": False, "no-flush": False, "writeback": True}
        assert n["detect_zeroes"] == "off" and n["encrypted"] is False


def test_blockdev_del(qmp, tmp_path, image):
    qmp.cmd("blockdev-add", file_node(image))
    qmp.cmd("blockdev-add", {"driver": "raw", "node-name": "r", "file": "f"})
    assert qmp.error("blockdev-del", {"node-name": "zz"}) == "Failed to find node with node-name='zz'"
    assert qmp.error("blockdev-del", {"node-name": "f"}) == "Block device f is in use"
    assert qmp.error("blockdev-del", {}) == "Parameter 'node-name' is missing"
    assert qmp.cmd("blockdev-del", {"node-name": "r"}) == {}
    assert qmp.cmd("blockdev-del", {"node-name": "f"}) == {}
    assert qmp.cmd("query-named-block-nodes") == []
    # the name is free again
    assert qmp.cmd("blockdev-add", file_node(image)) == {}


def test_blockdev_del_exported_node(qmp, tmp_path, image):
    qmp.cmd("blockdev-add", file_node(image))
    qmp.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": f"{tmp_path}/n.sock"}}})
    qmp.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "f"})
    assert qmp.error("blockdev-del", {"node-name": "f"}) == "Node f is in use"
    qmp.cmd("block-export-del", {"id": "e"})
    assert qmp.event("BLOCK_EXPORT_DELETED") == {"id": "e"}
    assert qmp.cmd("blockdev-del", {"node-name": "f"}) == {}


def test_block_graph_transcript(transcripts):
    """Same script, same answers: whole query-named-block-nodes output included."""
    def script(w):
        make_image(w / "disk.img")
        make_image(w / "ro.img", 1 << 20)
        return [
            ("blockdev-add", file_node(w / "disk.img")),
            ("blockdev-add", {"driver": "raw", "node-name": "r", "file": "f", "offset": 512}),
            ("blockdev-add", {"driver": "raw", "node-name": "ro", "read-only": True,
                              "file": {"driver": "file", "filename": str(w / "ro.img")}}),
            ("blockdev-add", {"driver": "null-co", "node-name": "n", "read-zeroes": True}),
            ("blockdev-add", {"driver": "raw", "node-name": "r", "file": "f"}),
            ("query-named-block-nodes", None),
            ("blockdev-del", {"node-name": "f"}),
            ("blockdev-del", {"node-name": "ro"}),
            ("query-named-block-nodes", {"flat": True}),
        ]
    t = transcripts(script)
    assert t[4] == {"cmd": "blockdev-add",
                    "error": {"class": "GenericError", "desc": "Duplicate nodes with node-name='r'"}}
    assert [n["node-name"] for n in t[5]["return"]] == ["n", "ro", "#blockN", "r", "f"]
    assert t[5]["return"][3]["image"]["virtual-size"] == 4 * 1024 * 1024 - 512
    assert [n["node-name"] for n in t[8]["return"]] == ["n", "r", "f"]
    transcripts.assert_same()


def test_stacked_nodes_transcript(transcripts):
    """Names and image info of raw nodes over null nodes and over other raw nodes: a raw
    node takes its child's plain name only from a protocol child (else json:{...}); raw
    reports its protocol child's actual-size and dirty-flag (null nodes have no dirty-flag)."""
    def script(w):
        make_image(w / "disk.img")
        return [
            ("blockdev-add", {"driver": "null-co", "node-name": "n"}),
            ("blockdev-add", {"driver": "raw", "node-name": "r1", "file": "n"}),
            ("blockdev-add", {"driver": "raw", "node-name": "r2",
                              "file": {"driver": "null-aio", "size": 4096}}),
            ("blockdev-add", {"driver": "raw", "node-name": "r3", "file": "r1"}),
            ("blockdev-add", {"driver": "raw", "node-name": "r4", "file": {
                "driver": "raw", "file": {"driver": "file", "filename": str(w / "disk.img")}}}),
            ("query-named-block-nodes", None),
        ]
    t = transcripts(script)
    names = {n["node-name"]: n["file"] for n in t[-1]["return"]}
    assert names["r1"] == "null-co://" and names["r3"].startswith("json:")
    transcripts.assert_same()
