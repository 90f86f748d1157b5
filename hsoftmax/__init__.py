"""hsoftmax: a two-level hierarchical softmax head for extreme classification."""

from . import functional
from .functional import HierarchicalOutput
from .grouping import ClassLayout, check_class_slots, class_layout
from .loss import HierarchicalCrossEntropy
from .softmax import HierarchicalSoftmax
from .sparse import split_parameters

__version__ = "0.1.0"

__all__ = [
    "ClassLayout",
    "HierarchicalCrossEntropy",
    "HierarchicalOutput",
    "HierarchicalSoftmax",
    "__version__",
    "check_class_slots",
    "class_layout",
    "functional",
    "split_parameters",
]
