"""The qcow2 driver's persistent dirty bitmaps: :mod:`.bitmaps` (the on-disk format) wired to
the node's dirty bitmaps (:mod:`blockexport.block.dirty_bitmap`), as QEMU 7.2 does it
(observed with qemu-storage-daemon and qemu-nbd 7.2.22).

:func:`attach` is called once at the end of :class:`Qcow2Node.__init__`:

* the bitmaps extension is checked and every bitmap of the directory becomes a node bitmap
  (``persistent``; enabled when its ``auto`` flag is set; read-only on a read-only open;
  flagged ``in_use`` on disk -- left by a crash -- it is *inconsistent*: no content, not
  recording, refused for export and for every command but removal).  A damaged extension or
  directory fails the open with QEMU's message.  An extension left by a program without
  bitmap support (autoclear bit 0 clear) is ignored with QEMU's warning, and dropped from the
  header by a writable open;
* a writable open flags every bitmap ``in_use`` on disk and registers a close hook
  (``node.close_hooks``) that stores every persistent node bitmap (those loaded, in directory
  order, then the ones added since, newest first, as QEMU) into freshly allocated clusters, points
  the header at the new directory, frees the old one and so clears ``in_use``; an
  inconsistent bitmap is kept as it is on disk;
* ``block-dirty-bitmap-add persistent=true`` asks ``node.can_store_dirty_bitmap`` (QEMU's
  refusals: a v2 image, a name too long, too many bitmaps, a full directory); a read-only node
  accepts it as QEMU does and says at close that the bitmap is lost;
* ``block-dirty-bitmap-remove`` of a stored bitmap removes it from the image at once (a new
  directory without it, as QEMU: ``qemu-img info -U`` no longer lists it while the daemon
  runs).

The write path supplies, on a writable node: ``node.refcounts`` (the cluster allocator),
``node.meta_lock`` (an RLock serialising metadata changes), ``node.rewrite_header(**changes)``
(``autoclear_features=int``, ``bitmaps_ext=HeaderBitmapsExt | None``: the extension's
fields under both modules' names, ``pack()`` its 24 bytes) and
``node.close_hooks`` (callables run at the start of a clean close of a writable node, under
``meta_lock``).

``node.qcow2_bitmaps_info()`` is ``format-specific.data.bitmaps`` of the image info: the
directory as it is on disk now (with its ``in-use`` flags).
"""
from __future__ import annotations

import os
import sys

from blockexport.block.drivers.qcow2 import bitmaps as B
from blockexport.errors import Error


def _default_warn(message: str, hint: str | None = None) -> None:
    prog = os.path.basename(sys.argv[0] or "") or "blockexport"
    text = "%s: %s\n" % (prog, message)
    if hint:
        text += hint  # as given: QEMU's hint for the autoclear warning has no newline
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


#: Where warnings go (``warn(message, hint=None)``); the CLIs may replace it.
warn = _default_warn


class HeaderBitmapsExt(B.BitmapsExtension):
    """What ``rewrite_header(bitmaps_ext=...)`` gets: :class:`.bitmaps.BitmapsExtension`
    (``nb_bitmaps``, ``dir_size``, ``dir_offset``, ``pack()``) that also answers to the field
    names of :class:`.header.BitmapsExtension` (``directory_size``, ``directory_offset``)."""

    @property
    def directory_size(self) -> int:
        return self.dir_size

    @property
    def directory_offset(self) -> int:
        return self.dir_offset


class FileIO:
    """The image file as :mod:`.bitmaps` wants it: ``pread``, ``pwrite``, ``flush``."""

    __slots__ = ("file", "refcounts")

    def __init__(self, file, refcounts=None):
        self.file = file
        self.refcounts = refcounts

    def pread(self, offset: int, length: int) -> bytes:
        flen = self.file.length()
        if offset >= flen:
            return b""
        buf = bytearray(min(length, flen - offset))
        self.file.read_into(offset, memoryview(buf))
        return bytes(buf)

    def pwrite(self, offset: int, data) -> None:
        self.file.write(offset, bytes(data))

    def flush(self) -> None:
        # refcount decreases cached by the allocator go out before the file flush
        if self.refcounts is not None:
            self.refcounts.flush()
        else:
            self.file.flush()


