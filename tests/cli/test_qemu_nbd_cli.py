"""blockexport-nbd's command line against the real qemu-nbd 7.2.

The compatibility tables run qemu-nbd and blockexport-nbd with the same argv (both found by
name through $PATH, so both see a plain argv[0]) and require the same exit status and the
same stdout/stderr once the program names are replaced.  Unit tests cover the getopt
emulation (the option syntaxes are tested in tests/unit/test_util_keyval.py).  No test sleeps to synchronise: servers are waited for with
--fork (the parent exits once the daemon listens) or socket activation (the listening socket
exists before the server starts), and daemons are waited for through pidfds.
"""
from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from blockexport.cli import qemu_nbd

QEMU_NBD = "/usr/bin/qemu-nbd"
OURS = str(Path(sys.executable).parent / "blockexport-nbd")
REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT = 30

have_qemu = pytest.mark.skipif(not os.path.exists(QEMU_NBD), reason="qemu-nbd not installed")


def _env(extra=None, in_path=True):
    env = dict(os.environ)
    env.pop("POSIXLY_CORRECT", None)
    for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(k, None)
    dirs = [str(Path(OURS).parent), os.path.dirname(QEMU_NBD)] if in_path else []
    env["PATH"] = os.pathsep.join(dirs + [d for d in env.get("PATH", "").split(os.pathsep)
                                          if in_path or d not in (str(Path(OURS).parent),)])
    env["LC_ALL"] = "C"
    if extra:
        env.update(extra)
    return env


def _norm(text: str, prog: str) -> str:
    return text.replace(prog, "PROG")


def run_prog(prog: str, argv, cwd, env_extra=None, shell_prefix=None, pass_fds=()):
    """Run ``prog`` (a name found through PATH) -> (status, stdout, stderr), normalised."""
    cmd = [prog] + list(argv)
    if shell_prefix is not None:
        cmd = ["/bin/bash", "-c", shell_prefix, "bash"] + cmd
    p = subprocess.run(cmd, cwd=cwd, env=_env(env_extra), capture_output=True, text=True,
                       errors="surrogateescape", timeout=RUN_TIMEOUT, pass_fds=pass_fds)
    return p.returncode, _norm(p.stdout, prog), _norm(p.stderr, prog)


def compare(argv, cwd, **kw):
    theirs = run_prog("qemu-nbd", argv, cwd, **kw)
    ours = run_prog("blockexport-nbd", argv, cwd, **kw)
    assert ours == theirs, "argv %r" % (argv,)
    return ours


@pytest.fixture
def workdir(tmp_path):
    """cwd with a 1 MiB raw image "x" (and nothing else)."""
    with open(tmp_path / "x", "wb") as f:
        f.truncate(1024 * 1024)
    return tmp_path


LONG = "a" * 4097
MB_NAME = "\u00e9" * 2049          # 4098 bytes in UTF-8

