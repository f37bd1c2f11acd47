"""The qcow2 format driver (a package: ``header`` parses and validates the image header,
``l2cache`` is the bounded L2 metadata cache, ``node`` the format node: cluster mapping,
reads, block status, allocation depth and backing chains).  Read-only for now."""
from blockexport.block.drivers.qcow2.node import Qcow2Node

__all__ = ["Qcow2Node"]
