"""The runner shared by scripts/bench-nbd and scripts/bench-tls (Python 3 stdlib only).

NBD servers started in their own sessions and stopped with their whole process group, ready
once they send the NBD greeting; the cell matrix (fio's nbd engine, nbdcopy); server CPU from
/proc over the server's session; servers interleaved per cell with the order alternating per
repetition; tables of medians and of medians of per-repetition ratios; the --json layout
scripts/bench-ratios reads: {"raw": {server: {cell: [{"iops", "mibs", "srv_cores"}, ...]}}}.
"""
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")
MiB = 1024 * 1024
#: fio cells: (rw, block size, iodepth)
FIO = {"seqread": ("read", "1M", 8), "seqwrite": ("write", "1M", 8),
       "randread": ("randread", "4k", 32), "randwrite": ("randwrite", "4k", 32)}
COPY = ("copy-read", "copy-write")
#: cells run only when named (-w): random 4 KiB writes with NBD_CMD_FLAG_FUA, 16 in flight on
#: one connection, by a python3-libnbd client (fio's nbd engine sends no FUA)
EXTRA = ("randwrite-fua",)
NBD_MAGIC = b"NBDMAGIC"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# --- signals: Ctrl-C, SIGTERM and SIGHUP unwind through `finally`, never mid-Popen ---------------
_deferred = 0
_pending = None


def _on_signal(signum, _frame):
    global _pending
    if _deferred:
        _pending = signum
        return
    raise KeyboardInterrupt(f"signal {signum}")


def run_main(main):
    """main() with Ctrl-C (or SIGTERM, SIGHUP) ending in a one-line message and status 130,
    after main's `finally` blocks have stopped the servers."""
    install_signal_handlers()
    try:
        main()
    except KeyboardInterrupt as e:
        log(f"interrupted ({e or 'SIGINT'}); every server started was stopped")
        sys.exit(130)


def install_signal_handlers():
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)


@contextlib.contextmanager
def signals_deferred():
    """A signal that arrives inside is raised on leaving (so a server is never started
    without being recorded for stopping)."""
    global _deferred, _pending
    _deferred += 1
    try:
        yield
    finally:
        _deferred -= 1
        if not _deferred and _pending is not None:
            signum, _pending = _pending, None
            raise KeyboardInterrupt(f"signal {signum}")


# --- measuring -----------------------------------------------------------------------------------
def session_cpu(sid: int) -> float:
    """CPU seconds of every process in session `sid` (including reaped children)."""
    total = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                data = f.read()
        except OSError:
            continue
        rest = data[data.rindex(")") + 2:].split()
        if int(rest[3]) == sid:
            total += sum(int(x) for x in rest[11:15])
    return total / CLK_TCK


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_size(s: str) -> int:
    s = s.strip().lower().rstrip("ib")
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    return int(float(s[:-1]) * mult[s[-1]]) if s[-1] in mult else int(s)


def make_image(path: Path, size: int):
    """Non-zero, non-repeating data (fresh random bytes for every MiB): no server or client
    can skip holes, zeroes or repeated blocks."""
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MiB)
            f.write(os.urandom(n))
            left -= n