# argv that fail while parsing/checking the command line (nothing is opened or listened on)
PARSE_ERRORS = [
    ["-e", "-1", "x"], ["-e", "abc", "x"], ["-e", "5k", "x"], ["-e", "2147483648", "x"],
    ["-e", "0x", "x"], ["-e", "", "x"], ["-e", "5 ", "x"], ["-e", "08", "x"],
    ["-k", "rel.sock", "x"], ["--socket=rel.sock", "x"],
    [], ["a", "b"], ["-x", "-V"],
    ["-n", "--cache=none", "x"], ["--cache=none", "-n", "x"], ["--cache=bad", "x"],
    ["--cache", "", "x"],
    ["--aio=foo", "x"], ["--aio=threads", "--aio=native", "x"],
    ["--discard=foo", "x"], ["--discard=unmap", "--discard=ignore", "x"],
    ["--detect-zeroes=foo", "x"], ["--detect-zeroes=unmap", "x"],
    ["--detect-zeroes=unmap", "--discard=unmap", "x"],
    ["--tls-authz", "a", "x"], ["--tls-hostname", "h", "x"], ["--tls-hostname", "h", "-L"],
    ["--tls-creds", "c", "x"], ["--tls-creds", "c", "-L"],
    ["--tls-creds", "c", "--tls-authz", "a", "-L"],
    ["--tls-creds", "c", "--tls-hostname", "h", "x"],
    ["--tls-creds", "c", "-c", "/dev/nbd0", "x"],
    ["-x", LONG, "x"], ["-D", LONG, "x"], ["-x", MB_NAME, "x"],
    ["--bogus"], ["--bogus=1", "x"], ["-Z"], ["-rZ", "x"], ["--port"], ["-p"], ["-rx"],
    ["--p=1", "x"], ["--s", "x"], ["--t=a", "x"], ["--c", "x"], ["--d", "x"], ["--tls", "x"],
    ["--a", "x"], ["--b", "x"], ["--f", "x"], ["--l", "x"], ["--o", "x"], ["--v", "x"],
    ["--de", "x"], ["--pe=1", "x"],
    ["--fork=1", "x"], ["--help=x"], ["--image-opts=on", "x"],
    ["--po=abc", "--sh=-1", "x"], ["--sha", "-3", "x"],
    ["-o", "abc", "x"], ["-o", "1k", "x"], ["-o", "", "x"],
    ["--object", "foo,id=x"], ["--object", "foo,id=x", "-e", "-1"], ["--object", "id=x", "x"],
    ["--object", "", "x"], ["--object", "secret,id", "x"], ["--object", "secret,a.b=1,a=2", "x"],
    ["--object", "secret,a=2,a.b=1", "x"], ["--object", "secret,=x", "x"],
    ["--object", ",id=x", "x"], ["--object", "secret,a@b=1", "x"],
    ["--object", "secret," + "a" * 130 + "=1", "x"], ["--object", "foo=bar,secret", "x"],
    ["--object", "secret,a..b=1", "x"], ["--object", "secret,1a=1", "x"],
    ["--object", '{"qom-type":"foo"}', "x"], ["--object", "qom-type=foo,id=x", "x"],
    ["--object", "tls-creds-x509,id=t", "x"], ["--object", "tls-creds-x509,id=t,dir=/nonexist", "x"],
    ["--object", "tls-creds-x509,id=t,endpoint=server,dir=/", "x"],
    ["--object", "tls-creds-x509,id=t,loaded=on,dir=/", "x"],
    ["--object", "tls-creds-psk,id=t,dir=/nonexist", "x"],
    ["--object", "tls-creds-psk,id=t,endpoint=server,username=u,dir=/", "x"],
    ["--object", "authz-simple,id=a", "x"], ["--object", "authz-list,id=a,rules.0.match=x", "x"],
    ["--object", "authz-list,id=a,policy=maybe", "x"],
    ["--object", '{"qom-type":"authz-list","id":"a","rules":[{"match":"x"}]}', "x"],
    ["--object", "secret,id=s,data=x,keyid=k", "x"],
    ["--object", "authz-simple,id=a,identity=x", "--object", "authz-simple,id=a,identity=y", "x"],
    ["-L", "x"], ["-L", "-x", ""], ["-L", "-D", "d"], ["-L", "-o", "1"], ["-L", "-f", "raw"],
    ["-L", "-A"], ["-L", "-B", "b"], ["-L", "-l", "s"], ["-L", "--aio=threads"],
    ["-L", "--discard=ignore"], ["-L", "-n"], ["-L", "--cache=unsafe"],
    ["-L", "-c", "/dev/nbd0"], ["-L", "-d"], ["-L", "--fork"], ["-L", "--fork", "x"],
    ["--selinux-label", "foo", "x"],
    ["-T", "foo=bar", "x"], ["-T", "events=/nonexist", "x"], ["-T", "file=/nonexistdir/f", "x"],
    ["-T", "bogus", "-e", "-1", "x"], ["-T", "-bogus", "--bogus"], ["-T", "bog*", "--bogus"],
    ["-T", "file=/dev/null,help"],
    ["-l", "snapshot.foo=1", "x"], ["-e", "-1", "-h"], ["-e", "\udcff\udcfe", "x"], ["--bogus", "-h"], ["-e", "-1", "-V"],
]


