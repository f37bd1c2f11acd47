"""Rules of the suite itself: tests can't vanish.

Each case runs a real test of the suite in a child pytest whose plugin (written here) breaks
one thing first: our console scripts missing, our daemon's modules failing to import, or
the oracle missing.  Our own programs missing must fail the test, not skip it ("not written
yet" is long over); a missing oracle skips outside CI and fails under CI=true.  The slow
tier's marker deselects (never skips) unless asked for.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
NBD_TEST = "tests/integration/test_libnbd.py::test_pread"
QMP_TEST = "tests/qmp/test_monitor.py::test_greeting_shape"
TRANSCRIPT_TEST = "tests/qmp/test_commands_block.py::test_block_graph_transcript"

NO_NBD = "import helpers.servers as S; S.BLOCKEXPORT_NBD = '/nonexistent/blockexport-nbd'"
NO_DAEMON = ("import helpers.daemons as D; D.BLOCKEXPORT_DAEMON = '/nonexistent/bd'; "
             "D._problem.clear()")
BREAKERS = {
    "ours-missing": NO_NBD + "; " + NO_DAEMON,
    "daemon-import-fails": "import helpers.daemons as D; D._problem.clear(); "
                           "sys.modules['blockexport.daemon'] = None",
    "oracles-missing": "import helpers.servers as S; S.QEMU_NBD = '/nonexistent/qemu-nbd'; "
                       "import helpers.daemons as D; D.QSD = '/nonexistent/qsd'",
}


def run_child(tmp_path, breaker: str, args, ci: bool = False):
    plugin = tmp_path / "breaker_plugin.py"
    plugin.write_text("import sys\n\n\ndef pytest_configure(config):\n    %s\n"
                      % BREAKERS[breaker])
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "BLOCKEXPORT_SLOW")}
    if ci:
        env["CI"] = "true"
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                        "-p", "breaker_plugin", *args], cwd=TESTS.parent, env=env,
                       capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout + p.stderr


def outcome(out: str) -> dict:
    """passed / failed / skipped counts of a child run (a failure in a fixture, which pytest
    calls an error, counts as failed)."""
    counts = dict((k, int(n)) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)",
                                                     out))
    failed = counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0)
    return {"passed": counts.get("passed", 0), "failed": failed,
            "skipped": counts.get("skipped", 0)}


def test_our_programs_missing_fail(tmp_path):
    rc, out = run_child(tmp_path, "ours-missing", [NBD_TEST + "[blockexport-nbd]",
                                                   QMP_TEST + "[blockexport-daemon]",
                                                   TRANSCRIPT_TEST])
    assert rc == 1 and outcome(out) == {"passed": 0, "failed": 3, "skipped": 0}, out[-3000:]
    assert "blockexport-nbd is missing" in out and "/nonexistent/bd is missing" in out


def test_our_daemon_failing_to_import_fails(tmp_path):
    rc, out = run_child(tmp_path, "daemon-import-fails", [QMP_TEST + "[blockexport-daemon]"])
    assert rc == 1 and outcome(out) == {"passed": 0, "failed": 1, "skipped": 0}, out[-3000:]
    assert "importing blockexport-daemon's modules failed" in out


def test_oracle_missing_skips_outside_ci_fails_in_ci(tmp_path):
    tests = [NBD_TEST + "[qemu-nbd]", QMP_TEST + "[qemu-storage-daemon]"]
    rc, out = run_child(tmp_path, "oracles-missing", tests)
    assert (rc, outcome(out)) == (0, {"passed": 0, "failed": 0, "skipped": 2}), out
    # -rs prints the reasons
    assert "qemu-nbd is not installed" in out and "qemu-storage-daemon is not installed" in out
    rc, out = run_child(tmp_path, "oracles-missing", tests, ci=True)
    assert rc == 1 and outcome(out) == {"passed": 0, "failed": 2, "skipped": 0}, out[-3000:]
    assert out.count("CI=true:") >= 2


def test_slow_tier_is_deselected_unless_asked(tmp_path):
    (tmp_path / "test_tier.py").write_text(
        "import pytest\n\n\n@pytest.mark.slow\ndef test_slow():\n    pass\n\n\n"
        "def test_fast():\n    pass\n")
    (tmp_path / "conftest.py").write_text((TESTS / "conftest.py").read_text())
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "BLOCKEXPORT_SLOW")}
    env["PYTHONPATH"] = str(TESTS)

    def run(*args, **extra):
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            *args, str(tmp_path)], cwd=tmp_path,
                           env={**env, **extra}, capture_output=True, text=True, timeout=120)
        return p.stdout

    assert "1 passed, 1 deselected" in run()
    assert "2 passed" in run("--slow")
    assert "2 passed" in run(BLOCKEXPORT_SLOW="1")
    assert "1 passed, 1 deselected" in run("--slow", "-m", "slow")