class Server:
    """One NBD server: `argv` (a list, or a string run by /bin/sh) in its own session, serving
    on the unix socket `socket_path` or on 127.0.0.1:`port`."""

    def __init__(self, name, argv, log_path, socket_path=None, port=None, env=None):
        self.name, self.argv, self.log_path = name, argv, Path(log_path)
        self.socket_path, self.port = socket_path, port
        self.env = env
        self.proc = None
        self.logf = None

    def uri(self) -> str:
        if self.socket_path:
            return f"nbd+unix:///?socket={self.socket_path}"
        return f"nbd://127.0.0.1:{self.port}/"

    def command(self) -> str:
        env = "".join(f"{k}={v} " for k, v in (self.env or {}).items())
        return env + (self.argv if isinstance(self.argv, str) else " ".join(map(str, self.argv)))

    def _greeting(self) -> bool:
        family, addr = ((socket.AF_UNIX, str(self.socket_path)) if self.socket_path
                        else (socket.AF_INET, ("127.0.0.1", self.port)))
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.settimeout(5)
                s.connect(addr)
                return s.recv(8, socket.MSG_WAITALL) == NBD_MAGIC
        except OSError:
            return False

    def start(self, timeout=30.0):
        log(f"[{self.name}] {self.command()}")
        env = dict(os.environ, **self.env) if self.env else None
        with signals_deferred():
            self.logf = open(self.log_path, "wb")
            self.proc = subprocess.Popen(self.argv, shell=isinstance(self.argv, str), env=env,
                                         stdin=subprocess.DEVNULL, stdout=self.logf,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self._greeting():
            if time.monotonic() > deadline:
                raise SystemExit(f"[{self.name}] no NBD greeting after {timeout}s; "
                                 f"see {self.log_path}")
            try:
                # a bounded wait on the server itself: returns at once if it dies
                rc = self.proc.wait(0.05)
            except subprocess.TimeoutExpired:
                continue
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise SystemExit(f"[{self.name}] exited with status {rc} before serving:\n{tail}")

    def cpu(self) -> float:
        return session_cpu(self.proc.pid)

    def stop(self):
        """SIGTERM to the whole process group, SIGKILL to what is left after 5 s or after
        the leader is gone."""
        if self.proc is None:
            return
        with signals_deferred():
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    continue
            self.proc.wait()
            self.logf.close()


@contextlib.contextmanager
def scratch_dir(parent: str, prefix: str, keep: bool):
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(work, 0o755)
    try:
        yield work
    finally:
        if keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def stop_all(servers):
    errors = []
    for s in servers:
        try:
            s.stop()
        except Exception as e:          # stop the others anyway
            errors.append(f"{s.name}: {e}")
    if errors:
        log("stopping failed: " + "; ".join(errors))


# --- the cells -----------------------------------------------------------------------------------
def add_common_args(ap, default_size="1G"):
    cells = ",".join(list(FIO) + list(COPY))
    extra = ",".join(EXTRA)
    ours = REPO / ".venv" / "bin" / "blockexport-nbd"
    ap.add_argument("-r", "--reps", type=int, default=3, metavar="REPS",
                    help="repetitions (default 3)")
    ap.add_argument("-t", "--runtime", type=int, default=6, metavar="SECONDS",
                    help="seconds per cell (fio adds 1 s ramp; default 6)")
    ap.add_argument("--size", default=default_size, metavar="SIZE",
                    help=f"image size (default {default_size})")
    ap.add_argument("--image-dir", default="/dev/shm", metavar="DIR",
                    help="where the images live (default /dev/shm)")
    ap.add_argument("-w", "--workloads", default=cells, metavar="CELLS",
                    help=f"cells, comma-separated (default: all of {cells}; "
                         f"also {extra})")
    ap.add_argument("-j", "--jobs", default="1,4", metavar="N,N",
                    help="connections for the fio cells, comma-separated (default 1,4)")
    ap.add_argument("--ours", default=str(ours), metavar="PATH",
                    help="our blockexport-nbd (default .venv/bin/blockexport-nbd)")
    ap.add_argument("--qemu-nbd", default="qemu-nbd", metavar="PATH")
    ap.add_argument("--json", metavar="FILE",
                    help="write the raw results here (scripts/bench-ratios reads it)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch dir (logs, images)")


def parse_cells(ap, workloads: str, jobs: str):
    """[(workload, connections or None)], fio cells first."""
    wls = [w.strip() for w in workloads.split(",") if w.strip()]
    known = list(FIO) + list(COPY) + list(EXTRA)
    for w in wls:
        if w not in known:
            ap.error(f"unknown workload {w!r} (known: {', '.join(known)})")
    try:
        js = [int(j) for j in jobs.split(",") if j.strip()]
    except ValueError:
        ap.error(f"-j wants numbers: {jobs!r}")
    if any(j < 1 for j in js) or (not js and any(w in FIO for w in wls)):
        ap.error(f"-j wants connections >= 1: {jobs!r}")
    return [(w, j) for w in wls if w in FIO for j in js] + \
        [(w, None) for w in wls if w in COPY or w in EXTRA]


def cell_key(cell, jobs) -> str:
    return f"{cell}/{jobs}c" if jobs else cell


def need_tools(*tools):
    for tool in tools:
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed")


def run_fio(srv, cell, jobs, runtime, size, uri=None, run=None):
    rw, bs, qd = FIO[cell]
    argv = ["fio", "--name=" + cell, "--ioengine=nbd", "--uri=" + (uri or srv.uri()),
            f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}", f"--numjobs={jobs}",
            "--group_reporting", "--time_based", f"--runtime={runtime}", "--ramp_time=1",
            "--randrepeat=0", "--output-format=json"]
    if rw in ("read", "write") and jobs > 1:
        argv += [f"--size={size // jobs}", f"--offset_increment={size // jobs}"]
    else:
        argv += [f"--size={size}"]
    run = run or (lambda a: subprocess.run(a, capture_output=True, text=True))
    c0, t0 = srv.cpu(), time.monotonic()
    p = run(argv)
    c1, t1 = srv.cpu(), time.monotonic()
    if p.returncode != 0:
        raise SystemExit(f"fio failed on {srv.name}/{cell}: {p.stdout[-1500:]}{p.stderr[-1500:]}")
    d = json.loads(p.stdout[p.stdout.index("{"):])
    side = d["jobs"][0]["read" if rw in ("read", "randread") else "write"]
    return {"iops": side["iops"], "mibs": side["bw"] / 1024.0,
            "srv_cores": (c1 - c0) / (t1 - t0)}


