"""blockexport-daemon's command line against the real qemu-storage-daemon 7.2.

The compatibility tables run qemu-storage-daemon and blockexport-daemon with the same argv
(both found by name through $PATH) and require the same exit status, stdout and stderr once
the program names are replaced.  Daemons that start successfully are started with
``--daemonize --pidfile`` (the command returns once start-up is complete: no sleeping), used,
then stopped with SIGTERM or QMP ``quit`` and waited for through a pidfd.
"""
from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from blockexport.cli import storage_daemon as sd
from helpers.daemons import qmp_lines
from helpers.procs import kill_pid, wait_pid_gone

QSD = "/usr/bin/qemu-storage-daemon"
OURS = str(Path(sys.executable).parent / "blockexport-daemon")
RUN_TIMEOUT = 20
STOP_TIMEOUT = 10

have_qemu = pytest.mark.skipif(not os.path.exists(QSD), reason="qemu-storage-daemon missing")
PROGS = ("qemu-storage-daemon", "blockexport-daemon")


def _env(extra=None):
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(OURS).parent), os.path.dirname(QSD),
                                   env.get("PATH", "")])
    env["LC_ALL"] = "C"
    env.pop("POSIXLY_CORRECT", None)
    if extra:
        env.update(extra)
    return env


def run_prog(prog: str, argv, cwd):
    """Run ``prog`` through PATH -> (status, stdout, stderr) with the name normalised."""
    argv = [a.replace("{d}", str(cwd)) for a in argv]
    p = subprocess.run([prog] + argv, cwd=cwd, env=_env(), capture_output=True, text=True,
                       errors="surrogateescape", timeout=RUN_TIMEOUT)
    norm = (lambda s: s.replace(prog, "PROG").replace(str(cwd), "{d}"))
    return p.returncode, norm(p.stdout), norm(p.stderr)


def clean(d: Path):
    """Remove what a run may leave behind (QSD keeps its sockets after an error)."""
    for p in d.iterdir():
        if p.suffix == ".sock" or p.name == "d.pid":
            p.unlink()


def compare(argv, cwd: Path):
    theirs = run_prog("qemu-storage-daemon", argv, cwd)
    clean(cwd)
    ours = run_prog("blockexport-daemon", argv, cwd)
    clean(cwd)
    assert ours == theirs, "argv %r" % (argv,)
    return ours


@pytest.fixture
def workdir(tmp_path):
    with open(tmp_path / "x.img", "wb") as f:
        f.truncate(1024 * 1024)
    return tmp_path


CHR = "socket,id=c,path={d}/m.sock,server=on,wait=off"
NULL = "null-co,node-name=n,size=1048576"
NBD = "addr.type=unix,addr.path={d}/n.sock"

