"""Fixtures of the TLS object tests: the QMP suite's daemon fixtures (both daemons, QSD 7.2
the oracle) and a credential tree made once per module."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qmp.conftest import (daemon, daemon_kind, graph, image, launch, qmp,  # noqa: E402,F401
                          start_daemon, transcripts)
