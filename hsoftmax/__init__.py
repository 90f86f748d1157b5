"""hsoftmax: a two-level hierarchical softmax head for extreme classification."""

__version__ = "0.1.0"

__all__ = ["__version__"]
