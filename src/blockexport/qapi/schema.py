"""The QAPI schema: a loader for ``qapi/schema/*.json`` and the model it builds.

The schema files use QEMU's QAPI syntax (single-quoted strings, ``#`` comments, ``##`` doc
blocks before each definition), which is not JSON; :func:`parse_qapi` reads it.  The model is
what the rest of the project needs from the schema:

* :class:`Schema` ``commands`` / ``events`` / ``types`` by name;
* :meth:`Schema.check_command_args` and :meth:`Schema.check_type` — the QAPI input visitor
  (:mod:`blockexport.qapi.visitor`): QEMU 7.2's exact error messages, JSON or keyval input;
* :meth:`Schema.introspect` (``query-qmp-schema``, :mod:`blockexport.qapi.introspect`) and
  :meth:`Schema.query_commands`.

``default_schema()`` loads the package's own files once.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import textwrap
from importlib import resources

from blockexport.errors import Error

#: QAPI builtin type name -> JSON type reported by introspection.
BUILTINS = {
    "str": "string", "number": "number", "int": "int", "int8": "int", "int16": "int",
    "int32": "int", "int64": "int", "uint8": "int", "uint16": "int", "uint32": "int",
    "uint64": "int", "size": "int", "bool": "boolean", "null": "null", "any": "value",
}

#: The schema files, in the order QEMU's storage daemon schema includes them.
FILES = ("common.json", "sockets.json", "block-core.json", "block-export.json", "qom.json",
         "control.json", "introspect.json")


class SchemaError(Exception):
    """A bug in a schema file (raised when loading, never at run time)."""


# ---- the model ------------------------------------------------------------------------------

@dataclasses.dataclass
class Doc:
    """A parsed ``##`` block: the free text, one text per member, and named sections."""
    symbol: str = ""
    body: str = ""
    members: dict = dataclasses.field(default_factory=dict)
    sections: list = dataclasses.field(default_factory=list)   # [(title, text)]

    def section(self, title: str) -> str | None:
        for t, text in self.sections:
            if t == title:
                return text
        return None


@dataclasses.dataclass
class Member:
    name: str
    type: str                     # a type name; "[T]" for arrays
    optional: bool = False
    features: tuple = ()


@dataclasses.dataclass
class TypeDef:
    name: str
    kind: str                     # builtin, enum, struct, union, alternate, array
    doc: Doc | None = None
    features: tuple = ()
    values: tuple = ()            # enum: ((name, features), ...)
    base: str | None = None       # struct/union
    own_members: tuple = ()       # struct/union: members declared here (not the base's)
    discriminator: str | None = None
    branches: dict = dataclasses.field(default_factory=dict)   # union: value -> type;
    #                                                           alternate: name -> type
    element: str | None = None    # array
    implicit: bool = False
    file: str = ""
    members: tuple = ()           # filled by Schema._resolve(): base members + own members

    def member(self, name: str) -> Member | None:
        for m in self.members:
            if m.name == name:
                return m
        return None


@dataclasses.dataclass
class CommandDef:
    name: str
    arg_type: str | None
    boxed: bool = False
    ret_type: str | None = None
    allow_preconfig: bool = False
    allow_oob: bool = False
    success_response: bool = True
    features: tuple = ()
    doc: Doc | None = None
    file: str = ""


@dataclasses.dataclass
class EventDef:
    name: str
    arg_type: str | None
    boxed: bool = False
    features: tuple = ()
    doc: Doc | None = None
    file: str = ""


# ---- QAPI syntax ----------------------------------------------------------------------------

_TOKEN = re.compile(r"""\s+|'(?:[^'\\\n]|\\.)*'|[{}\[\]:,]|true\b|false\b|\#[^\n]*""")