@have_qemu
@pytest.mark.parametrize("argv", PARSE_ERRORS, ids=lambda a: " ".join(a)[:60] or "(none)")
def test_parse_errors_match_qemu(argv, workdir):
    status, out, err = compare(argv, workdir)
    assert status != 0


@have_qemu
def test_posixly_correct_stops_at_first_operand(workdir):
    status, _, err = compare(["x", "-r"], workdir, env_extra={"POSIXLY_CORRECT": "1"})
    assert status == 1 and "Invalid number of arguments" in err


@have_qemu
def test_full_program_path_in_messages(workdir):
    """getopt's messages name argv[0] as invoked; error_report uses the base name."""
    p = subprocess.run([OURS, "--bogus"], capture_output=True, text=True,
                       env=_env(in_path=False),
                       timeout=RUN_TIMEOUT, cwd="/")
    q = subprocess.run([QEMU_NBD, "--bogus"], capture_output=True, text=True, env=_env(),
                       timeout=RUN_TIMEOUT, cwd="/")
    assert p.returncode == q.returncode == 1
    # run by path from a directory outside PATH: both show the path they were given
    assert p.stderr.replace(OURS, "P").replace("blockexport-nbd", "N") == \
        q.stderr.replace(QEMU_NBD, "P").replace("qemu-nbd", "N")


# --- socket activation -------------------------------------------------------------------------

def _sa_compare(argv, workdir, nfds=1, close=(), non_socket=False, listen_fds=None):
    """Run both programs with LISTEN_PID=<their pid>, LISTEN_FDS=nfds and listening sockets
    (or a regular file) on fds 3.. (minus those in ``close``)."""
    listen_fds = nfds if listen_fds is None else listen_fds
    results = []
    for prog in ("qemu-nbd", "blockexport-nbd"):
        objs = []
        try:
            redirs = []
            for i in range(listen_fds):
                target = 3 + i
                if target in close:
                    redirs.append("%d<&-" % target)
                    continue
                if non_socket:
                    f = open(workdir / "x", "rb")
                    objs.append(f)
                    fd = f.fileno()
                else:
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.bind(str(workdir / ("sa-%s-%d.sock" % (prog, i))))
                    s.listen()
                    objs.append(s)
                    fd = s.fileno()
                redirs.append("%d<&%d" % (target, fd))
            for target in close:
                if "%d<&-" % target not in redirs:
                    redirs.append("%d<&-" % target)
            script = 'LISTEN_PID=$$ LISTEN_FDS=%d exec "$@" %s' % (nfds, " ".join(redirs))
            results.append(run_prog(prog, argv, workdir, shell_prefix=script,
                                    pass_fds=tuple(o.fileno() for o in objs)))
        finally:
            for o in objs:
                o.close()
    assert results[1] == results[0], "argv %r" % (argv,)
    return results[1]


SA_ERRORS = [
    (["-k", "/tmp/s.sock", "-f", "raw", "x"], {}),
    (["-p", "1", "x"], {}),
    (["-b", "127.0.0.1", "x"], {}),
    (["-k", "/tmp/s.sock", "-p", "1", "x"], {}),
    (["--selinux-label", "l", "x"], {}),
    (["-c", "/dev/nbd0", "x"], {}),
    (["-L"], {}),
    (["-L", "-k", "/x"], {}),
    (["-f", "raw", "x"], {"nfds": 2}),
    (["-p", "1", "x"], {"nfds": 2}),
    (["-f", "raw", "x"], {"close": (3,)}),
    (["-p", "1", "x"], {"close": (3,)}),
    (["-f", "raw", "x"], {"nfds": 2, "listen_fds": 1, "close": (4,)}),
    ([], {"close": (3,)}),
]


@have_qemu
@pytest.mark.parametrize("argv,kw", SA_ERRORS, ids=lambda v: repr(v)[:50])
def test_socket_activation_errors_match_qemu(argv, kw, workdir):
    status, _, _ = _sa_compare(argv, workdir, **kw)
    assert status == 1


