"""postprocess: route a digits result to accepted or review by its confidence (no model)."""

from .func import new

__all__ = ["new"]
