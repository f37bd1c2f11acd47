"""The ``blkdebug`` driver: a pass-through to its ``image`` child that fails requests as its
rules say (QEMU's error-injection driver, for testing error paths end to end).

Rules (QEMU 7.2's semantics, re-implemented):

* An ``inject-error`` rule becomes *active* when its ``event`` occurs while the state machine
  is in the rule's ``state`` (any state when unset).  Each event that activates error rules
  first deactivates all the others, so the active set is "the error rules of the last such
  event".  ``set-state`` rules change the state (it starts at 1) at their event; every rule
  of one event sees the state the event started in.
* A request fails when an active rule matches its kind (``iotype``; by default read, write,
  write-zeroes, discard and flush) and, with ``sector``, when the request covers that
  512-byte sector (flushes cover none).  The first matching active rule, in definition order
  (rules of a ``config`` file first), decides: its ``errno`` (EIO by default; 0 lets the
  request through).  A ``once`` rule is deleted after it failed a request.  ``immediately``
  makes no difference here (requests are synchronous).
* Events that occur with our drivers: ``none`` once when the node is opened; ``read_aio`` /
  ``write_aio`` when a ``raw`` node on top reads or writes; ``flush_to_os`` and (when the
  parent wrote since its last successful flush) ``flush_to_disk`` when the parent node is
  flushed; ``pwritev`` / ``pwritev_zero`` before and ``pwritev_done`` after a write /
  write-zeroes reaching this node; ``pwritev_rmw_*`` around the read-modify-write of a write
  that is not aligned to ``align``.  The qcow2 events never occur (no qcow2 driver yet; it
  would fire them on its file child with :meth:`BlkdebugNode.debug_event`).

As QEMU's generic block layer does for this driver, requests are checked against the rules
on their ``align``-padded range, split at ``max-transfer`` (write-zeroes at
``opt-write-zero`` / ``max-write-zero``, discards at ``opt-discard`` / ``max-discard``): a
write-zeroes piece smaller than the zero alignment is written as data (checked as a write;
with NO_FALLBACK it fails with ENOTSUP), a discard piece smaller than ``align`` is dropped.
The data itself goes to the child unpadded (the child handles any alignment).  A flush
reaches the rules only when the node was written since its last successful flush (QEMU
skips clean flushes), and FUA is emulated by a flush after the write, as QEMU does over a
``file`` child.
"""

from __future__ import annotations

import errno
import os
import re
import threading

from blockexport.block.node import (
    PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE, PERM_WRITE_UNCHANGED, SECTOR_SIZE,
    BlockNode,
)
from blockexport.errors import Error
from blockexport.qapi.schema import default_schema
from blockexport.util.cutils import parse_bool, round_up, strtou64

INT_MAX = 2**31 - 1

#: QEMU's default iotype mask: everything but block-status.
DEFAULT_IOTYPES = frozenset(("read", "write", "write-zeroes", "discard", "flush"))

_PERMS = {"consistent-read": PERM_CONSISTENT_READ, "write": PERM_WRITE,
          "write-unchanged": PERM_WRITE_UNCHANGED, "resize": PERM_RESIZE}

_WRITE_PERMS = PERM_WRITE | PERM_WRITE_UNCHANGED


def _enum_values(name: str) -> frozenset:
    return frozenset(v[0] for v in default_schema().type(name).values)


def _int32(v: int) -> int:
    """QEMU keeps these rule values in C ints."""
    v &= 0xFFFFFFFF
    return v - 2**32 if v >= 2**31 else v


class Rule:
    """One inject-error or set-state rule (options as validated QAPI dicts)."""

    __slots__ = ("action", "event", "state", "errno", "offset", "iotypes", "once",
                 "new_state", "removed")

    def __init__(self, action: str, opts: dict):
        self.action = action
        self.event = opts["event"]
        self.state = _int32(opts.get("state", 0))
        self.removed = False
        if action == "inject-error":
            self.errno = _int32(opts.get("errno", errno.EIO))
            sector = opts.get("sector", -1)
            # QEMU keeps sector * 512 as an unsigned offset: only -1 means "any"; other
            # negative sectors never match.
            self.offset = -1 if sector == -1 else (sector * SECTOR_SIZE if sector >= 0 else None)
            iotype = opts.get("iotype")
            self.iotypes = DEFAULT_IOTYPES if iotype is None else frozenset((iotype,))
            self.once = bool(opts.get("once", False))
        else:
            self.new_state = _int32(opts["new_state"])

    def matches(self, iotype: str, offset: int, length: int) -> bool:
        if iotype not in self.iotypes:
            return False
        off = self.offset
        if off == -1:
            return True
        return off is not None and length > 0 and offset <= off < offset + length

    def __repr__(self) -> str:
        return f"<Rule {self.action} at {self.event}>"