@have_qemu
def test_socket_activation_ignored_for_other_pid(workdir):
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1"}
    status, _, err = compare(["-p", "1", "-e", "-1", "x"], workdir, env_extra=env)
    assert status == 1 and "Invalid shared device number" in err


# --- errors after listening / while opening ------------------------------------------------------

def _busy_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


OPEN_ERRORS = [
    ["-f", "raw", "--image-opts", "-k", "{d}/s.sock", "x"],
    ["-f", "raw", "-k", "{d}/s.sock", "nonexist"],
    ["-k", "{d}/s.sock", "nonexist"],
    ["-f", "bogus", "-k", "{d}/s.sock", "x"],
    ["-f", "raw", "-k", "{d}/s.sock", "abc:def"],
    ["-k", "{d}/s.sock", "abc:def"],
    ["-f", "raw", "-k", "{d}/s.sock", "file:nonexist"],
    ["-f", "raw", "-k", "{d}/s.sock", "null-co://x"],
    ["--image-opts", "-k", "{d}/s.sock", "driver=raw,file.driver=file,file.filename=nonexist"],
    ["--image-opts", "-k", "{d}/s.sock", "driver=raw,file.driver=file,file.filename=x,"
     "read-only=foo"],
    ["--image-opts", "-k", "{d}/s.sock", "driver=raw,file.driver=file,file.filename=x,"
     "cache.direct=foo"],
    ["--image-opts", "-k", "{d}/s.sock", "driver=raw,file.driver=file,file.filename=x,"
     "offset=abc"],
    ["--image-opts", "-k", "{d}/s.sock", "driver=raw,file.driver=file,file.filename=x,"
     "offset=16E"],
    ["--image-opts", "-k", "{d}/s.sock", "driver=raw,file.driver=file,"
     "file.filename=nonexist,,a"],
    ["--image-opts", "-k", "{d}/s.sock", "raw,file.driver=file,file.filename=nonexist"],
    ["--image-opts", "-k", "{d}/s.sock", ""],
    ["--image-opts", "-k", "{d}/s.sock", "driver=raw,file.driver=file,file.filename=x,bogus=1"],
    ["--image-opts", "-k", "{d}/s.sock", "driver=raw,file.driver=file,file.filename=x,"
     "file.bogus=1"],
    ["--image-opts", "-k", "{d}/s.sock", "driver=raw,file.driver=file,file.filename=x,"
     "cache.bogus=1"],
    ["--image-opts", "-k", "{d}/s.sock", "driver=raw,file.driver=bogus,file.filename=x"],
    ["--image-opts", "-k", "{d}/s.sock", "driver=raw,file.driver=file,file.filename=x,"
     "read-only"],
    ["--image-opts", "-k", "{d}/s.sock", "driver=raw,file.driver=file,file.filename=x,"
     "offset=0x10k,size=abc"],
    ["-k", "{d}/s.sock", "json:{\"driver\":\"bogus\"}"],
    ["--aio=native", "-f", "raw", "-k", "{d}/s.sock", "x"],
    ["-f", "null-co", "-k", "{d}/s.sock", "null-co://x"],
    ["-f", "raw", "-k", "{d}/s.sock", "/"],
    ["--image-opts", "-k", "{d}/s.sock", "file.driver=file,file.filename=nonexist"],
    ["-k", "{d}/s.sock", "json:{\"driver\":\"raw\",\"file\":{\"driver\":\"file\","
     "\"filename\":\"nonexist\"}}"],
    ["-f", "raw", "-o", "2000000", "-k", "{d}/s.sock", "x"],
    ["-f", "raw", "-o", "-1", "-k", "{d}/s.sock", "x"],
    ["-B", "bm", "-f", "raw", "-k", "{d}/s.sock", "x"],
    ["-l", "snap", "-f", "raw", "-k", "{d}/s.sock", "x"],
    ["-l", "snapshot.id=1", "-r", "-f", "raw", "-k", "{d}/s.sock", "x"],
    # -s: the snapshot is looked up in the (empty) temporary overlay
    ["-s", "-l", "snap", "-f", "raw", "-k", "{d}/s.sock", "x"],
    ["-s", "-r", "-f", "raw", "-o", "2000000", "-k", "{d}/s.sock", "x"],
    ["-s", "-f", "raw", "-k", "{d}/s.sock", "nonexist"],
    ["-b", "127.0.0.1", "-p", "{busy}", "-f", "raw", "x"],
    ["-b", "127.0.0.1", "-p", "{busy}", "-f", "raw", "--image-opts", "x"],
    ["-k", "{d}/nonexistdir/s", "x"],
    ["-k", "/tmp/" + "a" * 120, "-f", "raw", "x"],
    ["-p", "abc", "x"],
    ["-p", "-1", "x"],
    ["-b", "1.2.3.4", "-p", "0", "x"],
    ["--pid-file", "{d}/nonexistdir/p", "-f", "raw", "-k", "{d}/s.sock", "x"],
]


