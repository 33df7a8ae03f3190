"""Choosing what to prune from data: calibration statistics and reconstruction.

:func:`calibrate` gathers per-layer input statistics (:class:`LayerStats`) over a DataLoader;
:func:`sequential` does it one block at a time for the pruning functions; :func:`sparsegpt` prunes
one weight matrix with SparseGPT's reconstruction.
"""

from masksparse.criteria.calibration import LayerStats, calibrate, find_blocks, sequential
from masksparse.criteria.reconstruction import sparsegpt

__all__ = ["LayerStats", "calibrate", "find_blocks", "sequential", "sparsegpt"]