# argv that end with an error while parsing or applying options (nothing keeps running)
ERRORS = [
    # getopt
    ["--bogus"], ["-Z"], ["--blockdev"], ["--pidfile"], ["-T"], ["--help=x"],
    ["--daemonize=1"], ["-x", "-V"], ["--blockdev", NULL, "--bogus"], ["foo", "--bogus"],
    ["--bogus", "-h"], ["--bogus=1"], ["--nbd"], ["--e"],
    # operands are errors in their place
    ["foo"], ["-"], ["foo", "--blockdev", "null-co"], ["--blockdev", "null-co", "foo"],
    ["--daemonize", "foo"],
    # abbreviations and --opt=value keep the argv text in the location
    ["--block=driver=null-co"], ["--b", "null-co"], ["--m", "x"], ["--mon=x"],
    # -T
    ["-T", "foo=bar", "--blockdev", "null-co"], ["-Tfoo=bar"], ["--tr=foo=bar"],
    ["-T", "bogus", "--blockdev", "null-co"], ["-T", "bog*", "--blockdev", "null-co"],
    ["-T", "events=/nonexist"], ["-T", "file=/nonexistdir/f", "--blockdev", "null-co"],
    ["-T", "file=/dev/null,help"], ["--daemonize", "-T", "foo=bar"],
    # help values
    ["--blockdev", "help"], ["--blockdev", "driver=help"], ["--blockdev", "null-co,help"],
    ["--export", "help"], ["--export", "nbd,help"], ["--nbd-server", "help"],
    ["--monitor", "help"],
    # --blockdev
    ["--blockdev", "null-co"], ["--blockdev", ""], ["--blockdev", "node-name=a"],
    ["--blockdev", '{"driver":"null-co"}'], ["--blockdev", '{"driver":"null-co"'],
    ["--blockdev", "[1]"], ["--blockdev", ' {"driver":"null-co"}'],
    ["--blockdev", '{"driver":"null-co","node-name":"a","size":"1"}'],
    ["--blockdev", '{"a":1} x'], ["--blockdev", '{"a" 1}'], ["--blockdev", '{"a":1}{}'],
    ["--blockdev", "{'driver':'null-co'}"], ["--blockdev", '{ "driver":1}'],
    ["--blockdev", '{"driver":"null-co","node-name":"a"} "x'], ["--blockdev", '{"a":1,"a":2}'],
    ["--blockdev", '{"a":' * 1025], ["--blockdev", '{"a":"\\u00zz"}'],
    ["--blockdev", "null-co,node-name=a,size=abc"], ["--blockdev", "null-co,node-name=a,size=1k"],
    ["--blockdev", "null-co,node-name=a,read-only=x"],
    ["--blockdev", "null-co,node-name=a,foo=bar"],
    ["--blockdev", "file,node-name=a,filename=/nonexist"], ["--blockdev", "file,node-name=a"],
    ["--blockdev", "foo,node-name=a"], ["--blockdev", NULL, "--blockdev", NULL],
    ["--daemonize", "--blockdev", "null-co"],
    ["--pidfile", "{d}/p", "--blockdev", "null-co"],
    # --export (and its order with --nbd-server)
    ["--export", ""], ["--export", "id=e"], ["--export", "foo,id=e"], ["--export", "nbd"],
    ["--export", "nbd,id=e"], ["--export", '{"type":"nbd"}'], ["--export", '{"type":"nbd"'],
    ["--blockdev", NULL, "--export", "nbd,id=e,node-name=n"],
    ["--blockdev", NULL, "--export", "nbd,id=e,node-name=n", "--nbd-server", NBD],
    ["--blockdev", NULL, "--nbd-server", NBD, "--export", "nbd,id=e,node-name=n",
     "--export", "nbd,id=e,node-name=n"],
    ["--blockdev", NULL, "--nbd-server", NBD, "--export", "nbd,id=e,node-name=x"],
    ["--blockdev", NULL + ",read-only=on", "--nbd-server", NBD,
     "--export", "nbd,id=e,node-name=n,writable=on"],
    ["--blockdev", NULL, "--nbd-server", NBD, "--export", "nbd,id=1e,node-name=n"],
    # --nbd-server
    ["--nbd-server", ""], ["--nbd-server", "addr.type=unix"], ["--nbd-server", "foo"],
    ["--nbd-server", NBD + ",max-connections=x"], ["--nbd-server", "addr.type=foo"],
    ["--nbd-server", "addr=x"], ["--nbd-server", "addr.type=unix,addr.path=/nonexist/s"],
    ["--nbd-server", "addr.type=fd,addr.str=99"], ["--nbd-server", "addr.type=fd,addr.str=1"],
    ["--nbd-server", "addr.type=fd,addr.str=x"],
    ["--nbd-server", "addr.type=inet,addr.host=127.0.0.1,addr.port=1,addr.ipv6=on"],
    ["--nbd-server", "addr.type=inet,addr.host=127.0.0.1,addr.port=1,addr.ipv4=off,addr.ipv6=off"],
    ["--nbd-server", "addr.type=unix,addr.path=/tmp/" + "p" * 120],
    ["--nbd-server", '{"addr":{"type":"unix","path":"{d}/n.sock"}}', "--nbd-server",
     "addr.type=unix,addr.path={d}/n2.sock"],
    # --chardev
    ["--chardev", "socket,help"], ["--chardev", ""],
    ["--chardev", "socket"], ["--chardev", "foo"], ["--chardev", "id=c"],
    ["--chardev", "foo,id=c"], ["--chardev", "socket,id=c,path={d}/m.sock"],
    ["--chardev", "socket,id=c,path=/nonexist/m.sock,server=on,wait=off"],
    ["--chardev", CHR + ",bogus=1"], ["--chardev", "socket,bogus=1"],
    ["--chardev", CHR, "--chardev", CHR.replace("m.sock", "m2.sock")],
    ["--chardev", CHR.replace("id=c", "id=1c")],
    ["--chardev", "socket,id=c,host=127.0.0.1,server=on,wait=off"],
    ["--chardev", '{"backend":"socket"}'], ["--chardev", CHR + ",host=x"],
    ["--chardev", CHR.replace("server=on", "server=x")],
    ["--chardev", "socket,id=c,host=localhost,port=x,server=on,wait=off"],
    ["--chardev", "socket,id=c,host=256.1.1.1,port=1234,server=on,wait=off"],
    ["--chardev", CHR + ",ipv4=x"], ["--chardev", CHR.replace("m.sock", "m" * 120)],
    # client mode (server=off, the default): the connection is made at startup
    ["--chardev", "socket,id=c,path={d}/none.sock,server=off"],
    ["--chardev", "socket,id=c,path={d}/none.sock,server=off,wait=off"],
    ["--chardev", "socket,id=c,path={d}/none.sock,wait=on"],
    ["--chardev", "socket,id=c,path={d}/none.sock,reconnect=0"],
    ["--chardev", "socket,id=c,path={d}/none.sock,reconnect=x"],
    ["--chardev", "socket,id=c,path={d}/none.sock,server=off,reconnect=1,wait=off"],
    ["--chardev", "socket,id=c,path={d}/none.sock,server=on,wait=off,reconnect=1"],
    ["--chardev", "socket,id=c,path={d}/none.sock,server=off,websocket=on"],
    ["--chardev", "socket,id=c,path={d}/none.sock,server=off,tls-authz=a"],
    ["--chardev", "socket,id=c,path={d}/" + "m" * 120 + ",server=off"],
    ["--chardev", "socket,id=c,server=off"], ["--chardev", "socket,id=c"],
    ["--chardev", "socket,id=c,port=1"], ["--chardev", "socket,id=c,reconnect=1"],
    ["--chardev", "socket,id=c,port=1,reconnect=1"], ["--chardev", "socket,id=c,fd=99"],
    ["--chardev", "socket,id=c,fd=x"], ["--chardev", "socket,id=c,host=127.0.0.1,port=1"],
    ["--chardev", "socket,id=c,host=127.0.0.1,port=x"], ["--chardev", "socket,id=c,host=,port=1"],
    ["--chardev", CHR, "--chardev", "socket,id=c,path={d}/none.sock"],
    # stdio
    ["--chardev", "stdio,id=a", "--chardev", "stdio,id=b"],
    ["--daemonize", "--chardev", "stdio,id=a"], ["--chardev", "stdio,id=a,signal=x"],
    ["--chardev", CHR, "--chardev", "stdio,id=c"], ["--chardev", "stdio,id=c", "--chardev", CHR],
    # --monitor
    ["--monitor", ""], ["--monitor", "c"], ["--monitor", "x,mode=readline"],
    ["--chardev", CHR, "--monitor", "c,mode=readline"],
    ["--chardev", CHR, "--monitor", "c,mode=foo"], ["--chardev", CHR, "--monitor", "c,pretty=x"],
    ["--chardev", CHR, "--monitor", "c,bogus=1"], ["--chardev", CHR, "--monitor", "id=x"],
    ["--chardev", CHR, "--monitor", "c,pretty"], ["--chardev", CHR, "--monitor", "c",
                                                  "--monitor", "c"],
    ["--chardev", CHR, "--monitor", '{"chardev":"c","mode":"readline"}'],
    # --object
    ["--object", ""], ["--object", "foo,id=x"], ["--object", "secret,id=x"],
    ["--object", "secret,id=x,data=a", "--object", "secret,id=x,data=b"],
    ["--object", '{"qom-type":"secret"}'], ["--object", "iothread,id=1x"],
    ["--object", '{"qom-type":"iothread","id":"1x"}'],
    ["--object", "secret,id=x,data=a,bogus=1"], ["--object", "iothread,id=i,poll-max-ns=x"],
    ["--object", '{"qom-type":"help"}'], ["--object", '{"qom-type":"secret","id":"s"'],
    ["--object", '{"qom-type":"secret","id":"s","data":1}'],
    # pid file
    ["--pidfile", "/nonexist/p"], ["--daemonize", "--pidfile", "/nonexist/p"],
]