@have_qemu
@pytest.mark.parametrize("argv", OPEN_ERRORS, ids=lambda a: " ".join(a)[:70])
def test_open_errors_match_qemu(argv, workdir):
    busy = _busy_port()
    try:
        argv = [a.replace("{d}", str(workdir)).replace("{busy}", str(busy.getsockname()[1]))
                for a in argv]
        status, _, _ = compare(argv, workdir)
    finally:
        busy.close()
    assert status == 1


@have_qemu
def test_socket_activation_non_socket_fd(workdir):
    status, _, err = _sa_compare(["-f", "raw", "nonexist"], workdir, non_socket=True)
    assert status == 1 and "Failed to use socket activation" in err


# --- our own deviations: unsupported features fail clearly ---------------------------------------

def _ours(argv, cwd):
    return run_prog("blockexport-nbd", argv, cwd)


@pytest.mark.parametrize("value", ["-1", "abc", "2147483648", "", "5s", "1.5"])
def test_handshake_limit_invalid(workdir, value):
    """QEMU 9.1's --handshake-limit: a C int >= 0 (qemu_strtoi, base 0), else this error."""
    assert _ours(["--handshake-limit", value, "x"], workdir) == \
        (1, "", "PROG: Invalid handshake limit '%s'\n" % value)


def test_kernel_device_not_available(workdir):
    for argv in (["-c", "/dev/nbd0", "x"], ["-d", "/dev/nbd0"], ["-d", "x"]):
        status, out, err = _ours(argv, workdir)
        assert (status, out, err) == (1, "", "PROG: Kernel /dev/nbdN support not available\n")


@have_qemu
def test_snapshot_temp_dir_missing(workdir):
    """-s creates its overlay in $TMPDIR: a missing directory is qemu-nbd's error (the
    random file name aside)."""
    import re
    argv = ["-s", "-r", "-f", "raw", "-k", str(workdir / "s.sock"), "x"]
    env = {"TMPDIR": str(workdir / "nonexist")}
    got = [run_prog(p, argv, workdir, env_extra=env) for p in ("qemu-nbd", "blockexport-nbd")]
    got = [(st, out, re.sub(r"/vl\.[A-Za-z0-9]{6}'", "/vl.XXXXXX'", err))
           for st, out, err in got]
    assert got[0] == got[1]
    assert got[1] == (1, "", "PROG: Failed to blk_new_open 'x': Could not open temporary file "
                             "'%s/nonexist/vl.XXXXXX': No such file or directory\n" % workdir)


def test_selinux_label_not_supported(workdir):
    status, _, err = _ours(["--selinux-label", "l", "-k", "/tmp/s", "x"], workdir)
    assert (status, err) == (1, "PROG: SELinux support not enabled in this binary\n")


def test_version_shape(workdir):
    status, out, err = _ours(["-V"], workdir)
    first = out.splitlines()[0]
    assert status == 0 and err == ""
    assert first.startswith("PROG 0.1.0 ") and "qemu-nbd 7.2" in first


def test_trace_help_lists_no_events(workdir):
    assert _ours(["-T", "enable=help"], workdir) == (0, "", "")
    assert _ours(["-T", "help"], workdir) == (0, "", "")


