"""scripts/bench-nbd (and scripts/bench-tls, which shares scripts/benchlib.py): tiny real runs.

Each test runs the script on a few MiB with real servers (qemu-nbd, nbdkit, our
blockexport-nbd), real fio and nbdcopy, with --image-dir in the test's tmp_path, and checks
the JSON holds a positive number for every server and cell, and that nothing it started is
left: the servers' pids are gone, no process names the scratch dir, the scratch dir is removed.
"""
from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import servers as S
from helpers.procs import oracle_missing, ours_missing, processes

REPO = Path(__file__).resolve().parents[2]
BENCH_NBD = REPO / "scripts" / "bench-nbd"
BENCH_TLS = REPO / "scripts" / "bench-tls"
RUN_TIMEOUT = 60


def need(*tools):
    problem = S.blockexport_problem()
    if problem:
        ours_missing(problem)
    for tool in tools:
        if shutil.which(tool) is None:
            oracle_missing(f"{tool} is not installed")


def leftovers(tmp_path: Path) -> list[str]:
    """Command lines of live processes that name tmp_path (servers started on its images)."""
    return [f"{pid}: {cmd}" for pid, _, cmd in processes() if str(tmp_path) in cmd]


def run(script, tmp_path, *args, timeout=RUN_TIMEOUT):
    argv = [sys.executable, str(script), "--ours", S.BLOCKEXPORT_NBD, "--image-dir",
            str(tmp_path), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def assert_clean(tmp_path, report=None):
    assert leftovers(tmp_path) == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("bench-")] == []
    for name, pid in (report or {}).get("pids", {}).items():
        assert not Path(f"/proc/{pid}").exists(), f"{name} (pid {pid}) still runs"


def check_report(report, servers, cells):
    assert list(report["raw"]) == servers
    for name in servers:
        assert sorted(report["raw"][name]) == sorted(cells), name
        for cell, runs in report["raw"][name].items():
            assert len(runs) == 1
            r = runs[0]
            value = r["iops"] if cell.startswith("rand") else r["mibs"]
            assert value > 0 and r["mibs"] > 0 and r["srv_cores"] > 0, (name, cell, r)


def bench(tmp_path, *args):
    out = tmp_path / "out.json"
    p = run(BENCH_NBD, tmp_path, "-r", "1", "-t", "1", "--size", "32M", "-j", "1",
            "--json", str(out), *args)
    assert p.returncode == 0, p.stdout + p.stderr
    report = json.loads(out.read_text())
    out.unlink()
    assert_clean(tmp_path, report)
    return report, p


def test_smoke_unix(tmp_path):
    need("fio", "nbdcopy", S.QEMU_NBD)
    report, p = bench(tmp_path, "-w", "randread,copy-read", "-s", "qemu-nbd", "-s", "ours")
    check_report(report, ["qemu-nbd", "ours"], ["randread/1c", "copy-read"])
    assert report["reference"] == "qemu-nbd" and report["transport"] == "unix"
    assert any("-k" in argv for argv in [report["servers"]["ours"]])
    # the ratio table: one row per cell, ours against the reference
    assert "| cell | ours / qemu-nbd |" in p.stdout
    assert "| randread/1c | x" in p.stdout and "| copy-read | x" in p.stdout


def test_fua_cell(tmp_path):
    """randwrite-fua (only when named): FUA writes by a python3-libnbd client; a server that
    fails them (nbdkit's error filter) fails the run with the client's count, and every
    server is stopped."""
    need(S.QEMU_NBD, "nbdkit")
    report, p = bench(tmp_path, "-w", "randwrite-fua", "-s", "qemu-nbd", "-s", "ours")
    check_report(report, ["qemu-nbd", "ours"], ["randwrite-fua"])
    assert "| randwrite-fua | x" in p.stdout
    p = run(BENCH_NBD, tmp_path, "-r", "1", "-t", "1", "--size", "8M", "-w", "randwrite-fua",
            "-s", "ours", "-S", "bad=exec nbdkit -f -U {socket} --filter=error file {image} "
                                "error-pwrite=EIO error-pwrite-rate=100%")
    assert p.returncode != 0
    assert "the FUA client failed on bad: " in p.stderr, p.stderr
    assert "FUA writes failed" in p.stderr and "Traceback" not in p.stderr
    assert_clean(tmp_path)


