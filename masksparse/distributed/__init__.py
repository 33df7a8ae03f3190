"""Pruning sharded models: DTensor masks, selection across ranks, data-parallel statistics, checks.

A DTensor parameter gets a DTensor mask with the same mesh and placements, so each rank holds only its
shard of both; global selection sums histograms over the mesh and picks exactly the entries one process
would pick on the whole tensors. Ordinary tensors never reach this package's collectives.
"""

from masksparse.distributed.checks import RanksDisagreeError, check_ranks_agree, shard_masks
from masksparse.distributed.parallel import data_parallel
from masksparse.distributed.select import TRAFFIC, Traffic

__all__ = ["RanksDisagreeError", "TRAFFIC", "Traffic", "check_ranks_agree", "data_parallel", "shard_masks"]
