"""Settings of the serving pod, from command-line flags and ``KUBEINFER_*`` environment variables.

Precedence: a flag given on the command line, else the environment variable, else the default.
Each field ``foo_bar`` reads ``KUBEINFER_FOO_BAR`` (e.g. ``KUBEINFER_PORT=9000``,
``KUBEINFER_MODELS_CONFIG=/etc/kubeinfer/models.yaml``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kubeinfer_serving.api.tool_parsers import PARSERS as TOOL_PARSERS

ENV_PREFIX = "KUBEINFER_"


class StructuredOutputsConfig(BaseModel):
    """vLLM's ``--structured-outputs-config`` (a JSON object), the keys this server knows.

    Attributes:
        backend: the grammar library; this server has one (llguidance, vLLM's ``guidance``).
        disable_additional_properties: JSON schemas (``response_format``, ``guided_json``,
            ``structured_outputs.json``, forced tool calls) forbid properties they do not
            declare unless they say ``additionalProperties`` themselves. vLLM's option of this
            name (default false there) makes its ``guidance`` backend behave as its default
            ``xgrammar`` backend does; this server defaults to true, so a schema without
            ``additionalProperties`` (LangChain's and litellm's tool schemas) gets only its
            declared keys. ``false`` restores llguidance's JSON-schema default (undeclared keys
            allowed); a request's ``structured_outputs.disable_additional_properties`` wins.
    """

    model_config = ConfigDict(extra="forbid")

    backend: Literal["auto", "guidance", "llguidance"] = "auto"
    disable_additional_properties: bool = True


class ServerSettings(BaseModel):
    """Everything ``kubeinfer-serve`` is configured with.

    Attributes:
        host: address to bind (``0.0.0.0`` in a container; ``make serve`` passes 127.0.0.1).
        port: TCP port.
        models_config: catalogue YAML (the ConfigMap the operator mounts); None with no
            ``model`` serves the default catalogue (smollm2-135m-instruct, tiny-llama, all-minilm-l6-v2).
        model: serve one model instead of a catalogue (vLLM-style single-model mode): any
            catalogue source (``hf://``, ``s3://``, ``file://``, ``pvc://``, ``builtin://``), a
            Hugging Face directory or a ``.gguf`` file; its name is ``served_model_name``.
        model_dir: the older spelling of ``model`` (a local directory); not both.
        served_model_name: the OpenAI ``model`` name of ``model`` (default:
            :func:`~kubeinfer_serving.registry.catalogue.default_served_name`).
        quantization: weight quantization of the single model (``int8``, ``fp8``, ``none``; None: none).
        max_num_seqs: most sequences in a generative engine's running batch (None: the
            catalogue's ``maxNumSeqs``, else the engine default 256).
        max_num_batched_tokens: token budget of one engine step (None: the catalogue's, else 8192).
        max_waiting_requests: waiting-queue cap per engine; beyond it requests get 429
            (None: the catalogue's ``maxWaitingRequests``, else the engine default 1024).
        max_model_len: context length cap in tokens (single-model mode; None: the model's own).
        device: "cuda", "cpu" or None (CUDA when available).
        dtype: weights dtype in single-model mode ("bfloat16", "float32", ...) or None (bf16 on
            CUDA, fp32 on CPU); catalogue entries carry their own ``dtype``.
        memory_budget_bytes: registry budget for weights + KV of all loaded models (None: the
            catalogue's ``memoryBudgetBytes``/``gpuMemoryUtilization``).
        log_level: uvicorn and application log level.
        timeout_graceful_shutdown: seconds in-flight requests may take to finish after SIGTERM;
            whatever still runs then ends cleanly (503 body / an SSE error event and ``[DONE]``).
        max_request_body_bytes: largest request body; a bigger one gets 413 before it is read.
        timeout_request_headers: seconds a client may take to send a request's headers (and
            ``timeout_request_body`` its body) before the connection is closed (408 for a body).
        timeout_keep_alive: seconds an idle keep-alive connection stays open.
        timeout_stalled_response: seconds a streamed response may wait for a client that reads
            nothing; then the stream ends and the connection is closed.
        limit_concurrency: most connections + requests at once; beyond it 503 (None: no cap).
        max_jobs_per_request: most engine requests one HTTP request may become (prompts x ``n``).
        max_embedding_inputs / max_embedding_tokens: caps per embeddings request (OpenAI's: 2048
            inputs, 300,000 tokens).
        parse_special_tokens_in_chat: let chat message text produce the model's control tokens
            (off: ``<|eot_id|>`` typed by a user stays text; turn it on only for trusted clients).
        api_keys_file: API keys and tenants (:mod:`kubeinfer_serving.api.tenancy`); keys also come
            from ``$KUBEINFER_API_KEYS`` / ``$KUBEINFER_ADMIN_API_KEYS``. None of them: no auth.
        scheduling_policy: ``fcfs`` or ``priority`` for the generate engines (None: the catalogue's, else fcfs).
        idle_timeout_seconds: idle TTL of non-preloaded models (catalogue mode; None: the catalogue's).
        result_cache: single-model mode: cache complete responses of deterministic requests
            (catalogue mode: ``resultCache: true`` per model).
        enforce_eager: run every generate model's decode steps eagerly, never as CUDA graphs
            (vLLM's ``--enforce-eager``); overrides the catalogue's pod-level ``enforceEager``
            (a model's own ``enforceEager`` still wins). None: the catalogue's.
        fair_admission: weighted fair admission across tenants ahead of each engine
            (:mod:`kubeinfer_serving.api.admission`); None: on when API keys are configured.
        enable_lora, max_loras, max_lora_rank: vLLM's LoRA flags: LoRA slots for every generate
            model (adapters can then be added at run time), slots per model, their highest rank;
            override the catalogue's ``enableLora`` / ``maxLoras`` / ``maxLoraRank`` (None: the catalogue's).
        lora_modules: single-model mode: LoRA adapters of the model as ``NAME=SOURCE`` (vLLM's
            ``--lora-modules``; the environment variable takes them comma-separated).
        allowed_origins: web origins (``scheme://host[:port]``) whose pages may call this server
            (CORS, as vLLM's ``--allowed-origins``) and open its WebSockets; a handshake from any
            other site is refused (comma-separated in the flag
            and the environment). Default: none (same-site pages and non-browser clients only).
        structured_outputs_config: vLLM's ``--structured-outputs-config`` (:class:`StructuredOutputsConfig`).
        tool_call_parser: the format ``tool_choice: "auto"`` replies are parsed in, by vLLM's parser
            names (:mod:`kubeinfer_serving.api.tool_parsers`); None: from each model's chat template.
    """

    model_config = ConfigDict(extra="forbid")

    host: str = "0.0.0.0"
    port: int = Field(8000, ge=0, le=65535)
    models_config: Path | None = None
    model: str | None = None
    model_dir: Path | None = None
    served_model_name: str | None = None
    quantization: Literal["int8", "fp8", "none"] | None = None
    max_num_seqs: int | None = Field(None, ge=1)
    max_num_batched_tokens: int | None = Field(None, ge=1)
    max_waiting_requests: int | None = Field(None, ge=1)
    max_model_len: int | None = Field(None, ge=2)
    device: str | None = None
    dtype: str | None = None
    memory_budget_bytes: int | None = Field(None, ge=1)
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"
    timeout_graceful_shutdown: float = Field(30.0, ge=0)
    max_request_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    timeout_request_headers: float = Field(30.0, gt=0)
    timeout_request_body: float = Field(60.0, gt=0)
    timeout_keep_alive: int = Field(5, ge=1)
    timeout_stalled_response: float = Field(60.0, gt=0)
    limit_concurrency: int | None = Field(None, ge=1)
    max_jobs_per_request: int = Field(128, ge=1)
    max_embedding_inputs: int = Field(2048, ge=1)
    max_embedding_tokens: int = Field(300_000, ge=1)
    parse_special_tokens_in_chat: bool = False
    api_keys_file: Path | None = None
    fair_admission: bool | None = None
    scheduling_policy: Literal["fcfs", "priority"] | None = None
    idle_timeout_seconds: float | None = Field(None, ge=0)
    result_cache: bool = False
    enforce_eager: bool | None = None
    enable_lora: bool | None = None
    max_loras: int | None = Field(None, ge=1)
    max_lora_rank: int | None = Field(None, ge=1)
    lora_modules: list[str] | None = None

    @field_validator("lora_modules", mode="before")
    @classmethod
    def _split_lora_modules(cls, value: object) -> object:
        if isinstance(value, str):
            value = [v for v in re.split(r"[,\s]+", value) if v]
        for item in value or []:
            name, sep, source = str(item).partition("=")
            if not sep or not name or not source:
                raise ValueError(f"{item!r} is not NAME=SOURCE")
        return value

    def lora_adapters(self) -> list[dict[str, str]]:
        """``lora_modules`` as catalogue adapter entries ``{name, source}`` (plain paths made absolute)."""
        out = []
        for item in self.lora_modules or []:
            name, source = item.split("=", 1)
            out.append({"name": name, "source": source if "://" in source else str(Path(source).expanduser().resolve())})
        return out
    allowed_origins: tuple[str, ...] = ()
    structured_outputs_config: StructuredOutputsConfig = Field(default_factory=StructuredOutputsConfig)
    tool_call_parser: str | None = None

    @field_validator("tool_call_parser")
    @classmethod
    def _known_parser(cls, value: str | None) -> str | None:
        """One of vLLM's parser names this server has."""
        if value is not None and value not in TOOL_PARSERS:
            raise ValueError(f"{value!r} is not one of {', '.join(sorted(TOOL_PARSERS))}")
        return value

    @field_validator("structured_outputs_config", mode="before")
    @classmethod
    def _parse_structured_outputs_config(cls, value: object) -> object:
        """The flag and the environment give a JSON object as text."""
        if isinstance(value, str):
            try:
                return json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not a JSON object: {exc}") from None
        return value

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        """``"https://a.example,https://b.example"`` (flag or environment) -> a tuple of origins."""
        if isinstance(value, str):
            return tuple(o.strip().rstrip("/") for o in value.split(",") if o.strip())
        return value

    @classmethod
    def env_name(cls, field: str) -> str:
        """The environment variable of ``field`` (``KUBEINFER_`` + upper case)."""
        return ENV_PREFIX + field.upper()

    @classmethod
    def from_sources(cls, cli: Mapping[str, object], env: Mapping[str, str] | None = None) -> ServerSettings:
        """Merge flags over environment variables over defaults.

        Args:
            cli: parsed flags; None values mean "not given".
            env: the environment (default ``os.environ``).

        Raises:
            ValueError: a value is invalid (the message names the flag/variable).
        """
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for name in cls.model_fields:
            if cli.get(name) is not None:
                values[name] = cli[name]
            elif env.get(cls.env_name(name), "") != "":
                values[name] = env[cls.env_name(name)]
        try:
            return cls(**values)
        except ValidationError as exc:
            msgs = [f"--{'-'.join(str(x) for x in e['loc']).replace('_', '-')} / "
                    f"{cls.env_name(str(e['loc'][0]))}: {e['msg']}" for e in exc.errors()]
            raise ValueError("; ".join(msgs)) from exc


def build_parser() -> argparse.ArgumentParser:
    """The ``kubeinfer-serve`` argument parser; every flag defaults to None (= env var or default)."""
    p = argparse.ArgumentParser(
        prog="kubeinfer-serve",
        description="OpenAI-compatible serving pod. With no model flags it serves the default catalogue "
        "(smollm2-135m-instruct + tiny-llama + all-minilm-l6-v2). Every flag can also be set as KUBEINFER_<FLAG> (e.g. KUBEINFER_PORT).",
    )
    p.add_argument("--host", help="bind address (default 0.0.0.0)")
    p.add_argument("--port", type=int, help="TCP port (default 8000)")
    p.add_argument("--models-config", type=Path, help="model catalogue YAML (e.g. /etc/kubeinfer/models.yaml)")
    p.add_argument("--model", help="serve this one model: hf://ORG/NAME, s3://BUCKET/PREFIX, file:///DIR, "
                   "pvc://CLAIM/PATH, builtin://NAME, a Hugging Face directory or a .gguf file")
    p.add_argument("--model-dir", type=Path, help="serve this one Hugging Face model directory (older spelling of --model)")
    p.add_argument("--served-model-name", help="OpenAI model name for --model (default: the directory or file name, "
                   "ORG/NAME for hf://, NAME for builtin://)")
    p.add_argument("--quantization", choices=["int8", "fp8", "none"],
                   help="single-model mode: weight-only quantization (int8 per-channel; fp8 needs CUDA; default none)")
    p.add_argument("--max-num-seqs", type=int, help="max sequences in a running batch (default 256)")
    p.add_argument("--max-num-batched-tokens", type=int, help="token budget per engine step (default 8192)")
    p.add_argument("--max-waiting-requests", type=int, help="waiting-queue cap per engine; beyond it 429 (default: the catalogue's maxWaitingRequests, else 1024)")
    p.add_argument("--max-model-len", type=int, help="context length cap in tokens (default: the model's)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", help="bfloat16, float16 or float32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--memory-budget-bytes", type=int, help="bytes for weights + KV of all loaded models")
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug", "trace"])
    p.add_argument("--timeout-graceful-shutdown", type=float,
                   help="seconds in-flight requests get to finish on shutdown, then they end cleanly (default 30)")
    p.add_argument("--max-request-body-bytes", type=int, help="largest request body; beyond it 413 (default 16 MiB)")
    p.add_argument("--timeout-request-headers", type=float,
                   help="seconds to receive a request's headers before closing the connection (default 30)")
    p.add_argument("--timeout-request-body", type=float,
                   help="seconds to receive a request's body before answering 408 (default 60)")
    p.add_argument("--timeout-keep-alive", type=int, help="seconds an idle keep-alive connection stays open (default 5)")
    p.add_argument("--timeout-stalled-response", type=float,
                   help="seconds a stream may wait for a client that reads nothing, then it is closed (default 60)")
    p.add_argument("--limit-concurrency", type=int, help="most connections + requests at once; beyond it 503")
    p.add_argument("--max-jobs-per-request", type=int,
                   help="most engine requests per HTTP request, prompts x n (default 128)")
    p.add_argument("--max-embedding-inputs", type=int, help="most inputs per embeddings request (default 2048)")
    p.add_argument("--max-embedding-tokens", type=int, help="most tokens per embeddings request (default 300000)")
    p.add_argument("--parse-special-tokens-in-chat", action="store_true", default=None,
                   help="let chat message text produce control tokens (unsafe with untrusted clients)")
    p.add_argument("--api-keys-file", type=Path,
                   help="YAML file of API keys and tenants (also: $KUBEINFER_API_KEYS, $KUBEINFER_ADMIN_API_KEYS)")
    p.add_argument("--scheduling-policy", choices=["fcfs", "priority"],
                   help="engine scheduling policy: fcfs (default) or priority (requests' priority field)")
    p.add_argument("--idle-timeout-seconds", type=float,
                   help="unload a non-preloaded model idle this long (catalogue mode; default: the catalogue's)")
    p.add_argument("--result-cache", action="store_true", default=None,
                   help="single-model mode: cache responses of greedy/seeded requests (catalogue: resultCache)")
    p.add_argument("--enforce-eager", action="store_true", default=None,
                   help="never run decode steps as CUDA graphs (vLLM's flag; default: the catalogue's enforceEager, "
                   "else graphs on where the engine can capture them)")
    p.add_argument("--enable-lora", action="store_true", default=None,
                   help="LoRA slots for every generate model, so adapters can be added at run time (vLLM's flag)")
    p.add_argument("--max-loras", type=int, help="LoRA adapters one step can mix per model (default 4)")
    p.add_argument("--max-lora-rank", type=int, help="highest LoRA adapter rank (default 16)")
    p.add_argument("--lora-modules", nargs="+", metavar="NAME=SOURCE",
                   help="LoRA adapters of the --model model (PEFT directories or any source)")
    p.add_argument("--fair-admission", action=argparse.BooleanOptionalAction, default=None,
                   help="fair admission across tenants (default: on when API keys are configured)")
    p.add_argument("--allowed-origins",
                   help="comma-separated web origins (https://app.example) whose pages may call this server "
                   "(CORS) and open its WebSockets (default: none; other sites' handshakes are refused)")
    p.add_argument("--structured-outputs-config", metavar="JSON",
                   help='vLLM\'s structured-outputs options, e.g. \'{"disable_additional_properties": false}\' '
                   "to let JSON schemas without additionalProperties admit undeclared keys (default: forbidden)")
    return p


def parse_settings(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> ServerSettings:
    """Settings from ``argv`` (default ``sys.argv[1:]``) and ``env`` (default ``os.environ``).

    Raises:
        SystemExit: invalid flags or values (argparse prints the usage and the reason, exit code 2).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return ServerSettings.from_sources(vars(args), env)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
