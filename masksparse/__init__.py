"""masksparse: a PyTorch sparsity toolkit.

``from masksparse import prune`` is a drop-in for ``torch.nn.utils.prune`` with bool masks, weights
computed on read and global pruning that scales; pruned state_dicts load into fresh models; sparsity
reports print as tables; structured masks become a genuinely smaller model with
:func:`masksparse.compact`, saved with :func:`masksparse.save_compacted` and rebuilt from a fresh model with
:func:`masksparse.load_compacted`.
"""

from masksparse import distributed, prune
from masksparse._errors import (
    CompactionError,
    InexactCompactionWarning,
    KeptUnitsWarning,
    MaskSparseError,
    MissingDependencyError,
    PruningAttributeError,
    PruningIndexError,
    PruningTypeError,
    PruningValueError,
    ShapeMismatchError,
    StateDictError,
)
from masksparse.compact import (
    CompactMultiheadAttention,
    Plan,
    compact,
    compaction_plans,
    load_compacted,
    plan_compaction,
    save_compacted,
)
from masksparse.comparison import LayerComparison, ReportComparison, compare_reports
from masksparse.criteria import LayerStats, calibrate
from masksparse.distributed import data_parallel
from masksparse.graph import Graph, trace
from masksparse.prune import remove_all
from masksparse.report import ReportRow, ReportTotal, SparsityReport, sparsity_report
from masksparse.schedule import (
    GradualPruner,
    PruningStep,
    SensitivityTable,
    amounts_from_sensitivity,
    distill,
    sensitivity,
)
from masksparse.serialization import load_state_dict, read_state_dict, save_state_dict
from masksparse.structured import prune_channels
from masksparse.unstructured import prune_unstructured

__version__ = "0.1.0"

__all__ = [
    "CompactMultiheadAttention",
    "CompactionError",
    "GradualPruner",
    "Graph",
    "InexactCompactionWarning",
    "KeptUnitsWarning",
    "LayerComparison",
    "LayerStats",
    "MaskSparseError",
    "MissingDependencyError",
    "Plan",
    "PruningAttributeError",
    "PruningIndexError",
    "PruningStep",
    "PruningTypeError",
    "PruningValueError",
    "ReportComparison",
    "ReportRow",
    "ReportTotal",
    "SensitivityTable",
    "ShapeMismatchError",
    "SparsityReport",
    "StateDictError",
    "__version__",
    "amounts_from_sensitivity",
    "calibrate",
    "compact",
    "compaction_plans",
    "compare_reports",
    "data_parallel",
    "distill",
    "distributed",
    "load_compacted",
    "load_state_dict",
    "plan_compaction",
    "prune",
    "prune_channels",
    "prune_unstructured",
    "read_state_dict",
    "remove_all",
    "save_compacted",
    "save_state_dict",
    "sensitivity",
    "sparsity_report",
    "trace",
]
