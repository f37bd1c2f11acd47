"""The bottom layer: helpers with no knowledge of the rest of the project.

Modules here import only the standard library and :mod:`blockexport.errors` (see the
"Layers" section of docs/architecture.md; ``tests/unit/test_layers.py`` enforces it).
"""
