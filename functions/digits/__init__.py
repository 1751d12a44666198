"""digits: classify an 8x8 handwritten digit (scikit-learn digits data) with a small CNN."""

from .func import new

__all__ = ["new"]
