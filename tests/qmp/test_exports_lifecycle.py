"""Export lifecycle with real NBD clients connected: safe/hard removal, nbd-server-stop, and the
daemon's own shutdown (quit, SIGTERM/SIGINT/SIGHUP) emitting BLOCK_EXPORT_DELETED per export.
Expectations are qemu-storage-daemon 7.2's."""
from __future__ import annotations

import json
import signal

import pytest

from helpers.daemons import file_node, nbd_uri, unix_addr
from helpers.nbd_clients import hang_up, wait_sent

nbd = pytest.importorskip("nbd")


def daemon_args(tmp_path, image, *exports):
    args = ["--blockdev", f"driver=file,node-name=f,filename={image}",
            "--nbd-server", f"addr.type=unix,addr.path={tmp_path}/nbd.sock"]
    for e in exports:
        args += ["--export", e]
    return args


def client(tmp_path, name="f"):
    h = nbd.NBD()
    h.connect_uri(nbd_uri(tmp_path / "nbd.sock", name))
    return h


def info(id_, shutting_down=False):
    return {"id": id_, "type": "nbd", "node-name": "f", "shutting-down": shutting_down}


def test_safe_removal_refused_while_client_connected(start_daemon, tmp_path, image):
    d = start_daemon(daemon_args(tmp_path, image, "nbd,id=e1,node-name=f,writable=on"))
    q = d.qmp()
    h = client(tmp_path)
    try:
        assert q.error("block-export-del", {"id": "e1"}) == "export 'e1' still in use"
        assert q.error("block-export-del", {"id": "e1", "mode": "safe"}) == \
            "export 'e1' still in use"
        assert q.error("nbd-server-remove", {"name": "e1"}) == "export 'e1' still in use"
        # nbd-server-remove looks the export up by id, not by NBD name
        assert q.error("nbd-server-remove", {"name": "f"}) == "Export 'f' is not found"
        assert q.cmd("query-block-exports") == [info("e1")]
        # the client was not disturbed
        h.pwrite(b"still here", 0)
        assert h.pread(10, 0) == b"still here"
    finally:
        h.shutdown()
    # after the client left, safe removal works
    assert q.cmd("block-export-del", {"id": "e1"}) == {}
    assert q.event("BLOCK_EXPORT_DELETED") == {"id": "e1"}


@pytest.mark.parametrize("command", ["block-export-del", "nbd-server-remove"])
def test_hard_removal_drops_clients(start_daemon, tmp_path, image, command):
    d = start_daemon(daemon_args(tmp_path, image, "nbd,id=e1,node-name=f,writable=on",
                                 "nbd,id=e2,node-name=f,name=other"))
    q = d.qmp()
    a, b = client(tmp_path), client(tmp_path)
    other = client(tmp_path, "other")
    try:
        assert a.pread(4, 0) == bytes(4)
        key = "id" if command == "block-export-del" else "name"
        assert q.cmd(command, {key: "e1", "mode": "hard"}) == {}
        assert q.event("BLOCK_EXPORT_DELETED") == {"id": "e1"}
        assert q.cmd("query-block-exports") == [info("e2")]
        assert q.error("block-export-del", {"id": "e1"}) == "Export 'e1' is not found"
        for h in (a, b):
            with pytest.raises(nbd.Error) as exc:
                h.pread(4, 0)
            assert exc.value.errno == "ENOTCONN"
        # other exports' clients are untouched
        assert other.pread(4, 0) == bytes(4)
    finally:
        other.shutdown()
    # the id and the NBD name can be reused at once
    q.cmd("block-export-add", {"type": "nbd", "id": "e1", "node-name": "f"})
    h = client(tmp_path)
    try:
        assert h.get_size() == 4 << 20
    finally:
        h.shutdown()


def test_nbd_server_stop_with_clients(start_daemon, tmp_path, image):
    d = start_daemon(daemon_args(tmp_path, image, "nbd,id=e1,node-name=f",
                                 "nbd,id=e2,node-name=f,name=x"))
    q = d.qmp()
    h = client(tmp_path, "x")
    assert q.cmd("nbd-server-stop") == {}
    # both events were sent before the reply
    evs = [e for e in q.client.events.clear()]
    assert sorted(e["data"]["id"] for e in evs) == ["e1", "e2"]
    assert all(e["event"] == "BLOCK_EXPORT_DELETED" for e in evs)
    assert q.cmd("query-block-exports") == []
    with pytest.raises(nbd.Error) as exc:
        h.pread(4, 0)
    assert exc.value.errno == "ENOTCONN"
    # the listener is gone too
    late = nbd.NBD()
    with pytest.raises(nbd.Error):
        late.connect_uri(nbd_uri(tmp_path / "nbd.sock", "x"))


