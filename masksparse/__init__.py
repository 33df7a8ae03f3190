"""masksparse: a PyTorch sparsity toolkit."""

from masksparse._errors import (
    MaskSparseError,
    PruningAttributeError,
    PruningIndexError,
    PruningTypeError,
    PruningValueError,
    ShapeMismatchError,
    StateDictError,
)

__version__ = "0.1.0"

__all__ = [
    "MaskSparseError",
    "PruningAttributeError",
    "PruningIndexError",
    "PruningTypeError",
    "PruningValueError",
    "ShapeMismatchError",
    "StateDictError",
    "__version__",
]
