"""kubeinfer's offline benchmark (the ``kubeinfer-bench`` console script, ``make bench``).

``kubeinfer_bench``: the engine against sequential ``generate``, static batching and
transformers' continuous batching on one workload, same run; on CUDA also decode tokens/s
against the HBM roofline (``roofline``). The other benchmark scripts live in the repository's
``bench/`` directory (``python -m bench.<name>``).
"""
