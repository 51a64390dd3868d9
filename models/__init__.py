"""Sequence models behind one contract (see models/base.py) and a registry."""

from models.registry import MODELS, build, names, spec

__all__ = ["MODELS", "build", "names", "spec"]