class Rules:
    """The rule engine: events activate rules, requests are checked against the active ones.
    Thread-safe."""

    def __init__(self, inject: list[dict] = (), set_state: list[dict] = ()):
        self._lock = threading.Lock()
        self.state = 1
        self._by_event: dict[str, list[Rule]] = {}
        # QEMU processes an event's rules newest first, set-state rules before error rules,
        # and each activated error rule goes to the head of the active list: the active
        # list ends up in definition order.
        for action, rules in (("inject-error", inject), ("set-state", set_state)):
            for opts in rules:
                rule = Rule(action, opts)
                self._by_event.setdefault(rule.event, []).insert(0, rule)
        self.active: list[Rule] = []

    def event(self, name: str) -> None:
        rules = self._by_event.get(name)
        if not rules:
            return
        with self._lock:
            old_state = self.state
            new_state = old_state
            activated = None
            for rule in rules:
                if rule.state and rule.state != old_state:
                    continue
                if rule.action == "inject-error":
                    if activated is None:
                        activated = []
                    activated.insert(0, rule)
                else:
                    new_state = rule.new_state
            if activated is not None:
                self.active = activated
            self.state = new_state

    def check(self, iotype: str, offset: int, length: int) -> None:
        """Raise the OSError of the first active rule matching the request, if any."""
        if not self.active:
            return
        with self._lock:
            for rule in self.active:
                if rule.matches(iotype, offset, length):
                    break
            else:
                return
            err = rule.errno
            if err <= 0:
                return      # QEMU returns -errno: 0 (or a negative errno) is success
            if rule.once and not rule.removed:
                rule.removed = True
                self.active = [r for r in self.active if r is not rule]
                lst = self._by_event.get(rule.event)
                if lst is not None and rule in lst:
                    lst.remove(rule)
        raise OSError(err, os.strerror(err))


# ---- the config file (QEMU's qemu_config_parse format) -------------------------------------

_GROUP = re.compile(r'\s*\[([^\]\s"]{1,63})(?:\s+"([^"]{0,63})")?\]')
_VALUE = re.compile(r'\s*(\S{1,63})\s*=\s*"([^"]{0,1023})"')
_RULE_KEYS = {
    "inject-error": ("event", "state", "iotype", "errno", "sector", "once", "immediately"),
    "set-state": ("event", "state", "new_state"),
}
_NUMBER_KEYS = {"state", "errno", "sector", "new_state"}
_BOOL_KEYS = {"once", "immediately"}


