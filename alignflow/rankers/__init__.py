"""Rankers and pair strategies (alignflow.components.RANKERS, PAIRS): every module here that registers one
is found by the package (no list to edit). See docs/extending.md."""
