#!/usr/bin/env python3
"""Run one fuzz target of fuzz_targets.py under atheris (libFuzzer, coverage-guided).

    python tests/fuzz/run_atheris.py TARGET [libFuzzer options...] [CORPUS_DIR...]

The target's seeds are written to a corpus directory first ($BLOCKEXPORT_FUZZ_CORPUS, else
a fresh one under $TMPDIR), given last, so that libFuzzer also saves what it finds there.  The slow tier (tests/fuzz/test_fuzz.py, marker
``slow``) runs this with ``-runs=1000000``; libFuzzer reports "Done N runs in S second(s)".
A failing input is saved as ``<artifact_prefix>crash-<sha1>`` and the run exits non-zero.
"""
import os
import sys
import tempfile

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

#: libFuzzer's input size limit unless -max_len= is given: long inputs mostly buy slowness
#: (a 4 KiB deeply nested JSON value costs ~100x a short one), not coverage.
MAX_LEN = 1024

with atheris.instrument_imports(include=["blockexport", "fuzz_targets"]):
    import fuzz_targets


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in fuzz_targets.TARGETS:
        sys.exit("usage: run_atheris.py {%s} [libFuzzer options]"
                 % ",".join(fuzz_targets.TARGETS))
    name = sys.argv[1]
    target, seeds = fuzz_targets.TARGETS[name]
    corpus = os.environ.get("BLOCKEXPORT_FUZZ_CORPUS")
    if corpus:
        os.makedirs(corpus, exist_ok=True)
    else:
        corpus = tempfile.mkdtemp(prefix="fuzz-%s-" % name)
    for i, seed in enumerate(seeds):
        if len(seed) <= MAX_LEN:        # longer seeds (limits) are for the seed tests
            with open(os.path.join(corpus, "seed-%d" % i), "wb") as f:
                f.write(seed)
    args = sys.argv[2:]
    if not any(a.startswith("-max_len=") for a in args):
        args.append("-max_len=%d" % MAX_LEN)
    atheris.Setup([sys.argv[0]] + args + [corpus], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
