"""vLLM's LoRA admin routes: ``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter``.

Bodies as vLLM's (``lora_name``, ``lora_path``), plus ``base_model_name`` naming the base
model where the pod serves more than one generate model. ``lora_path`` takes any source a
catalogue adapter takes (a local path, ``file://``, ``pvc://``, ``hf://``, ``s3://``). Success
answers 200 with vLLM's plain-text message. Both need an admin key when keys are configured
(:mod:`.auth`). Errors: 400 ``invalid_lora_adapter`` (name taken, bad adapter, with the reason),
404 unknown base or adapter, 503 the base model cannot load now.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

router = APIRouter()


class LoadLoRAAdapterRequest(BaseModel):
    """Body of ``/v1/load_lora_adapter``."""

    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    base_model_name: str | None = None


class UnloadLoRAAdapterRequest(BaseModel):
    """Body of ``/v1/unload_lora_adapter``."""

    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1)


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request) -> str:
    """Add a LoRA adapter to a running base model; requests may name it once this returns."""
    await request.app.state.provider.load_adapter(body.lora_name, body.lora_path, body.base_model_name)
    return f"Success: LoRA adapter '{body.lora_name}' added successfully."


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, request: Request) -> str:
    """Remove an adapter added at run time; requests already running with it finish."""
    await request.app.state.provider.unload_adapter(body.lora_name)
    return f"Success: LoRA adapter '{body.lora_name}' removed successfully."