def read_config(path: str) -> dict:
    """The rules of a blkdebug config file: ``{"inject-error": [...], "set-state": [...]}``
    with string values, as QEMU's config parser reads them (QEMU's errors)."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise Error(f"Could not read blkdebug config file: {os.strerror(e.errno)}") from None
    out: dict[str, list[dict]] = {"inject-error": [], "set-state": []}
    current = None
    for line in lines:
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        m = _GROUP.match(line)
        if m:
            group = m.group(1)
            if group not in out:
                raise Error(f"There is no option group '{group}'")
            current = {}
            out[group].append(current)
            continue
        if current is None:
            raise Error("Could not parse blkdebug config file")
        m = _VALUE.match(line)
        # QEMU's parser takes a line without a quoted value as the first word = ""
        key, value = (m.group(1), m.group(2)) if m else (stripped.split()[0][:63], "")
        current[key] = value
    return out


def typed_rule(group: str, opts: dict, inline: bool = True) -> dict:
    """A rule given as strings (config file, ``--image-opts``, ``json:`` filenames) typed as
    QEMU's QemuOpts reads it, with QEMU's errors (``inline``: given in the options, not in
    a config file)."""
    keys = _RULE_KEYS[group]
    for key in opts:
        if key not in keys:
            if inline:
                raise Error(f"[{group}] section doesn't support the option '{key}'")
            raise Error(f"Invalid parameter '{key}'")
    out = {}
    for key, value in opts.items():
        if not isinstance(value, str):
            if isinstance(value, bool) and key in _NUMBER_KEYS:
                raise Error(f"Parameter '{key}' expects a number")
            out[key] = value
        elif key in _NUMBER_KEYS:
            v = strtou64(value)
            if v is None:
                raise Error(f"Parameter '{key}' expects a number")
            out[key] = v - 2**64 if v >= 2**63 else v
        elif key in _BOOL_KEYS:
            out[key] = parse_bool(key, value)
        else:
            out[key] = value
    event = out.get("event")
    if event is None:
        raise Error("Missing event name for rule")
    if event not in _enum_values("BlkdebugEvent"):
        raise Error(f"invalid parameter value: {event}")
    iotype = out.get("iotype")
    if iotype is not None and iotype not in _enum_values("BlkdebugIOType"):
        raise Error(f"invalid parameter value: {iotype}")
    if group == "set-state":
        out.setdefault("new_state", 0)
    return out


def legacy_options(opts: dict) -> dict:
    """The rules of blkdebug options given the legacy way (``--image-opts``, ``json:``
    filenames: string values, a list as ``{"0": {...}, "1": {...}}`` or a single rule as a
    dict) typed as QEMU reads them, with QEMU's messages."""
    out = dict(opts)
    for group in ("inject-error", "set-state"):
        value = out.get(group)
        if value is None:
            continue
        if isinstance(value, dict):
            if value and all(k.isdigit() for k in value):
                rules = [value[k] for k in sorted(value, key=int)]
            else:
                rules = [value]
        elif isinstance(value, list):
            rules = value
        else:
            raise Error(f"Block protocol 'blkdebug' doesn't support the option '{group}'")
        typed = []
        for i, rule in enumerate(rules):
            if not isinstance(rule, dict):
                raise Error(f"[{group}] section (index {i}) does not consist of keys")
            typed.append(typed_rule(group, rule))
        out[group] = typed
    return out


# ---- the node --------------------------------------------------------------------------------

def _chunks(start: int, end: int, limit: int):
    pos = start
    while pos < end:
        n = min(end - pos, limit)
        yield pos, pos + n
        pos += n


