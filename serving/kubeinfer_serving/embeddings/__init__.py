"""Sentence embeddings for ``/v1/embeddings``: :class:`Embedder` (batched encoder runner) and pooling."""

from kubeinfer_serving.embeddings.embedder import Embedder
from kubeinfer_serving.embeddings.pooling import PoolingConfig, pool, read_pooling_config

__all__ = ["Embedder", "PoolingConfig", "pool", "read_pooling_config"]