@have_qemu
@pytest.mark.parametrize("argv", ERRORS, ids=lambda a: " ".join(a)[:70] or "(none)")
def test_errors_match_qemu(argv, workdir):
    status, out, err = compare(argv, workdir)
    assert status == 1


# help output that is QEMU's own data, not ours: the object/chardev/trace listings
SAME_OUTPUT = [
    ["--object", "secret,help"], ["--object", "iothread,help"], ["--chardev", "help"],
    ["--chardev", "socket,help"],
]


@have_qemu
@pytest.mark.parametrize("argv", SAME_OUTPUT, ids=" ".join)
def test_help_listings_match_qemu(argv, workdir):
    compare(argv, workdir)


def test_object_help_lists_our_types(workdir):
    from blockexport.objects import OBJECT_TYPES
    status, out, err = run_prog("blockexport-daemon", ["--object", "help"], workdir)
    assert status == 0 and err == ""
    assert out == "List of user creatable objects:\n" + "".join(
        "  %s\n" % t for t in sorted(OBJECT_TYPES))


def test_help_and_version(workdir):
    status, out, err = run_prog("blockexport-daemon", ["-h"], workdir)
    assert status == 0 and err == ""
    assert out.startswith("Usage: PROG [options]\n")
    for name, _, _ in sd.LONG_OPTS:
        assert "--%s" % name in out
    for short in ("-h", "-V", "-T"):
        assert "  %s, --" % short in out
    status, out, err = run_prog("blockexport-daemon", ["--version"], workdir)
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("PROG version ")
    assert "qemu-storage-daemon 7.2" in lines[0]


