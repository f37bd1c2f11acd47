"""qcow2 image format driver."""
