"""User-creatable objects (``--object`` / ``object-add``): the type table and the registry.

A type is a class taking ``(object_id, props, objects)`` — props already checked against
the QAPI schema's ``ObjectOptions`` branch, ``objects`` this table (for references to other
objects) — with an optional ``close()`` and an optional static ``set_properties(props)``
raising what QEMU's property setters raise (checked before the duplicate-id check; the
constructor raises what QEMU's ``complete`` raises).  ``iothread`` and ``secret`` are in
``simple.py``, the TLS credentials in ``tls.py``, the authorization types in ``authz.py``.
"""
from __future__ import annotations

import importlib

from blockexport.errors import Error
from blockexport.util.ids import id_wellformed

#: qom-type -> (module, class)
OBJECT_TYPES: dict[str, tuple[str, str]] = {
    "iothread": ("blockexport.objects.simple", "IOThread"),
    "secret": ("blockexport.objects.simple", "Secret"),
    "tls-creds-x509": ("blockexport.objects.tls", "TlsCredsX509"),
    "tls-creds-psk": ("blockexport.objects.tls", "TlsCredsPsk"),
    "tls-creds-anon": ("blockexport.objects.tls", "TlsCredsAnon"),
    "authz-simple": ("blockexport.objects.authz", "AuthzSimple"),
    "authz-list": ("blockexport.objects.authz", "AuthzList"),
    "authz-listfile": ("blockexport.objects.authz", "AuthzListFile"),
    "authz-pam": ("blockexport.objects.authz", "AuthzPam"),
}


class ObjectTable:
    def __init__(self):
        self._objects: dict[str, object] = {}

    def get(self, object_id: str):
        return self._objects.get(object_id)

    def of_type(self, qom_type: str) -> list:
        return [o for o in self._objects.values() if getattr(o, "qom_type", None) == qom_type]

    def find_iothread(self, name: str):
        """The iothread an export or node names, or QEMU's error.  As QEMU resolves the id as
        a partial QOM path, ``""`` finds the only iothread."""
        obj = self.get(name)
        if name == "":
            threads = self.of_type("iothread")
            obj = threads[0] if len(threads) == 1 else None
        if obj is None or getattr(obj, "qom_type", None) != "iothread":
            raise Error('iothread "%s" not found' % name)
        return obj

    def add(self, options: dict):
        qom_type = options["qom-type"]
        object_id = options["id"]
        entry = OBJECT_TYPES.get(qom_type)
        if entry is None:
            raise Error("Object type '%s' is not supported by blockexport yet" % qom_type)
        if not id_wellformed(object_id):
            raise Error("Parameter 'id' expects an identifier")
        cls = getattr(importlib.import_module(entry[0]), entry[1])
        props = {k: v for k, v in options.items() if k not in ("qom-type", "id")}
        # QEMU sets the properties (their setters' errors first), then adds the object to
        # the tree (duplicate ids), then completes it (the class's constructor here).
        set_properties = getattr(cls, "set_properties", None)
        if set_properties is not None:
            set_properties(props)
        if object_id in self._objects:
            raise Error("attempt to add duplicate property '%s' to object (type 'container')"
                        % object_id)
        obj = cls(object_id, props, self)
        obj.qom_type = qom_type
        self._objects[object_id] = obj
        return obj

    def delete(self, object_id: str) -> None:
        obj = self._objects.get(object_id)
        if obj is None:
            raise Error("object '%s' not found" % object_id)
        if getattr(obj, "users", 0):
            raise Error("object '%s' is in use, can not be deleted" % object_id)
        del self._objects[object_id]
        close = getattr(obj, "close", None)
        if close is not None:
            close()

    def close(self) -> None:
        for object_id in list(self._objects):
            obj = self._objects.pop(object_id)
            close = getattr(obj, "close", None)
            if close is not None:
                close()