def run_copy(srv, cell, src, size, runtime, uri=None):
    """nbdcopy server -> null: (copy-read) or the file `src` -> server (copy-write), whole
    copies repeated until `runtime` seconds have passed."""
    uri = uri or srv.uri()
    argv = ["nbdcopy", uri, "null:"] if cell == "copy-read" else ["nbdcopy", str(src), uri]
    c0, t0 = srv.cpu(), time.monotonic()
    copies = 0
    while True:
        p = subprocess.run(argv, capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"nbdcopy failed on {srv.name}/{cell}: {p.stderr[-2000:]}")
        copies += 1
        if time.monotonic() - t0 >= runtime:
            break
    c1, t1 = srv.cpu(), time.monotonic()
    return {"iops": None, "mibs": copies * size / MiB / (t1 - t0),
            "srv_cores": (c1 - c0) / (t1 - t0)}


_FUA_CLIENT = r"""
import random, sys, time
sys.path.append("/usr/lib/python3/dist-packages")
import nbd
uri, size, runtime = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
st = [0, 0, 0]                    # in flight, done, failed


def done(err):
    st[0] -= 1
    st[1] += 1
    st[2] += err.value != 0
    return 1


try:
    h = nbd.NBD()
    h.connect_uri(uri)
    blocks = min(size, h.get_size()) // 4096
    buf = nbd.Buffer.from_bytearray(bytearray(random.randbytes(4096)))
    rnd = random.Random()
    t0 = time.monotonic()
    end = t0 + runtime
    while time.monotonic() < end:
        while st[0] < 16:
            h.aio_pwrite(buf, rnd.randrange(blocks) * 4096, completion=done,
                         flags=nbd.CMD_FLAG_FUA)
            st[0] += 1
        h.poll(-1)
    while st[0]:
        h.poll(-1)
    t1 = time.monotonic()
    h.shutdown()
except nbd.Error as e:
    sys.exit(str(e))
if st[2]:
    sys.exit(f"{st[2]} of {st[1]} FUA writes failed")
print(st[1] / (t1 - t0))
"""


def run_fua(srv, runtime, size, uri=None):
    """The randwrite-fua cell: the python3-libnbd client above, in its own process."""
    argv = [sys.executable, "-c", _FUA_CLIENT, uri or srv.uri(), str(size), str(runtime)]
    c0, t0 = srv.cpu(), time.monotonic()
    p = subprocess.run(argv, capture_output=True, text=True)
    c1, t1 = srv.cpu(), time.monotonic()
    if p.returncode != 0:
        raise SystemExit(f"the FUA client failed on {srv.name}: {p.stderr[-1500:]}")
    iops = float(p.stdout.split()[-1])
    return {"iops": iops, "mibs": iops * 4096 / MiB, "srv_cores": (c1 - c0) / (t1 - t0)}


def run_matrix(servers, cells, reps, run_cell):
    """Every cell on every server, servers back to back per cell, their order reversed every
    other repetition.  run_cell(server, workload, jobs) -> result dict."""
    raw = {s.name: {} for s in servers}
    for rep in range(reps):
        order = servers if rep % 2 == 0 else servers[::-1]
        for cell, jobs in cells:
            key = cell_key(cell, jobs)
            for s in order:
                log(f"rep {rep + 1}/{reps} {key} {s.name}")
                raw[s.name].setdefault(key, []).append(run_cell(s, cell, jobs))
    return raw


# --- tables --------------------------------------------------------------------------------------
def value(cell: str, r: dict) -> float:
    return r["iops"] if cell.startswith("rand") else r["mibs"]


def fmt(cell: str, runs: list) -> str:
    v = statistics.median(value(cell, r) for r in runs)
    cores = statistics.median(r["srv_cores"] for r in runs)
    return (f"{v / 1000:.1f}k IOPS" if cell.startswith("rand") else f"{v:.0f} MiB/s") + \
        f" ({cores:.2f}c)"


def ratio(cell, a_runs, b_runs) -> str:
    """The median of the per-repetition ratios a/b (same run, same repetition)."""
    rs = [value(cell, a) / value(cell, b) for a, b in zip(a_runs, b_runs) if value(cell, b)]
    return f"x{statistics.median(rs):.2f}" if rs else "-"


def print_table(raw, keys, names, ratios=()):
    """A markdown table: per cell the medians of `names` (value and server cores), then one
    column per (title, a, b, bold) in `ratios`: the median of a/b."""
    head = "| cell | " + " | ".join([*names, *(t for t, _, _, _ in ratios)]) + " |"
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for key in keys:
        cell = key.split("/")[0]
        row = [fmt(cell, raw[n][key]) for n in names]
        for _title, a, b, bold in ratios:
            r = ratio(cell, raw[a][key], raw[b][key])
            row.append(f"**{r}**" if bold else r)
        print(f"| {key} | " + " | ".join(row) + " |")


def write_json(path, raw, servers, **extra):
    with open(path, "w") as f:
        json.dump({"raw": raw, "servers": {s.name: s.argv for s in servers},
                   "pids": {s.name: s.proc.pid for s in servers if s.proc}, **extra},
                  f, indent=1)