def test_object_help(workdir):
    status, out, err = _ours(["--object", "help"], workdir)
    from blockexport.objects import OBJECT_TYPES
    assert (status, err) == (0, "")
    assert out == "List of user creatable objects:\n" + "".join(
        "  %s\n" % t for t in sorted(OBJECT_TYPES))
    assert "  tls-creds-x509\n" in out and "  authz-list\n" in out


@have_qemu
def test_help_lists_the_same_options_in_the_same_order(workdir):
    import re
    _, ours, _ = run_prog("blockexport-nbd", ["-h"], workdir)
    _, theirs, _ = run_prog("qemu-nbd", ["--help"], workdir)
    pat = re.compile(r"^\s+(?:(-\w), )?(--[\w-]+)", re.M)
    # --handshake-limit is QEMU 9.1's (CVE-2024-7409), listed after --description as there
    newer = ("", "--handshake-limit")
    mine = pat.findall(ours)
    assert mine[mine.index(newer) - 1] == ("-D", "--description")
    assert [o for o in mine if o != newer] == pat.findall(theirs)
    assert ours.splitlines()[:2] == theirs.splitlines()[:2]


# --- end to end ------------------------------------------------------------------------------

def _pidfd_wait(pid: int, timeout: float = 20.0, check: bool = True) -> bool:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        r, _, _ = select.select([fd], [], [], timeout)
        assert r or not check, "process %d did not exit" % pid
        return bool(r)
    finally:
        os.close(fd)


def _stop_daemon(pid: int, strict: bool = True) -> None:
    """SIGTERM and wait.  qemu-nbd 7.2 loses a SIGTERM that arrives just before its main
    loop starts (it sets state=RUNNING after installing the handler), so teardown of
    oracle daemons (strict=False) falls back to SIGKILL."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if not _pidfd_wait(pid, 20.0 if strict else 5.0, check=strict):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        _pidfd_wait(pid)


class Daemons:
    def __init__(self):
        self.pid_files = []

    def track(self, pid_file: Path):
        self.pid_files.append(pid_file)

    def stop_all(self):
        for pf in self.pid_files:
            try:
                pid = int(pf.read_text())
            except (OSError, ValueError):
                continue
            _stop_daemon(pid, strict=False)


@pytest.fixture
def daemons():
    d = Daemons()
    try:
        yield d
    finally:
        d.stop_all()


def _nbd():
    return pytest.importorskip("nbd")


def _image(path: Path, size=1024 * 1024):
    data = bytes(range(256)) * (size // 256)
    path.write_bytes(data)
    return data


def test_fork_pidfile_serve_and_stop(tmp_path, daemons):
    nbd = _nbd()
    data = _image(tmp_path / "disk.img")
    sock = tmp_path / "s.sock"
    pidf = tmp_path / "pid"
    daemons.track(pidf)
    status, out, err = _ours(["--fork", "--pid-file", str(pidf), "-f", "raw", "-k", str(sock),
                              "-x", "name", "-D", "the description", "disk.img"], tmp_path)
    assert (status, out, err) == (0, "", "")
    pid = int(pidf.read_text())
    assert os.readlink("/proc/%d/cwd" % pid) == "/"
    h = nbd.NBD()
    h.set_export_name("name")
    h.set_full_info(True)
    h.connect_unix(str(sock))
    try:
        assert h.get_size() == len(data)
        assert h.pread(4096, 8192) == data[8192:8192 + 4096]
        assert not h.is_read_only()
        assert not h.can_multi_conn()
        assert h.get_export_description() == "the description"
    finally:
        h.shutdown()
    # -t not given: the server leaves after its last client
    _pidfd_wait(pid)
    assert not sock.exists()
    assert not pidf.exists()


def test_read_only_offset_shared(tmp_path, daemons):
    nbd = _nbd()
    data = _image(tmp_path / "disk.img")
    sock = tmp_path / "s.sock"
    pidf = tmp_path / "pid"
    daemons.track(pidf)
    status, _, err = _ours(["--fork", "--pid-file", str(pidf), "-r", "-o", "65536", "-e", "2",
                            "-t", "-f", "raw", "-k", str(sock), "disk.img"], tmp_path)
    assert (status, err) == (0, "")
    h = nbd.NBD()
    h.connect_unix(str(sock))
    try:
        assert h.is_read_only()
        assert h.can_multi_conn()
        assert h.get_size() == len(data) - 65536
        assert h.pread(512, 0) == data[65536:65536 + 512]
    finally:
        h.shutdown()
    pid = int(pidf.read_text())
    _stop_daemon(pid)
    assert not sock.exists() and not pidf.exists()


@have_qemu
@pytest.mark.parametrize("prog", ["qemu-nbd", "blockexport-nbd"])
def test_fork_parent_fails_on_any_startup_output(prog, workdir, daemons):
    """A daemon that printed anything while starting (here: the format-probing warning)
    makes the parent exit 1, although the daemon keeps serving — qemu-nbd's rule."""
    pidf = workdir / ("pid-" + prog)
    daemons.track(pidf)
    status, out, err = run_prog(prog, ["--fork", "--pid-file", str(pidf), "-k",
                                       str(workdir / (prog + ".sock")), "x"], workdir)
    assert status == 1 and out == ""
    assert err.startswith("WARNING: Image format was not specified for 'x' and probing "
                          "guessed raw.\n")
    assert pidf.exists()


