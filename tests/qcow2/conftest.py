"""Fixtures of the qcow2 driver tests (helpers: qcow2_util.py)."""
from __future__ import annotations

import pytest

from qcow2.qcow2_util import nbd_module, require_tools


@pytest.fixture(scope="module")
def tools():
    """The QEMU tools and libnbd (missing: skip, or fail under CI=true); the nbd module."""
    require_tools()
    return nbd_module()
