"""The vhost-user protocol (QEMU's ``docs/interop/vhost-user.rst``), backend side, as a sans-IO
core: message bytes and passed file descriptors in, frozen events and reply bytes out.

* :mod:`.wire` — the message header and payload structs, and :class:`~.wire.Decoder`, which
  frames a byte stream into :class:`~.wire.Message` values (``NEED_DATA`` until one is whole).
* :mod:`.backend` — :class:`~.backend.Backend`, the backend's state machine: feature and
  protocol-feature negotiation, vring configuration, memory tables, config space requests.
  It owns no socket, no thread and no mapping: the export (``exports/vhost_user_blk.py``)
  acts on its events (maps the memory, starts and stops queue workers) and sends its replies.

Everything a peer can get wrong raises :class:`~.errors.VhostUserProtocolError`; the export
then drops that frontend's connection and waits for the next one.
"""
