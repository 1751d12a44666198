"""embed: 384-dim sentence embeddings (all-MiniLM-L6-v2, mean pooled and L2-normalised)."""

from .func import new

__all__ = ["new"]
