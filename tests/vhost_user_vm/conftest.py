"""The vhost-user-blk export with a real VM as its frontend: the shared harness
(``../shared/harness/vhost-user-blk-check``) boots QEMU with ``-device vhost-user-blk-pci`` on
our export, runs its checks in the guest and on the image, and prints PASS/FAIL per check.

The harness is found at ``$BLOCKEXPORT_VUBC`` or ``<repo>/../shared/harness/``; ``make test``
installs what it needs (``--setup``: qemu-system-x86, busybox-static, a Debian kernel).  Where
it or qemu-system-x86_64 is missing the tests are skipped with the reason, except under
CI=true, where that is a failure.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers.procs import REPO, die_with_parent, oracle_missing  # noqa: E402

HARNESS = os.environ.get("BLOCKEXPORT_VUBC",
                         str(REPO.parent / "shared" / "harness" / "vhost-user-blk-check"))
#: one harness run: a TCG boot takes 6-13 s here; the harness kills the VM at its own timeout
RUN_TIMEOUT = 240


class HarnessResult:
    def __init__(self, proc: subprocess.CompletedProcess):
        self.rc = proc.returncode
        self.output = proc.stdout + proc.stderr
        self.checks = {name: verdict for verdict, name in
                       re.findall(r"^(PASS|FAIL|SKIP) (\S+)", self.output, re.M)}
        m = re.search(r"^(\d+) passed, (\d+) failed, (\d+) skipped", self.output, re.M)
        self.counts = tuple(int(x) for x in m.groups()) if m else None

    def assert_all_passed(self, expect: set[str] = frozenset()) -> None:
        assert self.counts is not None, "the harness printed no summary:\n" + self.output
        passed, failed, skipped = self.counts
        assert self.rc == 0 and failed == 0 and skipped == 0 and passed > 0, self.output
        missing = set(expect) - {n for n, v in self.checks.items() if v == "PASS"}
        assert not missing, f"checks that did not pass: {missing}\n{self.output}"


@pytest.fixture(scope="session")
def vm_harness() -> str:
    """The harness, ready to boot a guest (kernel and initramfs in its cache)."""
    if not os.path.exists(HARNESS):
        oracle_missing(f"the vhost-user-blk VM harness is not at {HARNESS}")
    if shutil.which("qemu-system-x86_64") is None:
        oracle_missing("qemu-system-x86_64 is not installed (make test installs it with "
                       "the harness's --setup)")
    r = subprocess.run([HARNESS, "--build-only"], capture_output=True, text=True, timeout=300)
    if r.returncode:
        oracle_missing("the VM harness could not build its guest:\n" + r.stdout + r.stderr)
    return HARNESS


@pytest.fixture
def run_harness(vm_harness, tmp_path):
    runs = []

    def run(*args) -> HarnessResult:
        if "--log" not in args:      # the guest's serial log here, not in /tmp
            runs.append(None)
            args += ("--log", tmp_path / ("vubc-guest-%d.log" % len(runs)))
        proc = subprocess.run([vm_harness, *map(str, args)], capture_output=True, text=True,
                              timeout=RUN_TIMEOUT, preexec_fn=die_with_parent,
                              stdin=subprocess.DEVNULL)
        return HarnessResult(proc)
    return run
