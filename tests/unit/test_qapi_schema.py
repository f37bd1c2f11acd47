"""The QAPI schema files, their loader and the generated QMP reference."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from blockexport.qapi import schema as schema_mod
from blockexport.qapi.schema import (FILES, Schema, SchemaError, default_schema, parse_doc,
                                    parse_qapi)

ROOT = Path(__file__).resolve().parents[2]


def test_parse_qapi_syntax():
    text = """# a comment
##
# @Thing:
#
# A thing.
#
# @a: first
#     continued
#
# @b: second.  Default 3.
#
# Since: 1.0
##
{ 'struct': 'Thing', # trailing comment
  'data': { 'a': 'str', '*b': ['int'], 'c': { 'type': 'bool', 'features': ['x'] } },
  'if': true }
{ 'enum': 'E', 'data': [] }
"""
    (expr, doc), (expr2, doc2) = parse_qapi(text)
    assert expr == {"struct": "Thing", "data": {"a": "str", "*b": ["int"],
                                                "c": {"type": "bool", "features": ["x"]}},
                    "if": True}
    assert expr2 == {"enum": "E", "data": []} and doc2 is None
    d = parse_doc(doc)
    assert d.symbol == "Thing" and d.body == "A thing."
    assert d.members == {"a": "first continued", "b": "second.  Default 3."}
    assert d.sections == [("Since", "1.0")]


@pytest.mark.parametrize("text, message", [
    ("{ 'struct': 'A', 'data': { 'x': 'Nope' } }", "unknown type 'Nope'"),
    ("{ 'enum': 'A', 'data': [] }\n{ 'enum': 'A', 'data': [] }", "defined twice"),
    ("{ 'struct': 'A', 'data': { 'x': 'str', 'x': 'int' } }", "duplicate key"),
    ("{ 'union': 'U', 'base': { 'k': 'str' }, 'discriminator': 'k', 'data': {} }",
     "is not an enum"),
    ("{ 'enum': 'E', 'data': ['a'] }\n{ 'union': 'U', 'base': { 'k': 'E' }, "
     "'discriminator': 'k', 'data': { 'b': 'E' } }", "'b' is not in E"),
    ("{ 'union': 'U', 'base': { '*k': 'str' }, 'discriminator': 'k', 'data': {} }",
     "bad discriminator"),
    ("{ 'struct': 'A', 'data': { 'x': \"str\" } }", "stray"),
    ("{ 'frob': 'A' }", "unknown definition"),
    ("##\n# @A:\n{ 'enum': 'A', 'data': [] }", "unterminated doc block"),
])
def test_schema_errors(text, message):
    with pytest.raises(SchemaError, match=message):
        Schema.from_texts([("t.json", text)])


def test_model():
    s = default_schema()
    assert default_schema() is s
    bea = s.commands["block-export-add"]
    assert (bea.arg_type, bea.boxed, bea.ret_type, bea.allow_preconfig) == \
        ("BlockExportOptions", True, None, True)
    start = s.commands["nbd-server-start"]
    assert start.arg_type == "q_obj_nbd-server-start-arg" and not start.boxed
    assert [(m.name, m.type, m.optional) for m in s.type(start.arg_type).members] == [
        ("addr", "SocketAddressLegacy", False), ("handshake-max-seconds", "uint32", True),
        ("tls-creds", "str", True),
        ("tls-authz", "str", True), ("max-connections", "uint32", True)]
    assert s.commands["query-block-exports"].ret_type == "[BlockExportInfo]"
    assert s.commands["nbd-server-stop"].arg_type is None
    assert s.commands["nbd-server-add"].features == ("deprecated",)
    assert s.events["BLOCK_EXPORT_DELETED"].arg_type == "q_obj_BLOCK_EXPORT_DELETED-arg"
    opts = s.type("BlockExportOptions")
    assert opts.kind == "union" and opts.discriminator == "type"
    assert [m.name for m in opts.members][:2] == ["type", "id"]
    assert [m.name for m in s.type("BlockExportOptionsNbd").members] == \
        ["name", "description", "bitmaps", "allocation-depth"]
    assert s.type("BlockDirtyBitmapOrStr").branches == {"local": "str",
                                                        "external": "BlockDirtyBitmap"}
    assert "qcow2" in {v for v, _ in s.type("BlockdevDriver").values}
    assert set(s.type("BlockdevOptions").branches) == \
        {"blkdebug", "file", "host_device", "raw", "qcow2", "null-co", "null-aio"}
    assert s.commands["blockdev-del"].doc.members == {"node-name": "the node to close"}


def test_package_data_is_installed():
    from importlib import resources
    pkg = resources.files("blockexport.qapi") / "schema"
    assert sorted(p.name for p in pkg.iterdir() if p.name.endswith(".json")) == sorted(FILES)


def test_everything_is_documented():
    s = default_schema()
    for name, c in list(s.commands.items()) + list(s.events.items()):
        assert c.doc is not None and c.doc.symbol == name and c.doc.body, name
        if c.arg_type and s.type(c.arg_type).implicit:
            for m in s.type(c.arg_type).members:
                assert m.name in c.doc.members, (name, m.name)
    for t in s.types.values():
        if t.implicit or t.kind in ("builtin", "array"):
            continue
        assert t.doc is not None and t.doc.symbol == t.name, t.name
        names = [v for v, _ in t.values] if t.kind == "enum" else \
            list(t.branches) if t.kind == "alternate" else [m.name for m in t.own_members]
        if t.kind == "union" and s.type(t.base).implicit:
            names = [m.name for m in t.members]
        if t.kind == "enum" and t.name in ("BlockdevDriver", "ObjectType"):
            continue  # described as a whole
        for n in names:
            assert n in t.doc.members, (t.name, n)


def test_qmp_reference_is_up_to_date():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen-qmp-doc"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_qmp_reference_content(tmp_path):
    out = tmp_path / "ref.md"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen-qmp-doc"), "-o", str(out)],
                   check=True)
    text = out.read_text()
    for name in default_schema().commands:
        assert f"### `{name}`" in text
    assert "### `BLOCK_EXPORT_DELETED`" in text
    assert "| `max-connections` | `uint32` | yes | 0 |" in text
    assert '- "NBD server not running"' in text
    assert schema_mod.__doc__  # the loader documents itself
