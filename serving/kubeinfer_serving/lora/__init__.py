"""LoRA adapters: PEFT-format loading, the device slot pool, per-row batched application.

* :mod:`.adapter`: the adapter object, the target modules and their shapes in our model.
* :mod:`.peft_format`: reads ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT).
* :mod:`.slots`: ``max_loras`` device slots of rank ``max_lora_rank`` and a step's per-row
  application (plain torch ops; the Triton shrink/expand kernel on CUDA).
* :mod:`.manager`: which adapter holds which slot, LRU reuse among idle ones, the scheduler's gate.
"""
