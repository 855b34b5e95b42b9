"""Loading a tensor-parallel engine: check the split, start the workers, load rank 0's shard.

:meth:`kubeinfer_serving.engine.llm_engine.LLMEngine.from_model_dir` calls :func:`load_tp_engine`
when ``EngineConfig.tensor_parallel_size`` > 1.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .executor import TPExecutor
from .group import collective_timeout_s
from .sharding import TensorParallelError, iter_rank_weights, tp_shape
from .worker import WorkerSpec


def load_tp_engine(engine_cls, path: str | Path, *, model_name: str, config):
    """Build an engine whose model is split over ``config.tensor_parallel_size`` ranks.

    Checks the split first (nothing starts when it cannot work), spawns the workers (they load their
    shards while rank 0 loads its own), builds rank 0's engine, hands the workers the KV pool size.

    Args:
        engine_cls: :class:`~kubeinfer_serving.engine.llm_engine.LLMEngine`.
        path: a Hugging Face model directory (safetensors) or a ``.gguf`` file.
        model_name: the engine's model name; config: its :class:`~kubeinfer_serving.engine.config.EngineConfig`.

    Raises:
        TensorParallelError: heads, KV heads or the intermediate size do not divide (the message names
            the numbers), fewer CUDA devices than ranks, or LoRA asked for.
        kubeinfer_serving.distributed.executor.WorkerFailedError: a worker died or failed to load.
        kubeinfer_serving.models.loader.ModelLoadError: unreadable model files.
    """
    from kubeinfer_serving.engine.llm_engine import model_max_len
    from kubeinfer_serving.models import gguf, loader

    size = config.tensor_parallel_size
    if gguf.is_gguf(path):
        info = gguf.read_gguf(path)
        hf_config, tokenizer = info.hf_config, gguf.gguf_tokenizer(path, info)
    else:
        hf_config, tokenizer = loader.load_hf_config(path), loader.load_tokenizer(path)
    shape = tp_shape(hf_config, 0, size)
    if config.max_loras:
        raise TensorParallelError(f"LoRA adapters do not run with tensor parallelism yet (tensor parallel size {size})")
    device = config.resolve_device()
    dtype = config.resolve_dtype(device)
    first = device.index or 0  # rank r on cuda:first+r
    if device.type == "cuda" and torch.cuda.device_count() < first + size:
        raise TensorParallelError(f"tensor parallel size {size} from cuda:{first} needs GPUs {first}..{first + size - 1}; "
                                  f"{torch.cuda.device_count()} visible")
    spec = WorkerSpec(str(path), dtype, device.type, model_max_len(hf_config, config), config.block_size,
                      config.quantization, torch.get_num_threads(), collective_timeout_s(), first_device=first)
    executor = TPExecutor.launch(spec, size, model_name)
    try:
        return engine_cls.from_weights(hf_config, iter_rank_weights(path, shape, dtype), tokenizer=tokenizer,
                                       config=config, model_name=model_name, tp=executor)
    except BaseException:
        executor.close()
        raise
