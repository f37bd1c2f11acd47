"""Every example in ``blockexport-daemon --help`` runs as written.

The examples are the lines of the help text that start with ``  $ `` (with backslash
continuations).  Each runs through bash in an empty directory that holds only the 64 MiB
``disk.img`` the text asks for; the test then checks what the example serves (the QMP
monitor on qmp.sock, the NBD export on nbd.sock) and stops it (``quit``, or SIGTERM when it
has no monitor), waiting for the process through a pidfd.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.daemons import qmp_lines
from helpers.procs import wait_pid_gone

OURS = str(Path(sys.executable).parent / "blockexport-daemon")
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
DISK_SIZE = 64 * 1024 * 1024


def _env():
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(OURS).parent), env.get("PATH", "")])
    return env


def help_text() -> str:
    return subprocess.run(["blockexport-daemon", "--help"], env=_env(), capture_output=True,
                          text=True, check=True, timeout=20).stdout


def examples(text: str) -> list[str]:
    out, cur = [], None
    for line in text.splitlines():
        if cur is not None:
            cur += "\n" + line
        elif line.startswith("  $ "):
            cur = line[4:]
        else:
            continue
        if not line.endswith("\\"):
            out.append(cur)
            cur = None
    return out


EXAMPLES = examples(help_text())


def test_help_has_examples_and_says_what_they_need():
    text = help_text()
    assert len(EXAMPLES) >= 3
    assert "disk.img" in text.split("Examples", 1)[1].split("$", 1)[0]
    assert all(e.startswith("blockexport-daemon ") for e in EXAMPLES)


def _connect(path: Path, deadline: float) -> socket.socket:
    """Connect to a unix socket the daemon is about to create (deadline-bounded polling)."""
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
            s.settimeout(10)
            return s
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: "ex%d" % EXAMPLES.index(e))
def test_help_example_runs(example, tmp_path):
    with open(tmp_path / "disk.img", "wb") as f:
        f.truncate(DISK_SIZE)
    proc = subprocess.Popen(["bash", "-c", "exec " + example], cwd=tmp_path, env=_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    pid = proc.pid
    daemonized = "--daemonize" in example
    try:
        if daemonized:
            out, err = proc.communicate(timeout=START_TIMEOUT)
            assert (proc.returncode, out, err) == (0, b"", b"")
            pid = int((tmp_path / "daemon.pid").read_text())
        deadline = time.monotonic() + START_TIMEOUT
        if "nbd.sock" in example:
            import nbd
            _connect(tmp_path / "nbd.sock", deadline).close()
            export = example.rsplit("--export", 1)[1]
            m = re.search(r"""(?:,name=|"name": ")(\w+)""", export) or \
                re.search(r"""(?:node-name=|"node-name": ")(\w+)""", export)
            h = nbd.NBD()
            h.set_export_name(m.group(1))
            h.connect_unix(str(tmp_path / "nbd.sock"))
            assert h.get_size() in (DISK_SIZE, 1 << 30)
            assert h.pread(4096, 0) == bytes(4096)
            h.shutdown()
            del h
        if "qmp.sock" in example:
            with _connect(tmp_path / "qmp.sock", deadline) as s:
                exports, quit_ = qmp_lines(s, ["query-block-exports", "quit"])
                assert quit_ == {"return": {}}
                assert len(exports["return"]) == example.count("--export")
        else:
            os.kill(pid, signal.SIGTERM)
        wait_pid_gone(pid, STOP_TIMEOUT)
        if not daemonized:
            assert proc.wait(STOP_TIMEOUT) == 0
        assert not (tmp_path / "daemon.pid").exists()
    finally:
        for p in {pid, proc.pid}:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(STOP_TIMEOUT)