class NodeBitmaps:
    """The persistent-bitmap state of one qcow2 node."""

    def __init__(self, node):
        self.node = node
        #: the directory on disk, in order (flags as on disk)
        self.infos: list[B.BitmapInfo] = []

    # ---- open -----------------------------------------------------------------------------

    def load(self) -> None:
        node = self.node
        h = node.header
        data = None
        for t, d in h.extensions:
            if t == B.EXT_MAGIC:
                data = d
                break
        if data is None:
            return
        writable = not node.read_only
        if not B.extension_consistent(h.autoclear_features):
            warn("warning: " + B.AUTOCLEAR_WARNING, B.AUTOCLEAR_HINT)
            if writable:  # QEMU drops the stale extension (its clusters leak)
                with node.meta_lock:
                    node.rewrite_header(bitmaps_ext=None)
            return
        io = FileIO(node.file)
        try:
            ext = B.BitmapsExtension.parse(data, h.cluster_size)
            infos, bms = B.load_bitmaps(
                io, ext=ext, autoclear_features=h.autoclear_features,
                cluster_size=h.cluster_size, disk_size=h.size, read_only=not writable,
                node=node, file_size=node.file.length())
        except OSError as e:
            raise Error("Could not read the bitmap directory: %s"
                        % os.strerror(e.errno or 5)) from None
        self.infos = infos
        for bm in bms:
            if bm.inconsistent:
                bm.enabled = False  # QEMU: an inconsistent bitmap does not record
            node.dirty_bitmaps[bm.name] = bm
        if bms:
            node._dirty_bitmaps_changed()

    # ---- queries ----------------------------------------------------------------------------

    def qapi_info(self) -> list[dict]:
        return [i.qapi_info() for i in self.infos]

    # ---- block-dirty-bitmap-add persistent=true -----------------------------------------

    def can_store(self, name: str, granularity: int) -> None:
        node = self.node
        stored = {i.name for i in self.infos}
        new = [bm.name for bm in node.dirty_bitmaps.values()
               if bm.persistent and bm.name not in stored and bm.name != name]
        B.check_can_store(version=node.header.version, node_name=node.node_name, name=name,
                          granularity=granularity, infos=self.infos, new_names=new)

    # ---- block-dirty-bitmap-remove --------------------------------------------------------

    def remove_stored(self, name: str) -> None:
        """Write a directory without ``name`` (no-op when it is not stored yet)."""
        if not any(i.name == name for i in self.infos):
            return
        node = self.node
        if node.read_only or getattr(node, "refcounts", None) is None:
            raise Error("Bitmap '%s' is readonly and cannot be modified" % name)
        with node.meta_lock:
            keep = [i for i in self.infos if i.name != name]
            self._write_directory(keep)

    # ---- close ------------------------------------------------------------------------------

    def store_all(self) -> None:
        """The close hook of a writable node: store every persistent bitmap."""
        node = self.node
        bms = node.dirty_bitmaps
        stored = {i.name for i in self.infos}
        items = []
        for info in self.infos:
            bm = bms.get(info.name)
            if bm is None or not bm.persistent:
                continue
            if bm.inconsistent:
                items.append(info)  # kept as it is (in use) on disk
            else:
                items.append(B.from_dirty_bitmap(bm, node.header.size))
        # then the new ones, newest first (QEMU keeps a node's bitmaps newest first)
        for bm in reversed(list(bms.values())):
            if bm.persistent and bm.name not in stored and not bm.inconsistent:
                items.append(B.from_dirty_bitmap(bm, node.header.size))
        if not items and not self.infos:
            return
        try:
            self._write_directory(items)
        except (Error, OSError) as e:  # QEMU reports it and goes on closing
            msg = str(e) if isinstance(e, Error) else os.strerror(e.errno or 5)
            warn("Lost persistent bitmaps during inactivation of node '%s': %s"
                 % (node.node_name, msg))

    def read_only_close(self) -> None:
        """QEMU's message when a read-only node had persistent bitmaps added."""
        if any(bm.persistent and not bm.readonly for bm in self.node.dirty_bitmaps.values()):
            warn("Lost persistent bitmaps during inactivation of node '%s': No write access"
                 % self.node.node_name)

    # ---- the directory ---------------------------------------------------------------------

    def _write_directory(self, items) -> None:
        """Store ``items`` (BitmapData, or BitmapInfo of ``self.infos`` kept as they are) as
        the new directory; the caller holds ``meta_lock``."""
        node = self.node
        h = node.header
        io = FileIO(node.file, node.refcounts)

        def update_header(dir_offset, dir_size, nb):
            if nb:
                node.rewrite_header(
                    autoclear_features=node.header.autoclear_features | B.AUTOCLEAR_BITMAPS,
                    bitmaps_ext=HeaderBitmapsExt(nb, dir_size, dir_offset))
            else:
                node.rewrite_header(
                    autoclear_features=node.header.autoclear_features & ~B.AUTOCLEAR_BITMAPS,
                    bitmaps_ext=None)

        result = B.store_bitmaps(io, node.refcounts, items, cluster_size=h.cluster_size,
                                 disk_size=h.size, old_infos=self.infos,
                                 update_header=update_header)
        io.flush()
        self.infos = list(result.infos)


def attach(node) -> NodeBitmaps:
    """Load the image's bitmaps into ``node`` and install the hooks (see the module doc)."""
    state = NodeBitmaps(node)
    state.load()
    node.qcow2_bitmaps = state
    node.qcow2_bitmaps_info = state.qapi_info
    node.can_store_dirty_bitmap = state.can_store
    node.remove_stored_dirty_bitmap = state.remove_stored
    if node.read_only:
        inner = node._close

        def _close():
            state.read_only_close()
            inner()
        node._close = _close
    else:
        node.close_hooks.append(state.store_all)
    return state
