"""The fuzz targets of fuzz_targets.py, in two tiers.

* Every run (a few seconds in all): each seed and each of its prefixes (EOF at every point),
  then hypothesis inputs — random bytes and seeds with random splices — per target, and one
  short atheris run so that the slow tier's harness can't rot unnoticed.
* Slow tier (``pytest --slow``, ``BLOCKEXPORT_SLOW=1`` or ``make test-slow``): atheris,
  coverage-guided, at least ``BLOCKEXPORT_FUZZ_RUNS`` (default 10^6) inputs per target, in a
  subprocess (libFuzzer owns the process).  Counts and durations are printed at the end of
  the session ("slow tier" section) and recorded in docs/testing.md.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

# hypothesis keeps caches in ./.hypothesis even without an example database: not in the tree
set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "blockexport-hypothesis-%d"
                                     % os.getuid()))

import fuzz_targets
from fuzz_targets import TARGETS

RUNNER = Path(__file__).resolve().parent / "run_atheris.py"
SLOW_RUNS = int(os.environ.get("BLOCKEXPORT_FUZZ_RUNS", 10**6))
EXAMPLES = int(os.environ.get("BLOCKEXPORT_FUZZ_EXAMPLES", 150))

NAMES = sorted(TARGETS)


def _splice(seed: bytes, edits) -> bytes:
    data = bytearray(seed)
    for pos, chunk, replace in edits:
        pos = pos % (len(data) + 1)
        if replace:
            data[pos:pos + len(chunk)] = chunk
        else:
            data[pos:pos] = chunk
    return bytes(data)


def inputs(seeds):
    return st.one_of(
        st.binary(max_size=600),
        st.builds(_splice, st.sampled_from(seeds),
                  st.lists(st.tuples(st.integers(0, 4096), st.binary(min_size=1, max_size=12),
                                     st.booleans()), min_size=1, max_size=6)))


@pytest.mark.parametrize("name", NAMES)
def test_seeds_and_their_prefixes(name):
    target, seeds = TARGETS[name]
    for seed in seeds:
        # every prefix of short seeds; about 100 evenly spaced ones of long seeds
        stride = max(1, len(seed) // 100)
        for n in sorted(set(range(0, len(seed) + 1, stride)) | {len(seed)}):
            target(seed[:n])


@pytest.mark.parametrize("name", NAMES)
def test_hypothesis(name):
    target, seeds = TARGETS[name]

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(inputs(seeds))
    def run(data):
        target(data)

    run()


# --- atheris ---------------------------------------------------------------------------------
_DONE = re.compile(rb"Done (\d+) runs in (\d+) second")


def run_atheris(name: str, runs: int, workdir: Path, timeout: float):
    """(runs done, seconds) of one atheris run; fails with the crash input and traceback."""
    cmd = [sys.executable, str(RUNNER), name, "-runs=%d" % runs,
           "-artifact_prefix=%s/" % workdir, "-timeout=30", "-print_final_stats=1"]
    t0 = time.monotonic()
    env = dict(os.environ, BLOCKEXPORT_FUZZ_CORPUS=str(workdir / "corpus"))
    p = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, timeout=timeout)
    elapsed = time.monotonic() - t0
    out = p.stdout + p.stderr
    crashes = sorted(workdir.glob("crash-*")) + sorted(workdir.glob("timeout-*"))
    assert p.returncode == 0 and not crashes, (
        "target %s failed (exit %d); inputs: %s\n%s" % (
            name, p.returncode, [str(c) for c in crashes],
            out[-6000:].decode("utf-8", "replace")))
    m = _DONE.search(out)
    assert m, out[-2000:].decode("utf-8", "replace")
    return int(m.group(1)), elapsed


def test_atheris_harness_works(tmp_path):
    done, _ = run_atheris("server-handshake", 300, tmp_path, timeout=60)
    assert done >= 300


@pytest.mark.slow
@pytest.mark.timeout(6 * 3600)
@pytest.mark.parametrize("name", NAMES)
def test_atheris_slow(name, tmp_path, slow_report):
    done, elapsed = run_atheris(name, SLOW_RUNS, tmp_path, timeout=6 * 3600)
    slow_report.append("fuzz %-18s %10d inputs in %7.1f s (%6.0f/s)"
                       % (name, done, elapsed, done / max(elapsed, 1e-9)))
    assert done >= SLOW_RUNS


def test_targets_are_listed_in_the_module_doc():
    for name in NAMES:
        assert name in fuzz_targets.__doc__
