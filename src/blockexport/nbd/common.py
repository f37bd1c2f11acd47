"""What the sans-IO server and client machines share (neither imports the other)."""
from __future__ import annotations

#: QEMU's text for a peer that hung up in the middle of a message.
EOF_MESSAGE = "Unexpected end-of-file before all data were read"


class _Sentinel:
    def __init__(self, name: str):
        self._name = name

    def __repr__(self) -> str:
        return self._name


#: Returned by ``next_event()`` when the machine needs more bytes (``receive_data``).
NEED_DATA = _Sentinel("NEED_DATA")