@have_qemu
def test_fork_startup_error_relayed(workdir):
    status, out, err = compare(["--fork", "-f", "raw", "-k", str(workdir / "s.sock"),
                                "nonexist"], workdir)
    assert status == 1 and "Failed to blk_new_open 'nonexist'" in err


def test_socket_activation_serves_and_exits_after_last_client(tmp_path):
    nbd = _nbd()
    data = _image(tmp_path / "disk.img")
    path = tmp_path / "sa.sock"
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(str(path))
    lsock.listen()
    script = 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@" 3<&%d' % lsock.fileno()
    proc = subprocess.Popen(["/bin/bash", "-c", script, "bash", OURS, "-f", "raw", "disk.img"],
                            cwd=tmp_path, env=_env(), pass_fds=(lsock.fileno(),),
                            stderr=subprocess.PIPE, text=True)
    lsock.close()
    try:
        h = nbd.NBD()
        h.connect_unix(str(path))      # queued in the backlog until the server accepts
        try:
            assert h.get_size() == len(data)
            assert h.pread(1024, 0) == data[:1024]
        finally:
            h.shutdown()
        assert proc.wait(timeout=RUN_TIMEOUT) == 0
        assert proc.stderr.read() == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_tcp_listen_and_sigterm(tmp_path, daemons):
    nbd = _nbd()
    _image(tmp_path / "disk.img")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    pidf = tmp_path / "pid"
    daemons.track(pidf)
    status, _, err = _ours(["--fork", "--pid-file", str(pidf), "-b", "127.0.0.1",
                            "--port=%d" % port, "-t", "-f", "raw", "disk.img"], tmp_path)
    assert (status, err) == (0, "")
    h = nbd.NBD()
    h.connect_tcp("127.0.0.1", str(port))
    h.shutdown()
    pid = int(pidf.read_text())
    os.kill(pid, 0)                    # -t: still running after the client left
    _stop_daemon(pid)
    assert not pidf.exists()


# --- parsing units --------------------------------------------------------------------------

def _parse(argv):
    return qemu_nbd.parse_args(argv, qemu_nbd.Reporter("blockexport-nbd"))


@pytest.mark.parametrize("argv", [
    ["-p10809", "x"], ["-p", "10809", "x"], ["--port=10809", "x"], ["--port", "10809", "x"],
    ["--po=10809", "x"], ["x", "-p", "10809"], ["-rtp10809", "x"],
])
def test_port_spellings(argv):
    assert _parse(argv).port == "10809"