def parse_qapi(text: str, filename: str = "<schema>"):
    """Parse QAPI-syntax text into ``[(expr, doc_text or None), ...]``.

    ``doc_text`` is the ``##`` block immediately before the expression (its lines without the
    leading ``#``), as QEMU's parser attaches it.
    """
    pos = 0
    tokens = []            # (kind, value, line)
    doc_lines: list | None = None
    pending_doc = None
    line = 1
    n = len(text)
    while pos < n:
        m = _TOKEN.match(text, pos)
        if not m:
            raise SchemaError(f"{filename}:{line}: stray {text[pos]!r}")
        tok = m.group(0)
        start_of_line = pos == 0 or text[pos - 1] == "\n"
        pos = m.end()
        if tok[0].isspace():
            line += tok.count("\n")
            continue
        if tok[0] == "#":
            if tok == "##" and start_of_line:
                if doc_lines is None:
                    doc_lines = []
                else:
                    if doc_lines and doc_lines[0].startswith("= "):
                        tokens.append(("heading", doc_lines[0][2:].strip(), line, None))
                    else:
                        pending_doc = "\n".join(doc_lines)
                    doc_lines = None
            elif doc_lines is not None:
                if not start_of_line:
                    raise SchemaError(f"{filename}:{line}: comment inside a doc block")
                doc_lines.append(tok[2:] if tok.startswith("# ") else tok[1:])
            continue
        if doc_lines is not None:
            raise SchemaError(f"{filename}:{line}: unterminated doc block")
        if tok[0] == "'":
            value = tok[1:-1]
            if "\\" in value:
                raise SchemaError(f"{filename}:{line}: escapes are not supported")
            tokens.append(("str", value, line, None))
        elif tok in ("true", "false"):
            tokens.append(("lit", tok == "true", line, None))
        else:
            tokens.append(("punct", tok, line, pending_doc if tok == "{" else None))
            if tok == "{":
                pending_doc = None
    exprs = []
    i = 0

    def value(i):
        kind, v, ln, _ = tokens[i]
        if kind != "punct":
            return v, i + 1
        if v == "{":
            out = {}
            i += 1
            if tokens[i][1] == "}" and tokens[i][0] == "punct":
                return out, i + 1
            while True:
                if tokens[i][0] != "str":
                    raise SchemaError(f"{filename}:{tokens[i][2]}: expected a key")
                key = tokens[i][1]
                if key in out:
                    raise SchemaError(f"{filename}:{tokens[i][2]}: duplicate key {key!r}")
                if tokens[i + 1][1] != ":":
                    raise SchemaError(f"{filename}:{tokens[i][2]}: expected ':'")
                out[key], i = value(i + 2)
                if tokens[i][1] == "}":
                    return out, i + 1
                if tokens[i][1] != ",":
                    raise SchemaError(f"{filename}:{tokens[i][2]}: expected ',' or '}}'")
                i += 1
        if v == "[":
            out = []
            i += 1
            if tokens[i][1] == "]" and tokens[i][0] == "punct":
                return out, i + 1
            while True:
                item, i = value(i)
                out.append(item)
                if tokens[i][1] == "]":
                    return out, i + 1
                if tokens[i][1] != ",":
                    raise SchemaError(f"{filename}:{tokens[i][2]}: expected ',' or ']'")
                i += 1
        raise SchemaError(f"{filename}:{ln}: unexpected {v!r}")

    while i < len(tokens):
        if tokens[i][0] == "heading":
            exprs.append(({"heading": tokens[i][1]}, None))
            i += 1
            continue
        if tokens[i][1] != "{":
            raise SchemaError(f"{filename}:{tokens[i][2]}: expected '{{'")
        doc = tokens[i][3]
        expr, i = value(i)
        exprs.append((expr, doc))
    return exprs


_SECTION = re.compile(r"^(Returns|Errors|Since|Notes?|Examples?|Features|Default):\s*(.*)$")
_MEMBER = re.compile(r"^@([\w.-]+):\s*(.*)$")


def parse_doc(text: str | None) -> Doc | None:
    """Split a doc block into symbol, body, member texts and sections."""
    if text is None:
        return None
    lines = text.split("\n")
    doc = Doc()
    m = re.match(r"^@([\w-]+):\s*$", lines[0]) if lines else None
    if m:
        doc.symbol = m.group(1)
        lines = lines[1:]
    body: list = []
    members: dict = {}
    sections: list = []
    cur = body
    for ln in lines:
        ms = _SECTION.match(ln)
        mm = _MEMBER.match(ln)
        if ms:
            cur = [ms.group(2)] if ms.group(2) else []
            sections.append((ms.group(1), cur))
        elif mm and not sections:
            cur = [mm.group(2)]
            members[mm.group(1)] = cur
        elif cur is body or any(cur is s[1] for s in sections):
            cur.append(ln)
        else:
            cur.append(ln.strip())
    doc.body = "\n".join(body).strip()
    doc.members = {k: " ".join(x for x in v if x).strip() for k, v in members.items()}
    doc.sections = [(t, textwrap.dedent("\n".join(v)).strip()) for t, v in sections]
    return doc


# ---- building the model ---------------------------------------------------------------------

def _type_ref(t, where: str) -> str:
    if isinstance(t, list):
        if len(t) != 1 or not isinstance(t[0], str):
            raise SchemaError(f"{where}: an array type is ['T']")
        return f"[{t[0]}]"
    if not isinstance(t, str):
        raise SchemaError(f"{where}: expected a type name")
    return t


