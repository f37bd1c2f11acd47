"""The ``iothread`` and ``secret`` object types.

``iothread`` is accepted for compatibility: each NBD connection already has its own threads,
so an export's ``iothread`` only has to name an existing object.  ``secret`` holds a password
or key (``data`` inline or read from ``file``; ``format`` raw or base64) for other objects.
"""
from __future__ import annotations

import base64

from ..errors import Error


_INT64_MAX = (1 << 63) - 1


class IOThread:
    def __init__(self, object_id: str, props: dict, objects=None):
        for key in ("poll-max-ns", "poll-grow", "poll-shrink", "aio-max-batch"):
            value = props.get(key)
            if value is not None and not 0 <= value <= _INT64_MAX:
                raise Error("%s value must be in range [0, %d]" % (key, _INT64_MAX))
        self.id = object_id
        self.props = dict(props)
        self.users = 0


class Secret:
    def __init__(self, object_id: str, props: dict, objects=None):
        self.id = object_id
        self.users = 0
        data = props.get("data")
        path = props.get("file")
        if data is None and path is None:
            raise Error("Either 'file' or 'data' must be provided")
        if data is not None and path is not None:
            raise Error("'data' and 'file' are mutually exclusive")
        if path is not None:
            try:
                with open(path, "rb") as f:
                    raw = f.read()
            except OSError as exc:   # GLib's wording, as QEMU reads the file with it
                raise Error("Unable to read %s: Failed to open file \u201c%s\u201d: %s"
                            % (path, path, exc.strerror))
        else:
            raw = data.encode()
        if props.get("format", "raw") == "base64":
            try:
                raw = base64.b64decode(raw, validate=True)
            except ValueError:
                raise Error("Invalid base64 data")
        keyid = props.get("keyid")
        if keyid is not None:
            if objects is None or getattr(objects.get(keyid), "qom_type", None) != "secret":
                raise Error("No secret with id '%s'" % keyid)
            raise Error("Encrypted secrets are not supported by blockexport yet")
        self.value = raw
