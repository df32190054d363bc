"""Generation engines (alignflow.components.ENGINES): every module here that registers an Engine is one,
found by the package (no list to edit). The seam they share is engines/base.py."""