def _features(f) -> tuple:
    out = []
    for x in f or ():
        out.append(x if isinstance(x, str) else x["name"])
    return tuple(out)


def _members(data: dict, where: str) -> tuple:
    out = []
    for key, spec in data.items():
        optional = key.startswith("*")
        name = key[1:] if optional else key
        features = ()
        if isinstance(spec, dict):
            features = _features(spec.get("features"))
            spec = spec["type"]
        out.append(Member(name, _type_ref(spec, f"{where}.{name}"), optional, features))
    return tuple(out)


class Schema:
    """A loaded QAPI schema.  Build it with :meth:`from_texts` or :func:`default_schema`."""

    def __init__(self):
        self.types: dict[str, TypeDef] = {}
        self.commands: dict[str, CommandDef] = {}
        self.events: dict[str, EventDef] = {}
        self.order: list = []             # ("command"|"event"|"type", name) in file order
        for name in BUILTINS:
            self.types[name] = TypeDef(name, "builtin")
        self.types["q_empty"] = TypeDef("q_empty", "struct", implicit=True)

    @classmethod
    def from_texts(cls, texts) -> "Schema":
        """``texts``: iterable of ``(filename, text)``."""
        s = cls()
        for filename, text in texts:
            for expr, doc in parse_qapi(text, filename):
                s._add(expr, parse_doc(doc), filename)
        s._resolve()
        return s

    # -- definitions --

    def _add_type(self, t: TypeDef) -> None:
        if t.name in self.types:
            raise SchemaError(f"{t.file}: '{t.name}' is defined twice")
        self.types[t.name] = t
        if not t.implicit:
            self.order.append(("type", t.name))

    def _implicit_struct(self, name: str, data: dict, filename: str) -> str:
        self._add_type(TypeDef(name, "struct", own_members=_members(data, name),
                               implicit=True, file=filename))
        return name

    def _add(self, expr: dict, doc: Doc | None, filename: str) -> None:
        if "include" in expr or "pragma" in expr:
            return
        if "heading" in expr:
            self.order.append(("heading", expr["heading"]))
            return
        features = _features(expr.get("features"))
        if "enum" in expr:
            values = tuple((v, ()) if isinstance(v, str)
                           else (v["name"], _features(v.get("features")))
                           for v in expr["data"])
            self._add_type(TypeDef(expr["enum"], "enum", doc, features, values=values,
                                   file=filename))
        elif "struct" in expr:
            self._add_type(TypeDef(expr["struct"], "struct", doc, features,
                                   base=expr.get("base"),
                                   own_members=_members(expr.get("data", {}), expr["struct"]),
                                   file=filename))
        elif "union" in expr:
            name = expr["union"]
            base = expr["base"]
            if isinstance(base, dict):
                base = self._implicit_struct(f"q_obj_{name}-base", base, filename)
            branches = {k: (v if isinstance(v, str) else v["type"])
                        for k, v in expr["data"].items()}
            self._add_type(TypeDef(name, "union", doc, features, base=base,
                                   discriminator=expr["discriminator"], branches=branches,
                                   file=filename))
        elif "alternate" in expr:
            branches = {k: _type_ref(v if not isinstance(v, dict) else v["type"], expr["alternate"])
                        for k, v in expr["data"].items()}
            self._add_type(TypeDef(expr["alternate"], "alternate", doc, features,
                                   branches=branches, file=filename))
        elif "command" in expr or "event" in expr:
            is_cmd = "command" in expr
            name = expr["command"] if is_cmd else expr["event"]
            data = expr.get("data")
            if isinstance(data, dict):
                data = self._implicit_struct(f"q_obj_{name}-arg", data, filename) if data \
                    else None
            if is_cmd:
                ret = expr.get("returns")
                self.commands[name] = CommandDef(
                    name, data, bool(expr.get("boxed")),
                    _type_ref(ret, name) if ret is not None else None,
                    bool(expr.get("allow-preconfig")), bool(expr.get("allow-oob")),
                    expr.get("success-response", True), features, doc, filename)
            else:
                self.events[name] = EventDef(name, data, bool(expr.get("boxed")), features,
                                             doc, filename)
            self.order.append(("command" if is_cmd else "event", name))
        else:
            raise SchemaError(f"{filename}: unknown definition {sorted(expr)}")

    def _lookup(self, name: str, where: str) -> TypeDef:
        if name.startswith("["):
            elem = name[1:-1]
            self._lookup(elem, where)
            if name not in self.types:
                self.types[name] = TypeDef(name, "array", element=elem, implicit=True)
            return self.types[name]
        t = self.types.get(name)
        if t is None:
            raise SchemaError(f"{where}: unknown type '{name}'")
        return t

    def _resolve(self) -> None:
        done: set = set()
        for t in list(self.types.values()):
            if t.kind in ("struct", "union"):
                self._resolve_one(t, done, ())
        for t in list(self.types.values()):
            for m in t.members:
                self._lookup(m.type, f"{t.name}.{m.name}")
            if t.kind == "union":
                tag = t.member(t.discriminator)
                if tag is None or tag.optional:
                    raise SchemaError(f"{t.name}: bad discriminator")
                enum = self._lookup(tag.type, t.name)
                if enum.kind != "enum":
                    raise SchemaError(f"{t.name}: discriminator '{t.discriminator}' is not an "
                                      "enum")
                names = {v for v, _ in enum.values}
                for value, branch in t.branches.items():
                    if value not in names:
                        raise SchemaError(f"{t.name}: '{value}' is not in {enum.name}")
                    if self._lookup(branch, t.name).kind != "struct":
                        raise SchemaError(f"{t.name}: branch '{value}' is not a struct")
            elif t.kind == "alternate":
                for b in t.branches.values():
                    self._lookup(b, t.name)
        for c in list(self.commands.values()) + list(self.events.values()):
            if c.arg_type:
                self._lookup(c.arg_type, c.name)
            if getattr(c, "ret_type", None):
                self._lookup(c.ret_type, c.name)

    def _resolve_one(self, t: TypeDef, done: set, stack: tuple) -> tuple:
        """``t.members``: its base's members (recursively), then its own."""
        if t.name in done:
            return t.members
        if t.name in stack:
            raise SchemaError(f"{t.name}: base loop")
        members = ()
        if t.base:
            base = self._lookup(t.base, t.name)
            if base.kind != "struct":
                raise SchemaError(f"{t.name}: base '{t.base}' is not a struct")
            members = self._resolve_one(base, done, stack + (t.name,))
        t.members = members + tuple(t.own_members)
        names = [m.name for m in t.members]
        if len(set(names)) != len(names):
            raise SchemaError(f"{t.name}: a member name is used twice (with its base)")
        done.add(t.name)
        return t.members

    # -- the interface --

    def type(self, name: str) -> TypeDef:
        return self._lookup(name, "lookup")

    def check_type(self, type_name: str, value, *, path: str = "", keyval: bool = False,
                   extra_branch=None):
        """Visit ``value`` as ``type_name`` (QEMU's QObject input visitor): raise QEMU's
        error, or return the value with keyval strings converted to the schema's types.

        ``path`` names ``value`` itself in messages (e.g. ``"file"``: "Parameter
        'file.driver' is missing").  ``extra_branch(union_name, tag)`` may supply a struct
        (:meth:`make_struct`) for a union tag value the schema has no branch for (block
        drivers registered at run time)."""
        from blockexport.qapi.visitor import Visitor
        return Visitor(self, keyval, extra_branch).visit(self.type(type_name), value, path)

    def make_struct(self, name: str, data: dict) -> TypeDef:
        """A struct type from QAPI member syntax (``{'dir': 'str', '*opt': 'int'}``), not
        added to the schema (its member types must exist)."""
        t = TypeDef(name, "struct", own_members=_members(data, name), implicit=True)
        t.members = t.own_members
        for m in t.members:
            self._lookup(m.type, f"{name}.{m.name}")
        return t

    def check_command_args(self, name: str, arguments, *, keyval: bool = False) -> dict:
        """Check the ``arguments`` of command ``name``; returns the (converted) arguments."""
        cmd = self.commands.get(name)
        if cmd is None:
            raise Error(f"The command {name} has not been found", "CommandNotFound")
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise Error("QMP input member 'arguments' must be an object")
        if cmd.arg_type is None:
            for key in arguments:
                raise Error(f"Parameter '{key}' is unexpected")
            return {}
        return self.check_type(cmd.arg_type, arguments, keyval=keyval)

    def introspect(self) -> list:
        """The return value of ``query-qmp-schema`` (type names masked, as QEMU does)."""
        from blockexport.qapi.introspect import introspect
        return introspect(self)

    def query_commands(self) -> list:
        """The return value of ``query-commands``: newest definition first, as QEMU."""
        return [{"name": name} for kind, name in reversed(self.order) if kind == "command"]


def load_files(names=FILES) -> Schema:
    pkg = resources.files("blockexport.qapi") / "schema"
    return Schema.from_texts((n, (pkg / n).read_text(encoding="utf-8")) for n in names)


@functools.lru_cache(maxsize=1)
def default_schema() -> Schema:
    """The package's schema, loaded once."""
    return load_files()
