"""The block layer: nodes (:mod:`~blockexport.block.node`), the graph
(:mod:`~blockexport.block.graph`), the driver table (:mod:`~blockexport.block.drivers`),
dirty bitmaps, image locking, format probing (see docs/architecture.md)."""