def test_export_del_events_transcript(transcripts):
    """Same script, same answers: the del/remove/stop paths and their events."""
    def script(w):
        (w / "disk.img").write_bytes(bytes(1 << 20))
        return [
            ("blockdev-add", file_node(w / "disk.img")),
            ("nbd-server-start", {"addr": unix_addr(w / "nbd.sock")}),
            ("block-export-add", {"type": "nbd", "id": "a", "node-name": "f", "name": "a"}),
            ("block-export-add", {"type": "nbd", "id": "b", "node-name": "f", "name": "b"}),
            ("block-export-add", {"type": "nbd", "id": "c", "node-name": "f", "name": "c"}),
            ("nbd-server-add", {"device": "f", "name": "d"}),
            ("block-export-del", {"id": "a", "mode": "hard"}),
            ("nbd-server-remove", {"name": "b"}),
            ("query-block-exports", None),
            ("nbd-server-stop", None),
        ]
    t = transcripts(script)
    deleted = [e["data"]["id"] for e in t if e.get("event") == "BLOCK_EXPORT_DELETED"]
    assert deleted[:2] == ["a", "b"] and sorted(deleted[2:]) == ["c", "d"]
    transcripts.assert_same()


# --- the daemon's own shutdown ------------------------------------------------------------
class RawMon:
    def __init__(self, d, mon):
        self.sock = d.connect_raw(mon)
        self.f = self.sock.makefile("rwb")
        assert b'"QMP"' in self.f.readline()
        self.send({"execute": "qmp_capabilities"})
        assert json.loads(self.f.readline()) == {"return": {}}

    def send(self, msg):
        self.f.write(json.dumps(msg).encode() + b"\n")
        self.f.flush()

    def read_to_eof(self):
        """Every message until the daemon closes the connection."""
        out = []
        try:
            for line in self.f:
                out.append(json.loads(line))
        except ConnectionResetError:
            pass
        return out

    def close(self):
        self.f.close()
        self.sock.close()


@pytest.mark.parametrize("how", ["quit", "SIGTERM", "SIGINT", "SIGHUP"])
def test_shutdown_deletes_exports(start_daemon, tmp_path, image, how):
    d = start_daemon(daemon_args(tmp_path, image, "nbd,id=e1,node-name=f,writable=on",
                                 "nbd,id=e2,node-name=f,name=x"),
                     monitors=("mon", "mon2"))
    watcher = RawMon(d, "mon2")
    actor = RawMon(d, "mon")
    h = client(tmp_path, "x")
    try:
        if how == "quit":
            actor.send({"execute": "quit"})
        else:
            d.signal(getattr(signal, how))
        assert d.wait_exit(10) == 0
        msgs = watcher.read_to_eof()
        for m in msgs:
            assert set(m) == {"event", "data", "timestamp"}
            assert set(m["timestamp"]) == {"seconds", "microseconds"}
        # one event per export (their order depends on which had clients)
        assert sorted((m["event"], m["data"]["id"]) for m in msgs) == [
            ("BLOCK_EXPORT_DELETED", "e1"), ("BLOCK_EXPORT_DELETED", "e2")]
        if how != "quit":
            # the other monitor saw the same (the one that sent quit may see a reset)
            assert [m.get("event") for m in actor.read_to_eof()] == ["BLOCK_EXPORT_DELETED"] * 2
        assert d.stderr() == ""
        with pytest.raises(nbd.Error):
            h.pread(4, 0)
    finally:
        watcher.close()
        actor.close()


def test_quit_reply_then_eof(start_daemon, tmp_path, image):
    """Without exports, quit's reply (QSD may close before sending it), EOF, exit status 0."""
    d = start_daemon(["--blockdev", f"driver=file,node-name=f,filename={image}"])
    m = RawMon(d, "mon")
    try:
        m.send({"execute": "quit", "id": 7})
        assert m.read_to_eof() in ([], [{"return": {}, "id": 7}])
    finally:
        m.close()
    assert d.wait_exit(10) == 0