@have_qemu
@pytest.mark.parametrize("argv", [["-h", "--bogus"], ["-V", "-h"], ["-h", "-V"],
                                  ["--blockdev", "null-co", "-V"], ["-T", "foo=bar", "-h"],
                                  ["foo", "-V"], ["--b", "x", "--vers"]],
                         ids=" ".join)
def test_help_version_first_pass(argv, workdir):
    """-h/-V are handled before every other option: same status, same kind of output."""
    theirs = run_prog("qemu-storage-daemon", argv, workdir)
    ours = run_prog("blockexport-daemon", argv, workdir)
    assert ours[0] == theirs[0] == 0
    assert ours[2] == theirs[2] == ""
    assert ours[1].split()[:2] == theirs[1].split()[:2]


# --- daemons that start ------------------------------------------------------------------------

class Started:
    """A daemon started with --daemonize --pidfile: its pid comes from the pid file."""

    def __init__(self, prog: str, argv, cwd: Path):
        self.cwd = cwd
        self.pidfile = cwd / "d.pid"
        self.result = run_prog(prog, ["--daemonize", "--pidfile", str(self.pidfile)] + argv,
                               cwd)
        self.pid = int(self.pidfile.read_text()) if self.result[0] == 0 else None

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.pid is not None:
            try:
                os.kill(self.pid, sig)
                wait_pid_gone(self.pid, STOP_TIMEOUT)
            finally:
                kill_pid(self.pid)
            self.pid = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.pid is not None:
            kill_pid(self.pid)
            wait_pid_gone(self.pid, STOP_TIMEOUT)


