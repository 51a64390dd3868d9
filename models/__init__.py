"""Sequence models behind one contract (see models/base.py) and a registry."""

from models.registry import FAMILIES, MODELS, TITANS_FAMILIES, build, declared, first, in_family, names, spec

__all__ = ["FAMILIES", "MODELS", "TITANS_FAMILIES", "build", "declared", "first", "in_family", "names", "spec"]
