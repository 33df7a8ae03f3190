"""Pruning sharded models: DTensor masks, selection across ranks, data-parallel statistics, checks.

A DTensor parameter gets a DTensor mask with the same mesh and placements, so each rank holds only its
shard of both; global selection sums histograms over the mesh and picks exactly the entries one process
would pick on the whole tensors. Ordinary tensors never reach this package's collectives.
"""
