"""masksparse: a PyTorch sparsity toolkit.

``from masksparse import prune`` is a drop-in for ``torch.nn.utils.prune`` with bool masks, weights
computed on read and global pruning that scales; pruned state_dicts load into fresh models; sparsity
reports print as tables.
"""

from masksparse import prune
from masksparse._errors import (
    MaskSparseError,
    PruningAttributeError,
    PruningIndexError,
    PruningTypeError,
    PruningValueError,
    ShapeMismatchError,
    StateDictError,
)
from masksparse.prune import remove_all
from masksparse.report import ReportRow, ReportTotal, SparsityReport, sparsity_report

__version__ = "0.1.0"

__all__ = [
    "MaskSparseError",
    "PruningAttributeError",
    "PruningIndexError",
    "PruningTypeError",
    "PruningValueError",
    "ReportRow",
    "ReportTotal",
    "ShapeMismatchError",
    "SparsityReport",
    "StateDictError",
    "__version__",
    "prune",
    "remove_all",
    "sparsity_report",
]
