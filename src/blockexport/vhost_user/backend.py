"""The vhost-user backend's state machine (sans-IO).

:meth:`Backend.handle` takes one :class:`~blockexport.vhost_user.wire.Message` and returns a
tuple of frozen events for the export to act on, in order.  :class:`Reply` carries bytes to
send now; the other events ask the export to do what only it can (map memory, run or stop a
queue worker, keep an eventfd, apply a config write).  Two requests need the export's answer
before their reply exists:

* ``GET_VRING_BASE`` gives :class:`VringStop` with ``reply=True``: the export stops the
  queue's worker and passes its last available index to :meth:`Backend.vring_stopped`, which
  returns the reply.  ``SET_VRING_ENABLE 0`` gives the same event with ``reply=False``.
* after any message, :meth:`Backend.ack` gives the ``REPLY_ACK`` answer (empty unless the
  frontend negotiated REPLY_ACK and asked for one), so the export acknowledges a memory table
  only once it is mapped.

A queue runs (:class:`VringStart`) once it has a size, addresses and a kick fd and is enabled
(every ring is enabled at once when the frontend did not negotiate protocol features, and
starts disabled when it did: the specification's rule).  The device's config space is the
export's: it keeps :attr:`Backend.config` current and gets :class:`SetConfig` for writes.
"""
from __future__ import annotations

from dataclasses import dataclass

from blockexport.vhost_user import constants as C
from blockexport.vhost_user.constants import Request as R
from blockexport.vhost_user.errors import VhostUserProtocolError
from blockexport.vhost_user.wire import (
    MemRegion, Message, pack_config, pack_u64, pack_vring_state, parse_config,
    parse_mem_table, parse_u64, parse_vring_addr, parse_vring_state, request_name,
)


# --- events ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Reply:
    """Send these bytes to the frontend now."""
    data: bytes


@dataclass(frozen=True, slots=True)
class FeaturesSet:
    """The frontend acknowledged these virtio features (the queues' ring features among
    them)."""
    features: int


@dataclass(frozen=True, slots=True)
class MemTable:
    """Map these regions (one fd each, now the export's) in place of the current table; the
    running queues must then use the new mappings."""
    regions: tuple[MemRegion, ...]
    fds: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class VringKick:
    """The queue's kick eventfd (the export owns the fd now; an older one is to be closed)."""
    index: int
    fd: int


@dataclass(frozen=True, slots=True)
class VringCall:
    """The queue's call eventfd (None: the frontend will not be interrupted)."""
    index: int
    fd: int | None


@dataclass(frozen=True, slots=True)
class VringErr:
    """The queue's error eventfd (None: none)."""
    index: int
    fd: int | None


@dataclass(frozen=True, slots=True)
class VringAddr:
    """The queue's rings are at these frontend addresses (the export checks they are in the
    memory table; ``size`` is 0 if SET_VRING_NUM has not come yet)."""
    index: int
    size: int
    desc: int
    used: int
    avail: int


@dataclass(frozen=True, slots=True)
class VringStart:
    """Run the queue: ``size`` descriptors, the rings at these frontend addresses, the
    first available index to serve ``base``."""
    index: int
    size: int
    desc: int
    used: int
    avail: int
    base: int


@dataclass(frozen=True, slots=True)
class VringStop:
    """Stop the queue's worker, then call :meth:`Backend.vring_stopped` (whose return value
    is the reply when ``reply`` is true)."""
    index: int
    reply: bool


@dataclass(frozen=True, slots=True)
class SetConfig:
    """The frontend writes ``data`` at ``offset`` of the config space."""
    offset: int
    flags: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Reset:
    """Stop every queue and forget the frontend's memory (RESET_OWNER / RESET_DEVICE)."""


class _Vring:
    __slots__ = ("size", "desc", "used", "avail", "have_addr", "base", "kick", "enabled",
                 "started")

    def __init__(self):
        self.size = 0
        self.desc = self.used = self.avail = 0
        self.have_addr = False
        self.base = 0
        self.kick = False
        self.enabled = False
        self.started = False


