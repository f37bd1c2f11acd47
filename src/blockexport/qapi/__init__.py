"""The QAPI schema as the single source of truth (QEMU's ``qapi/``).

* ``schema/*.json`` — the schema files (QAPI syntax) for everything we serve;
* :mod:`~blockexport.qapi.schema` — the loader and the model (``default_schema()``);
* :mod:`~blockexport.qapi.visitor` — QEMU 7.2's input visitor: JSON and keyval input checked
  and converted with QEMU's messages;
* :mod:`~blockexport.qapi.qemu_opts` — block options from the older QemuOpts syntax, typed by
  the schema;
* :mod:`~blockexport.qapi.introspect` — ``query-qmp-schema``.

This layer sits right above :mod:`blockexport.util`; the block layer, the exports and the
monitor all use it, and it uses none of them.
"""
