"""Tensor parallelism on torch.distributed: process groups, weight sharding, the vocabulary-parallel
embedding, the step protocol between rank 0 and its workers, and the worker processes.

Rank 0 runs in the serving process (scheduler, sampling); ranks 1..N-1 are worker processes that
follow each step's plan (:mod:`.executor`, :mod:`.worker`). The layer layout is Megatron-LM's
(Shoeybi et al. 2019): column-parallel q/k/v and gate/up, row-parallel o and down with one
all-reduce each, a vocabulary-parallel embedding and LM head.
"""
