"""Task families behind one contract (see tasks/base.py) and a registry."""

from tasks.registry import TASKS, build, names, spec

__all__ = ["TASKS", "build", "names", "spec"]