def test_hard_removal_with_request_in_flight(start_daemon, tmp_path, image):
    """A client stuck in the middle of a write's payload, hard removal, and pipelined commands
    right behind it: the export is gone or shutting down, never live. (QSD 7.2 usually drops
    the client before it handles the next command; under load `shutting-down: true` shows.)"""
    import socket
    import struct

    from helpers.prober import Prober

    d = start_daemon(daemon_args(tmp_path, image, "nbd,id=e1,node-name=f,writable=on"))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(tmp_path / "nbd.sock"))
    p = Prober(s)
    try:
        p.open("f")
        # NBD_CMD_WRITE of 1 MiB with only 100 bytes of its payload sent
        p.send(struct.pack(">IHHQQI", 0x25609513, 0, 1, 1, 0, 1 << 20) + b"x" * 100)
        m = RawMon(d, "mon")
        try:
            # pipelined: the daemon reads them all at once
            m.f.write(b"".join(json.dumps(c).encode() + b"\n" for c in [
                {"execute": "block-export-del", "arguments": {"id": "e1", "mode": "hard"}, "id": 1},
                {"execute": "query-block-exports", "id": 2},
                {"execute": "block-export-del", "arguments": {"id": "e1"}, "id": 3},
            ]))
            m.f.flush()
            replies, events = {}, []
            while len(replies) < 3 or not events:
                msg = json.loads(m.f.readline())
                if "event" in msg:
                    events.append((msg["event"], msg["data"]))
                else:
                    replies[msg["id"]] = {k: v for k, v in msg.items() if k != "id"}
            assert replies[1] == {"return": {}}
            gone = {"error": {"class": "GenericError", "desc": "Export 'e1' is not found"}}
            going = {"error": {"class": "GenericError",
                               "desc": "Export 'e1' is already shutting down"}}
            # usually already gone; while the client is still being torn down the export is
            # listed with shutting-down true and a second del says it is shutting down
            if replies[2] == {"return": []}:
                assert replies[3] == gone
            else:
                assert replies[2] == {"return": [info("e1", shutting_down=True)]}
                assert replies[3] in (gone, going)
            assert events == [("BLOCK_EXPORT_DELETED", {"id": "e1"})]
        finally:
            m.close()
        assert p.read_until_closed() == b""
    finally:
        p.close()


def test_safe_removal_right_after_clients_hang_up(start_daemon, tmp_path, image):
    """A client that has hung up (nothing in flight) no longer holds the export, even if the
    server has not yet read its EOF: safe removal right after the hang-up succeeds, every
    time (it was a 0.2 s grace period before, a guess that a busy machine can miss)."""
    d = start_daemon(daemon_args(tmp_path, image))
    q = d.qmp()
    for i in range(20):
        q.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "f", "name": "f",
                                   "writable": True})
        socks = []
        for _ in range(3):
            h = client(tmp_path)
            h.pwrite(b"%d" % i, 0)
            hang_up(h)     # abruptly, without NBD_CMD_DISC
            socks.append(h)
        assert q.cmd("block-export-del", {"id": "e"}) == {}, i
        assert q.event("BLOCK_EXPORT_DELETED") == {"id": "e"}
        del socks


def test_safe_removal_with_hung_up_client_request_in_flight(start_daemon, tmp_path):
    """A client that hung up while its write is still running holds the export until the
    write completes, as in QEMU: safe removal says it is in use."""
    d = start_daemon(["--blockdev", "null-co,node-name=f,size=67108864,latency-ns=1500000000",
                      "--nbd-server", f"addr.type=unix,addr.path={tmp_path}/nbd.sock",
                      "--export", "nbd,id=e,node-name=f,name=f,writable=on"])
    q = d.qmp()
    h = client(tmp_path)
    h.aio_pwrite(b"x" * 4096, 0)
    wait_sent(h)
    hang_up(h)
    assert q.error("block-export-del", {"id": "e"}) == "export 'e' still in use"
    assert q.cmd("block-export-del", {"id": "e", "mode": "hard"}) == {}
    assert q.event("BLOCK_EXPORT_DELETED") == {"id": "e"}