@pytest.mark.slow
def test_smoke_tcp_with_nbdkit(tmp_path):
    need("fio", "nbdcopy", S.QEMU_NBD, "nbdkit")
    report, p = bench(tmp_path, "--transport", "tcp", "-w", "randwrite,copy-write",
                      "-s", "qemu-nbd", "-s", "nbdkit", "-s", "ours")
    check_report(report, ["qemu-nbd", "nbdkit", "ours"], ["randwrite/1c", "copy-write"])
    nbdkit = report["servers"]["nbdkit"]
    assert nbdkit[1:3] == ["-f", "-p"] and nbdkit[4:] == ["-i", "127.0.0.1", "file",
                                                          nbdkit[-1]]
    assert "-b" in report["servers"]["ours"] and "-k" not in report["servers"]["ours"]
    assert "| cell | nbdkit / qemu-nbd | ours / qemu-nbd |" in p.stdout


@pytest.mark.slow
def test_smoke_qcow2_skips_nbdkit(tmp_path):
    need("fio", "nbdcopy", S.QEMU_NBD, "qemu-img")
    report, p = bench(tmp_path, "--format", "qcow2", "-w", "seqwrite,copy-read",
                      "-s", "qemu-nbd", "-s", "nbdkit", "-s", "ours")
    check_report(report, ["qemu-nbd", "ours"], ["seqwrite/1c", "copy-read"])
    assert "[nbdkit] skipped" in p.stderr
    assert all(argv[1:3] == ["-f", "qcow2"] for argv in report["servers"].values())


@pytest.mark.slow
def test_custom_server_and_env(tmp_path):
    """-S with placeholders, --env for that server only, --keep leaves the logs."""
    need("fio", "nbdcopy", S.QEMU_NBD)
    out = tmp_path / "out.json"
    p = run(BENCH_NBD, tmp_path, "-r", "1", "-t", "1", "--size", "8M", "-w", "copy-read",
            "-s", "ours", "-S", "custom=echo BENCH_X=${BENCH_X:-unset}; "
                                "exec qemu-nbd -f {format} -t -k {socket} {image}",
            "--env", "custom=BENCH_X=42", "--json", str(out), "--keep")
    assert p.returncode == 0, p.stdout + p.stderr
    report = json.loads(out.read_text())
    check_report(report, ["ours", "custom"], ["copy-read"])
    assert leftovers(tmp_path) == []
    (work,) = [d for d in tmp_path.iterdir() if d.name.startswith("bench-nbd-")]
    assert "BENCH_X=42" in (work / "custom.log").read_text()
    assert "BENCH_X" not in (work / "ours.log").read_text()
    assert f"qemu-nbd -f raw -t -k {work}/custom.sock {work}/custom.raw" in \
        report["servers"]["custom"]
    assert "| copy-read | x" in p.stdout
    shutil.rmtree(work)


def test_failing_server_stops_the_others(tmp_path):
    need("fio", "nbdcopy", S.QEMU_NBD)
    p = run(BENCH_NBD, tmp_path, "-r", "1", "-t", "1", "--size", "8M", "-w", "copy-read",
            "-s", "qemu-nbd", "-S", "bad=echo no-such-image >&2; exit 3")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "[bad] exited with status 3 before serving" in p.stderr and "no-such-image" in p.stderr
    assert "[qemu-nbd] qemu-nbd" in p.stderr            # it was started...
    assert_clean(tmp_path)                              # ...and stopped


def test_ctrl_c_stops_every_server(tmp_path):
    need("fio", "nbdcopy", S.QEMU_NBD)
    argv = [sys.executable, str(BENCH_NBD), "--ours", S.BLOCKEXPORT_NBD, "--image-dir",
            str(tmp_path), "-r", "1", "-t", "60", "--size", "8M", "-w", "copy-read",
            "-s", "qemu-nbd", "-s", "ours"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stderr, selectors.EVENT_READ)
        err, deadline = "", time.monotonic() + 30
        while "rep 1/1 copy-read" not in err:      # both servers up, the first cell running
            assert time.monotonic() < deadline and proc.poll() is None, err
            if sel.select(deadline - time.monotonic()):
                err += proc.stderr.readline()
        assert len(leftovers(tmp_path)) >= 3          # the script and its two servers
        proc.send_signal(signal.SIGINT)
        out, rest = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err + rest
    assert "interrupted" in rest and out == ""
    assert_clean(tmp_path)


@pytest.mark.slow
def test_bench_tls_smoke(tmp_path):
    """bench-tls runs on the shared runner (its docstring's smoke run, smaller)."""
    need("fio", "nbdcopy", "openssl", S.QEMU_NBD, *(["setpriv"] if os.geteuid() == 0 else []))
    out = tmp_path / "tls.json"
    p = run(BENCH_TLS, tmp_path, "-r", "1", "-t", "1", "--size", "16M", "-w", "copy-read",
            "--no-plain", "--json", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    report = json.loads(out.read_text())
    check_report(report, ["qemu-nbd-tls", "ours-tls"], ["copy-read"])
    assert "| copy-read |" in p.stdout and "**x" in p.stdout
    assert_clean(tmp_path, report)
