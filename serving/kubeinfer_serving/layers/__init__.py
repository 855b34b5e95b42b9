"""kubeinfer_serving.layers: building blocks shared by ``models/`` and ``engine/``.

``attention`` holds the paged-attention metadata and backends (reference SDPA, Triton);
models call :func:`~kubeinfer_serving.layers.attention.paged_attention`, the engine's model
runner builds :class:`~kubeinfer_serving.layers.attention.AttentionMetadata`. This package
imports neither ``models`` nor ``engine``.
"""
