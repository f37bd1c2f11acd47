"""blockexport: a block-storage export daemon compatible with QEMU's block-export subsystem."""

__version__ = "0.1.0"
# The QEMU version whose behaviour we reproduce (reported by -V and, later, query-version).
QEMU_COMPAT_VERSION = "7.2.22"
