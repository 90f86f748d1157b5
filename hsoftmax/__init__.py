"""hsoftmax: a two-level hierarchical softmax head for extreme classification."""

from . import functional
from .bottom import split_parameters
from .builders import slots_from_embeddings, slots_from_taxonomy, suggest_shape
from .classifier import find_classifier, replace_classifier
from .counting import (
    HeadCount,
    bottleneck_head_parameters,
    compare_heads,
    count_parameters,
    flat_head_parameters,
    hierarchical_head_parameters,
    parameter_bytes,
)
from .distributed import ShardedCrossEntropy, ShardedHierarchicalSoftmax, gather_head, shard_head
from .fastpaths import use_reference_path
from .functional import HierarchicalOutput
from .loss import HierarchicalCrossEntropy
from .metrics import (
    RankingMetrics,
    evaluate,
    macro_mean_reciprocal_rank,
    mean_reciprocal_rank,
    target_rank,
    topk_accuracy,
)
from .optim import SparseRowAdamW
from .softmax import HierarchicalSoftmax

__version__ = "0.1.0"

__all__ = [
    "HeadCount",
    "HierarchicalCrossEntropy",
    "HierarchicalOutput",
    "HierarchicalSoftmax",
    "RankingMetrics",
    "ShardedCrossEntropy",
    "ShardedHierarchicalSoftmax",
    "SparseRowAdamW",
    "__version__",
    "bottleneck_head_parameters",
    "compare_heads",
    "count_parameters",
    "evaluate",
    "find_classifier",
    "flat_head_parameters",
    "functional",
    "gather_head",
    "hierarchical_head_parameters",
    "macro_mean_reciprocal_rank",
    "mean_reciprocal_rank",
    "parameter_bytes",
    "replace_classifier",
    "shard_head",
    "slots_from_embeddings",
    "slots_from_taxonomy",
    "split_parameters",
    "suggest_shape",
    "target_rank",
    "topk_accuracy",
    "use_reference_path",
]
