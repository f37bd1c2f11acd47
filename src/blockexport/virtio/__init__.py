"""virtio devices' data structures as a sans-IO core (the virtio 1.x specification).

* :mod:`.memory` — :class:`~.memory.GuestMemory`: the frontend's memory regions (buffers the
  caller mapped) and address translation, guest-physical and frontend-virtual.
* :mod:`.ring` — :class:`~.ring.SplitQueue`: a split virtqueue served from the device side:
  descriptor chains (direct and indirect) out, used elements in, notification suppression
  both ways (``VIRTIO_F_EVENT_IDX`` or the flags).
* :mod:`.blk` — virtio-blk: feature bits, request types and statuses, the request header and
  discard/write-zeroes segments, the config space layout.

No syscalls and no threads here; the vhost-user-blk export (``exports/vhost_user_blk.py``)
maps the memory, waits on the eventfds and does the I/O.  Malformed rings raise
:class:`~.errors.VirtioError`.
"""
