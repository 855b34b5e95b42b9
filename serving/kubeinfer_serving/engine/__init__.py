"""kubeinfer_serving.engine: continuous batching over a paged KV cache.

The light contract types are re-exported here; import the engines themselves from
``kubeinfer_serving.engine.llm_engine`` (synchronous) and
``kubeinfer_serving.engine.async_engine`` (thread + asyncio).
"""

from .config import EngineConfig, EngineStats
from .errors import EngineDeadError, EngineError, PromptTooLongError, QueueFullError
from .outputs import RequestOutput
from .sampling import SamplingParams

__all__ = [
    "EngineConfig",
    "EngineDeadError",
    "EngineError",
    "EngineStats",
    "PromptTooLongError",
    "QueueFullError",
    "RequestOutput",
    "SamplingParams",
]