class Backend:
    """One frontend connection's protocol state.

    ``features``: the virtio features offered (``F_PROTOCOL_FEATURES`` is added);
    ``protocol_features``: the protocol features offered; ``num_queues``: queues the device
    has; ``config``: the config space's bytes (kept current by the export)."""

    def __init__(self, features: int, protocol_features: int, num_queues: int,
                 config: bytes = b""):
        self.offered_features = features | (1 << C.F_PROTOCOL_FEATURES)
        self.offered_protocol_features = protocol_features
        self.num_queues = num_queues
        self.config = config
        self.features = 0
        self.protocol_features = 0
        self.owner = False
        self.vrings = [_Vring() for _ in range(num_queues)]

    # --- queries ----------------------------------------------------------------------------
    def has_feature(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)

    def has_protocol_feature(self, bit: int) -> bool:
        return bool(self.protocol_features >> bit & 1)

    # --- input ------------------------------------------------------------------------------
    def handle(self, msg: Message) -> tuple:
        """Events for one message (see the module's description); raises
        :class:`VhostUserProtocolError` for a message the backend can't accept."""
        handler = _HANDLERS.get(msg.request)
        if handler is None:
            raise VhostUserProtocolError("unsupported request %s" % request_name(msg.request))
        return handler(self, msg)

    def ack(self, msg: Message, ok: bool = True) -> bytes:
        """The REPLY_ACK answer for ``msg`` once it was acted on (b"" when none is due)."""
        if (msg.need_reply and self.has_protocol_feature(C.PROTOCOL_F_REPLY_ACK)
                and msg.request not in _HAS_REPLY):
            return pack_u64(msg.request, 0 if ok else 1)
        return b""

    def vring_stopped(self, index: int, last_avail: int | None, reply: bool = False) -> bytes:
        """The export stopped queue ``index`` (``last_avail``: the next available index it
        would have served, None if the queue was not running).  Returns GET_VRING_BASE's
        reply when ``reply``."""
        ring = self.vrings[index]
        if last_avail is not None:
            ring.base = last_avail
        ring.started = False
        if reply:
            ring.kick = False       # GET_VRING_BASE stops the ring until the next kick fd
            return pack_vring_state(R.GET_VRING_BASE, index, ring.base)
        return b""

    # --- handlers ---------------------------------------------------------------------------
    def _vring(self, index: int, msg: Message) -> _Vring:
        if index >= self.num_queues:
            raise VhostUserProtocolError("%s for vring %d (the device has %d)"
                                         % (request_name(msg.request), index, self.num_queues))
        return self.vrings[index]

    def _maybe_start(self, index: int) -> tuple:
        ring = self.vrings[index]
        if ring.started or not (ring.kick and ring.size and ring.have_addr):
            return ()
        if self.has_feature(C.F_PROTOCOL_FEATURES) and not ring.enabled:
            return ()
        ring.started = True
        return (VringStart(index, ring.size, ring.desc, ring.used, ring.avail, ring.base),)

    def _get_features(self, msg):
        return (Reply(pack_u64(msg.request, self.offered_features)),)

    def _set_features(self, msg):
        features = parse_u64(msg)
        extra = features & ~self.offered_features
        if extra:
            raise VhostUserProtocolError("SET_FEATURES with features not offered: 0x%x" % extra)
        self.features = features
        return (FeaturesSet(features),)

    def _get_protocol_features(self, msg):
        return (Reply(pack_u64(msg.request, self.offered_protocol_features)),)

    def _set_protocol_features(self, msg):
        features = parse_u64(msg)
        extra = features & ~self.offered_protocol_features
        if extra:
            raise VhostUserProtocolError("SET_PROTOCOL_FEATURES with features not offered: "
                                         "0x%x" % extra)
        self.protocol_features = features
        return ()

    def _set_owner(self, msg):
        self.owner = True
        return ()

    def _reset(self, msg):
        for ring in self.vrings:
            ring.started = ring.kick = ring.enabled = ring.have_addr = False
            ring.size = ring.base = 0
        self.features = 0
        return (Reset(),)

    def _get_queue_num(self, msg):
        return (Reply(pack_u64(msg.request, self.num_queues)),)

    def _set_mem_table(self, msg):
        regions = parse_mem_table(msg)
        if len(msg.fds) != len(regions):
            raise VhostUserProtocolError("memory table of %d regions came with %d fds"
                                         % (len(regions), len(msg.fds)))
        for region in regions:
            if region.memory_size == 0:
                raise VhostUserProtocolError("memory region of size 0")
        return (MemTable(regions, msg.fds),)

    def _set_vring_num(self, msg):
        index, num = parse_vring_state(msg)
        ring = self._vring(index, msg)
        if num == 0 or num > C.MAX_QUEUE_SIZE or num & (num - 1):
            raise VhostUserProtocolError("vring %d size %d (a power of 2 up to %d)"
                                         % (index, num, C.MAX_QUEUE_SIZE))
        ring.size = num
        return ()

    def _set_vring_addr(self, msg):
        index, flags, desc, used, avail, _log = parse_vring_addr(msg)
        ring = self._vring(index, msg)
        if flags & C.VRING_F_LOG:
            raise VhostUserProtocolError("vring %d: dirty logging is not supported" % index)
        ring.desc, ring.used, ring.avail = desc, used, avail
        ring.have_addr = True
        return (VringAddr(index, ring.size, desc, used, avail),)

    def _set_vring_base(self, msg):
        index, num = parse_vring_state(msg)
        ring = self._vring(index, msg)
        if num > 0xFFFF:
            raise VhostUserProtocolError("vring %d base %d" % (index, num))
        ring.base = num
        return ()

    def _get_vring_base(self, msg):
        index, _num = parse_vring_state(msg)
        self._vring(index, msg)
        return (VringStop(index, True),)

    def _vring_fd(self, msg):
        value = parse_u64(msg)
        index = value & C.VRING_INDEX_MASK
        self._vring(index, msg)
        if value & ~(C.VRING_INDEX_MASK | C.VRING_NOFD_MASK):
            raise VhostUserProtocolError("%s payload 0x%x" % (request_name(msg.request), value))
        nofd = bool(value & C.VRING_NOFD_MASK)
        if len(msg.fds) != (0 if nofd else 1):
            raise VhostUserProtocolError("%s came with %d fds" % (request_name(msg.request),
                                                                  len(msg.fds)))
        return index, (None if nofd else msg.fds[0])

    def _set_vring_kick(self, msg):
        index, fd = self._vring_fd(msg)
        if fd is None:
            raise VhostUserProtocolError("vring %d: polling without a kick fd is not "
                                         "supported" % index)
        self.vrings[index].kick = True
        return (VringKick(index, fd),) + self._maybe_start(index)

    def _set_vring_call(self, msg):
        index, fd = self._vring_fd(msg)
        return (VringCall(index, fd),)

    def _set_vring_err(self, msg):
        index, fd = self._vring_fd(msg)
        return (VringErr(index, fd),)

    def _set_vring_enable(self, msg):
        index, enable = parse_vring_state(msg)
        ring = self._vring(index, msg)
        if not self.has_feature(C.F_PROTOCOL_FEATURES):
            raise VhostUserProtocolError("SET_VRING_ENABLE without protocol features")
        ring.enabled = bool(enable)
        if ring.enabled:
            return self._maybe_start(index)
        if ring.started:
            return (VringStop(index, False),)
        return ()

    def _get_config(self, msg):
        offset, size, flags, _data = parse_config(msg)
        data = bytes(self.config[offset:offset + size])
        data += bytes(size - len(data))
        return (Reply(pack_config(msg.request, offset, flags, data)),)

    def _set_config(self, msg):
        offset, size, flags, data = parse_config(msg)
        return (SetConfig(offset, flags, data),)


