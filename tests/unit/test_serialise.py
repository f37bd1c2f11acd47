"""blockexport.block.serialise.Overlaps: try_begin, the non-waiting begin of a plain write
(the native AIO path takes it from the connection's reader, which must never wait)."""
from __future__ import annotations

import threading

from blockexport.block.serialise import Overlaps


def test_try_begin_declines_next_to_a_read_modify_write():
    o = Overlaps()
    rmw = o.begin(0, 4096, True)
    assert o.try_begin(512, 1024) is None            # inside the padded range
    assert o.try_begin(3584, 8192) is None           # overlapping its end
    far = o.try_begin(4096, 8192)                    # touching, not overlapping
    assert far is not None
    o.end(rmw)
    near = o.try_begin(512, 1024)
    assert near is not None
    o.end(near)
    o.end(far)


def test_try_begin_beside_plain_writes_and_then_waited_for():
    """Plain writes don't decline each other; a read-modify-write begun after one waits for
    it to end."""
    o = Overlaps()
    a = o.try_begin(0, 4096)
    b = o.try_begin(0, 4096)
    assert a is not None and b is not None
    began = threading.Event()

    def rmw():
        me = o.begin(0, 4096, True)
        began.set()
        o.end(me)
    t = threading.Thread(target=rmw)
    t.start()
    assert not began.wait(0.2)                       # waits for a and b
    o.end(a)
    assert not began.wait(0.1)
    o.end(b)
    assert began.wait(10)
    t.join(10)
