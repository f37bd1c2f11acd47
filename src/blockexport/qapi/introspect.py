"""``query-qmp-schema``: the schema as a list of QAPI ``SchemaInfo`` objects.

The shape follows QEMU 7.2: every command and event in definition order, then every type they
reach, in order of first use.  Type names are masked with numbers as QEMU does (clients must
not depend on them); builtin names stay (every integer type is ``int``); arrays are named
``[element]`` and come just before their element type.  A command without arguments or return
value uses the empty object type.  Optional members carry ``"default": null``; enum values
appear both as ``values`` and as ``members``; union variants list every tag value (values
without a branch come last and point to the empty object, as QEMU's implicit empty
branches do).
"""

from __future__ import annotations

_INT_TYPES = {"int", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
              "size"}
_JSON_TYPES = {"str": "string", "int": "int", "number": "number", "bool": "boolean",
               "null": "null", "any": "value"}


class _Introspector:
    def __init__(self, schema):
        self.schema = schema
        self.names: dict[str, str] = {}
        self.used: list = []
        self.counter = 0

    def use(self, type_name: str) -> str:
        t = self.schema.type(type_name)
        if t.kind == "builtin":
            name = "int" if t.name in _INT_TYPES else t.name
            key = "builtin:" + name
            if key not in self.names:
                self.names[key] = name
                self.used.append(("builtin", name))
            return name
        if t.kind == "array":
            name = "[" + self.use(t.element) + "]"
            if t.name not in self.names:
                self.names[t.name] = name
                self.used.append(("array", t))
            return name
        if t.name not in self.names:
            self.names[t.name] = str(self.counter)
            self.counter += 1
            self.used.append(("type", t))
        return self.names[t.name]

    def member(self, m) -> dict:
        out = {"name": m.name, "type": self.use(m.type)}
        if m.optional:
            out["default"] = None
        if m.features:
            out["features"] = list(m.features)
        return out

    def entity(self, kind, t) -> dict:
        if kind == "builtin":
            return {"name": t, "meta-type": "builtin", "json-type": _JSON_TYPES[t]}
        name = self.names[t.name]
        if kind == "array":
            return {"name": name, "meta-type": "array",
                    "element-type": self.use(t.element)}
        out: dict = {"name": name}
        if t.kind == "enum":
            out["meta-type"] = "enum"
            out["members"] = [dict(name=v, **({"features": list(f)} if f else {}))
                              for v, f in t.values]
            out["values"] = [v for v, _ in t.values]
        elif t.kind == "alternate":
            out["meta-type"] = "alternate"
            out["members"] = [{"type": self.use(b)} for b in t.branches.values()]
        else:
            out["meta-type"] = "object"
            out["members"] = [self.member(m) for m in t.members]
            if t.kind == "union":
                out["tag"] = t.discriminator
                tag_type = self.schema.type(t.member(t.discriminator).type)
                cases = list(t.branches) + [v for v, _ in tag_type.values
                                            if v not in t.branches]
                out["variants"] = [{"case": v, "type": self.use(t.branches.get(v, "q_empty"))}
                                   for v in cases]
        if t.features:
            out["features"] = list(t.features)
        return out

    def run(self) -> list:
        out = []
        for kind, name in self.schema.order:
            if kind == "command":
                c = self.schema.commands[name]
                e = {"name": name, "meta-type": "command",
                     "arg-type": self.use(c.arg_type or "q_empty"),
                     "ret-type": self.use(c.ret_type or "q_empty")}
                if c.allow_oob:
                    e["allow-oob"] = True
            elif kind == "event":
                c = self.schema.events[name]
                e = {"name": name, "meta-type": "event",
                     "arg-type": self.use(c.arg_type or "q_empty")}
            else:
                continue
            if c.features:
                e["features"] = list(c.features)
            out.append(e)
        i = 0
        while i < len(self.used):       # grows while entities reference more types
            kind, t = self.used[i]
            out.append(self.entity(kind, t))
            i += 1
        return out


def introspect(schema) -> list:
    """The SchemaInfo list of ``schema`` (a fresh list each call; cheap enough)."""
    cache = getattr(schema, "_introspection", None)
    if cache is None:
        cache = _Introspector(schema).run()
        schema._introspection = cache
    import copy
    return copy.deepcopy(cache)