_HANDLERS = {
    R.GET_FEATURES: Backend._get_features,
    R.SET_FEATURES: Backend._set_features,
    R.SET_OWNER: Backend._set_owner,
    R.RESET_OWNER: Backend._reset,
    R.RESET_DEVICE: Backend._reset,
    R.SET_MEM_TABLE: Backend._set_mem_table,
    R.SET_VRING_NUM: Backend._set_vring_num,
    R.SET_VRING_ADDR: Backend._set_vring_addr,
    R.SET_VRING_BASE: Backend._set_vring_base,
    R.GET_VRING_BASE: Backend._get_vring_base,
    R.SET_VRING_KICK: Backend._set_vring_kick,
    R.SET_VRING_CALL: Backend._set_vring_call,
    R.SET_VRING_ERR: Backend._set_vring_err,
    R.GET_PROTOCOL_FEATURES: Backend._get_protocol_features,
    R.SET_PROTOCOL_FEATURES: Backend._set_protocol_features,
    R.GET_QUEUE_NUM: Backend._get_queue_num,
    R.SET_VRING_ENABLE: Backend._set_vring_enable,
    R.GET_CONFIG: Backend._get_config,
    R.SET_CONFIG: Backend._set_config,
}

#: requests answered by their own reply (REPLY_ACK does not apply to them)
_HAS_REPLY = frozenset((R.GET_FEATURES, R.GET_PROTOCOL_FEATURES, R.GET_VRING_BASE,
                        R.GET_QUEUE_NUM, R.GET_CONFIG))