def _qmp(path: Path, commands):
    """Run QMP commands on a unix socket; returns the replies (events skipped)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        return qmp_lines(s, commands)


def _nbd_size(sock: Path, name: str = "") -> int:
    import nbd
    h = nbd.NBD()
    try:
        h.set_export_name(name)
        h.connect_unix(str(sock))
        size = h.get_size()
        h.shutdown()
        return size
    finally:
        del h


SERVE = ["--blockdev", NULL, "--nbd-server", NBD, "--export", "nbd,id=e,node-name=n",
         "--chardev", CHR, "--monitor", "c"]


@have_qemu
@pytest.mark.parametrize("prog", PROGS)
def test_daemonize_pidfile_serve_sigterm(prog, workdir):
    with Started(prog, SERVE, workdir) as d:
        assert d.result == (0, "", "")
        assert d.pidfile.read_text() == "%d\n" % d.pid
        assert os.readlink("/proc/%d/cwd" % d.pid) == "/"
        assert _nbd_size(workdir / "n.sock", "n") == 1048576
        replies = _qmp(workdir / "m.sock", ["query-block-exports"])
        assert replies[0]["return"][0]["id"] == "e"
        d.stop()
    assert not d.pidfile.exists()


@have_qemu
@pytest.mark.parametrize("prog", PROGS)
def test_quit_stops_daemon(prog, workdir):
    with Started(prog, SERVE, workdir) as d:
        assert d.result[0] == 0
        pid = d.pid
        assert _qmp(workdir / "m.sock", ["quit"]) == [{"return": {}}]
        wait_pid_gone(pid, STOP_TIMEOUT)
        d.pid = None
    assert not d.pidfile.exists()


@have_qemu
@pytest.mark.parametrize("argv", [
    ["-T", "bogus"],                      # a warning, and still a success
    ["--", "foo", "--bogus"],             # everything after -- is ignored
    ["--chardev", CHR + ",server,nowait"],  # deprecated short forms warn
    ["--blockdev", '{"driver":"null-co","node-name":"n"}', "--nbd-server",
     '{"addr":{"type":"unix","path":"{d}/n.sock"},"max-connections":2}',
     "--export", '{"type":"nbd","id":"e","node-name":"n","name":"x"}'],
    ["--object", "iothread,id=io0", "--blockdev", NULL, "--nbd-server", NBD,
     "--export", "type=nbd,id=e,node-name=n,iothread=io0,writable=on,description=d"],
    ["--chardev", CHR, "--monitor", '{"chardev":"c","pretty":true}'],
    ["--chardev", CHR, "--monitor", "chardev=c,mode=control,pretty=off,id=m0"],
], ids=lambda a: " ".join(a)[:60])
def test_successful_starts_match_qemu(argv, workdir):
    results = []
    for prog in PROGS:
        with Started(prog, argv, workdir) as d:
            results.append(d.result)
            d.stop()
        clean(workdir)
    assert results[1] == results[0]
    assert results[0][0] == 0


@have_qemu
def test_locked_pidfile(workdir):
    """QSD locks its pid file; a second daemon on the same file fails after start-up."""
    pidfile = workdir / "locked.pid"
    fd = os.open(pidfile, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for daemonize in ([], ["--daemonize"]):
            status, out, err = compare(daemonize + ["--pidfile", str(pidfile), "--blockdev",
                                                    NULL], workdir)
            assert status == 1
            assert err == "PROG: cannot create PID file: Cannot lock pid file: " \
                          "Resource temporarily unavailable\n"
    finally:
        os.close(fd)


# --- in-process units --------------------------------------------------------------------------

def test_getopt_locations_and_operands():
    got = list(sd.getopt(["--blockdev", "a", "--exp=b", "x", "-Tc", "-T", "d", "--daemon",
                          "--", "y"], "P"))
    assert got == [("blockdev", "a", "--blockdev a"), ("export", "b", "--exp=b"),
                   (sd.OPERAND, "x", "x"), ("T", "c", "-Tc"), ("T", "d", "-T d"),
                   ("daemonize", None, "--daemon")]


def test_getopt_errors():
    for argv, msg in ((["--x"], "P: unrecognized option '--x'"),
                      (["--help=1"], "P: option '--help' doesn't allow an argument"),
                      (["--pidfile"], "P: option '--pidfile' requires an argument"),
                      (["-q"], "P: invalid option -- 'q'"),
                      (["-T"], "P: option requires an argument -- 'T'")):
        with pytest.raises(sd.GetoptError) as exc:
            list(sd.getopt(argv, "P"))
        assert str(exc.value) == msg


def test_json_arg():
    assert sd.parse_json_arg("{'a': [1, true]}") == {"a": [1, True]}
    for text, msg in (('{"a"', "JSON parse error, premature EOI"),
                      ('{"a":1} 2', "Expecting at most one JSON value")):
        with pytest.raises(Exception) as exc:
            sd.parse_json_arg(text)
        assert str(exc.value) == msg


def test_chardev_backends():
    def backend(text):
        vals, _ = sd.parse_chardev_opts(text, None)
        return sd.chardev_backend(vals)

    assert backend("socket,id=c,path=/x,server=on,wait=off") == {
        "type": "socket", "server": True, "addr": {"type": "unix", "path": "/x"}}
    assert backend("socket,id=c,port=4444,server=on,wait=off") == {
        "type": "socket", "server": True, "addr": {"type": "inet", "host": "", "port": "4444"}}
    assert backend("socket,id=c,path=/x") == {
        "type": "socket", "server": False, "addr": {"type": "unix", "path": "/x"},
        "reconnect": 0}
    assert backend("socket,id=c,host=h,port=1,ipv4=on,server=off,reconnect=2") == {
        "type": "socket", "server": False, "reconnect": 2,
        "addr": {"type": "inet", "host": "h", "port": "1", "ipv4": True}}
    assert backend("stdio,id=c") == {"type": "stdio", "signal": True}
    assert backend("stdio,id=c,signal=off,path=x") == {"type": "stdio", "signal": False}
    for text in ("null,id=c", "socket,id=c,path=/x,server=on",
                 "socket,id=c,path=/x,server=on,wait=off,telnet=on", "stdio,id=c,mux=on",
                 "stdio,id=c,logfile=/x"):
        vals, _ = sd.parse_chardev_opts(text, None)
        with pytest.raises(Exception) as exc:
            sd.chardev_backend(vals)
        assert "not supported by blockexport" in str(exc.value)