def test_defaults():
    o = _parse(["x"])
    assert (o.filename, o.export_name, o.shared, o.persistent, o.read_only) == ("x", "", 1,
                                                                               False, False)
    assert o.bind is None and o.port is None and o.fmt is None and o.description is None
    assert o.detect_zeroes == "off" and o.discard is None and o.aio is None
    assert o.backlog() == 1
    assert _parse(["-t", "-e", "3", "x"]).backlog() == socket.SOMAXCONN
    assert _parse(["-e", "0", "x"]).backlog() == socket.SOMAXCONN
    assert _parse(["-e", "0x10", "x"]).shared == 16
    assert _parse(["-e", " 010", "x"]).shared == 8


@pytest.mark.parametrize("argv,expect", [
    (["-n"], (True, False, False)),
    (["--cache=none"], (True, False, False)),
    (["--cache=off"], (True, False, False)),
    (["--cache=writeback"], (False, False, False)),
    (["--cache=writethrough"], (False, False, True)),
    (["--cache=directsync"], (True, False, True)),
    (["--cache=unsafe"], (False, True, False)),
    ([], (False, False, False)),
])
def test_cache_modes(argv, expect):
    o = _parse(argv + ["x"])
    assert (o.cache_direct, o.cache_no_flush, o.writethrough) == expect


def test_options_stored():
    o = _parse(["-r", "-A", "-B", "b1", "--bitmap=b2", "-x", "e", "-D", "d", "-o", "0x200",
                "--aio=native", "--discard=on", "--detect-zeroes=unmap", "-f", "raw",
                "--image-opts", "-T", "x*", "-v", "--fork", "--pid-file", "p", "x"])
    assert o.read_only and o.allocation_depth and o.bitmaps == ["b1", "b2"]
    assert (o.export_name, o.description, o.offset) == ("e", "d", 512)
    assert (o.aio, o.discard, o.detect_zeroes, o.fmt) == ("native", "unmap", "unmap", "raw")
    assert o.image_opts and o.verbose and o.fork and o.pid_file == "p"
    assert _parse(["-l", "snap", "x"]).read_only
    assert _parse(["-o", "-1", "x"]).offset == 2**64 - 1


def test_getopt_operands_and_double_dash():
    ops = []
    got = list(qemu_nbd.getopt_long(["a", "-r", "--", "-x", "b"], qemu_nbd.SHORT_OPTS,
                                    qemu_nbd.LONG_OPTS, "p", ops, posixly_correct=False))
    assert got == [("r", None)] and ops == ["a", "-x", "b"]
    ops = []
    got = list(qemu_nbd.getopt_long(["a", "-r"], qemu_nbd.SHORT_OPTS, qemu_nbd.LONG_OPTS, "p",
                                    ops, posixly_correct=True))
    assert got == [] and ops == ["a", "-r"]
    ops = []
    got = list(qemu_nbd.getopt_long(["-", "--export-name=", "--vers"], qemu_nbd.SHORT_OPTS,
                                    qemu_nbd.LONG_OPTS, "p", ops, posixly_correct=False))
    assert got == [("x", ""), ("V", None)] and ops == ["-"]


# --- -L -----------------------------------------------------------------------------------------

@have_qemu
def test_list_connection_errors_match_qemu(workdir):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    status, _, err = compare(["-L", "-b", "127.0.0.1", "-p", str(port)], workdir)
    assert status == 1 and "Connection refused" in err
    status, _, err = compare(["-L", "-k", str(workdir / "nonexist.sock")], workdir)
    assert status == 1 and "No such file or directory" in err


@have_qemu
def test_list_matches_qemu(workdir, daemons):
    sock = workdir / "q.sock"
    pidf = workdir / "qpid"
    daemons.track(pidf)
    status, _, err = run_prog("qemu-nbd", ["--fork", "--pid-file", str(pidf), "-t", "-e", "3",
                                           "-r", "-f", "raw", "-k", str(sock), "-x", "name",
                                           "-D", "some text", "-A", "x"], workdir)
    assert (status, err) == (0, "")
    status, out, err = compare(["-L", "-k", str(sock)], workdir)
    assert status == 0 and "exports available: 1" in out and "some text" in out