class BlkdebugNode(BlockNode):
    driver = "blkdebug"
    is_protocol = True      # QEMU's blkdebug is a protocol driver (blkdebug:CONFIG:IMAGE)

    def __init__(self, graph, node_name: str, options: dict):
        super().__init__(node_name, options)
        config = options.get("config")
        inject = list(options.get("inject-error", ()))
        set_state = list(options.get("set-state", ()))
        if config is not None:
            parsed = read_config(config)
            inject = [typed_rule("inject-error", r, False)
                      for r in parsed["inject-error"]] + inject
            set_state = [typed_rule("set-state", r, False)
                         for r in parsed["set-state"]] + set_state
        self.rules = Rules(inject, set_state)
        self.config = config
        self._take = 0
        self._unshare = 0
        for name in options.get("take-child-perms", ()):
            self._take |= _PERMS[name]
        for name in options.get("unshare-child-perms", ()):
            self._unshare |= _PERMS[name]
        self._gen = 0           # QEMU's write_gen / flushed_gen
        self._flushed_gen = 0
        self._gen_lock = threading.Lock()
        child = graph.open_child(self, "image", options["image"], options)
        self._setup(child, options)

    def _setup(self, child: BlockNode, options: dict) -> None:
        align = options.get("align", 0)
        if align < 0:
            raise Error("Parameter 'align' expects a non-negative number below 2^64")
        if align and (align >= INT_MAX or align & (align - 1)):
            raise Error(f"Cannot meet constraints with align {align}")
        base = max(align, child.request_alignment)

        def limit(key: str, multiple: int) -> int:
            value = options.get(key, 0)
            if value < 0:
                raise Error(f"Parameter '{key}' expects a non-negative number below 2^64")
            if value and (value >= INT_MAX or value % multiple):
                raise Error(f"Cannot meet constraints with {key} {value}")
            return value

        self.max_transfer = limit("max-transfer", base)
        opt_zero = limit("opt-write-zero", base)
        self.max_write_zero = limit("max-write-zero", max(opt_zero, base))
        opt_discard = limit("opt-discard", base)
        self.max_discard = limit("max-discard", max(opt_discard, base))
        self.request_alignment = align or 1
        self.opt_write_zero = opt_zero
        self.opt_discard = opt_discard
        self.filename = child.filename
        self.image = child
        self._add_child("image", child)
        self.rules.event("none")

    # ---- events ----------------------------------------------------------------------------

    def debug_event(self, name: str) -> None:
        """A parent node (or this node's own generic path) reports event ``name``."""
        self.rules.event(name)

    def _child_event(self, name: str) -> None:
        ev = getattr(self.image, "debug_event", None)
        if ev is not None:
            ev(name)

    def _written(self) -> None:
        with self._gen_lock:
            self._gen += 1

    # ---- helpers -----------------------------------------------------------------------------

    def _padded(self, offset: int, length: int) -> tuple[int, int]:
        a = self.request_alignment
        return offset - offset % a, round_up(offset + length, a)

    def _transfer_limit(self) -> int:
        a = self.request_alignment
        mt = min(self.max_transfer or INT_MAX, INT_MAX)
        return max(mt - mt % a, a)

    # ---- reads ---------------------------------------------------------------------------------

    def read_into(self, offset: int, buf) -> None:
        mv = memoryview(buf)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        n = len(mv)
        if n == 0:
            return
        start, end = self._padded(offset, n)
        child_read = self.image.read_into
        check = self.rules.check
        for lo, hi in _chunks(start, end, self._transfer_limit()):
            check("read", lo, hi - lo)
            a, b = max(lo, offset), min(hi, offset + n)
            child_read(a, mv[a - offset:b - offset])

    def block_status(self, offset: int, length: int) -> tuple[int, int]:
        start, end = self._padded(offset, length)
        self.rules.check("block-status", start, end - start)
        return self.image.block_status(offset, length)

    def cache(self, offset: int, length: int) -> None:
        # QEMU serves NBD_CMD_CACHE as a copy-on-read prefetch: an allocation query (which
        # reaches this node's block status), no read.
        start, end = self._padded(offset, length)
        self.rules.check("block-status", start, end - start)
        self.image.cache(offset, length)

    # ---- writes --------------------------------------------------------------------------------

    def _check_ro(self) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    def _rmw_events(self, offset: int, length: int) -> tuple[int, int]:
        """The events around the padding reads QEMU does for a write not aligned to
        ``align`` (QEMU 7.2's padding reads do not meet the rules).  Returns the padded
        range."""
        a = self.request_alignment
        start, end = self._padded(offset, length)
        head = offset != start
        tail = offset + length != end
        if not (head or tail):
            return start, end
        ev = self.rules.event
        # one read covers both ends when the padded request is one block, or two blocks
        # with both ends unaligned
        merged = end - start == a or (head and tail and end - start == 2 * a)
        if head or merged:
            if head:
                ev("pwritev_rmw_head")
            if merged and tail:
                ev("pwritev_rmw_tail")
            if head:
                ev("pwritev_rmw_after_head")
            if merged and tail:
                ev("pwritev_rmw_after_tail")
            if merged:
                return start, end
        if tail:
            ev("pwritev_rmw_tail")
            ev("pwritev_rmw_after_tail")
        return start, end

    def write(self, offset: int, buf, fua: bool = False) -> None:
        self._check_ro()
        mv = memoryview(buf)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        n = len(mv)
        if n == 0:
            return
        start, end = self._rmw_events(offset, n)
        ev = self.rules.event
        ev("pwritev")
        try:
            self._write_pieces(offset, mv, start, end)
            if fua:
                self.flush()    # FUA emulated: the write is not yet counted
        finally:
            ev("pwritev_done")
            self._written()

    def _write_pieces(self, offset: int, mv, start: int, end: int) -> None:
        n = len(mv)
        child_write = self.image.write
        check = self.rules.check
        for lo, hi in _chunks(start, end, self._transfer_limit()):
            check("write", lo, hi - lo)
            a, b = max(lo, offset), min(hi, offset + n)
            child_write(a, mv[a - offset:b - offset], False)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False,
                     fast: bool = False, fua: bool = False) -> None:
        self._check_ro()
        if length <= 0:
            return
        a = self.request_alignment
        start, end = self._padded(offset, length)
        if offset == start and offset + length == end:
            self._zero_aligned(offset, length, may_unmap, fast, fua)
            return
        # QEMU writes the unaligned head and tail blocks as data (read-modify-write) and
        # zeroes the aligned middle.
        first_end = start + a
        if offset != start or end - start == a:
            hi = min(offset + length, first_end)
            self._zero_as_data_block(offset, hi - offset, fua)
            offset, length = hi, offset + length - hi
            if not length:
                return
        mid_end = (offset + length) - (offset + length) % a
        if mid_end > offset:
            self._zero_aligned(offset, mid_end - offset, may_unmap, fast, fua)
            length -= mid_end - offset
            offset = mid_end
        if length:
            self._zero_as_data_block(offset, length, fua)

    def _zero_as_data_block(self, offset: int, length: int, fua: bool) -> None:
        start, end = self._rmw_events(offset, length)
        ev = self.rules.event
        ev("pwritev")
        try:
            for lo, hi in _chunks(start, end, self._transfer_limit()):
                self.rules.check("write", lo, hi - lo)
                a, b = max(lo, offset), min(hi, offset + length)
                self.image.write_zeroes(a, b - a, False, False, False)
            if fua:
                self.flush()
        finally:
            ev("pwritev_done")
            self._written()

    def _zero_aligned(self, offset: int, length: int, may_unmap: bool, fast: bool,
                      fua: bool) -> None:
        ev = self.rules.event
        ev("pwritev_zero")
        try:
            self._zero_pieces(offset, length, may_unmap, fast)
            if fua:
                self.flush()
        finally:
            ev("pwritev_done")
            self._written()

    def _zero_pieces(self, offset: int, length: int, may_unmap: bool, fast: bool) -> None:
        """QEMU's bdrv_co_do_pwrite_zeroes() over this driver."""
        align = max(self.request_alignment, self.opt_write_zero)
        max_zero = min(self.max_write_zero or INT_MAX, INT_MAX)
        max_zero = max(max_zero - max_zero % align, align)
        head = offset % align
        tail = (offset + length) % align
        check = self.rules.check
        image = self.image
        while length > 0:
            num = length
            if head:
                num = min(length, align - head)
                head = (head + num) % align
            elif tail and num > align:
                num -= tail
            num = min(num, max_zero)
            try:
                if num < align:         # the driver refuses pieces below its zero alignment
                    raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))
                check("write-zeroes", offset, num)
                image.write_zeroes(offset, num, may_unmap, fast, False)
            except OSError as e:
                if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP) or fast:
                    raise
                # the generic layer's fallback: write zeroes as data
                limit = self._transfer_limit()
                for lo, hi in _chunks(offset, offset + num, limit):
                    check("write", lo, hi - lo)
                    image.write_zeroes(lo, hi - lo, False, False, False)
            offset += num
            length -= num

    def discard(self, offset: int, length: int) -> None:
        if self.discard_mode != "unmap" or self.read_only or length <= 0:
            return
        align = max(self.request_alignment, self.opt_discard)
        max_discard = min(self.max_discard or INT_MAX, INT_MAX)
        max_discard = max(max_discard - max_discard % align, align)
        req = self.request_alignment
        head = offset % align
        tail = (offset + length) % align
        check = self.rules.check
        try:
            while length > 0:
                num = length
                if head:
                    num = min(length, align - head)
                    if num % req:
                        num %= req
                    head = (head + num) % align
                elif tail:
                    if num > align:
                        num -= tail
                    elif tail % req and tail > req:
                        tail %= req
                        num -= tail
                num = min(num, max_discard)
                if num >= req:      # smaller pieces: ENOTSUP, which discard ignores
                    try:
                        check("discard", offset, num)
                        self.image.discard(offset, num)
                    except OSError as e:
                        if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
                            raise
                offset += num
                length -= num
        finally:
            self._written()

    def flush(self) -> None:
        if self.read_only:
            return
        self._child_event("flush_to_os")
        gen = self._gen
        if not self.no_flush and gen != self._flushed_gen:
            self._child_event("flush_to_disk")
            self.rules.check("flush", 0, 0)
        att = self._child_atts.get("image")
        if att is not None and att.perm & _WRITE_PERMS:
            self.image.flush()
        with self._gen_lock:
            if self._flushed_gen < gen:
                self._flushed_gen = gen

    # ---- the rest ------------------------------------------------------------------------------

    def length(self) -> int:
        return self.image.length()

    def file_range(self, offset: int, length: int):
        return None     # every read goes through the rules

    def _child_perm(self, role: str, perm: int, shared: int) -> tuple[int, int]:
        return perm | self._take, shared & ~self._unshare
