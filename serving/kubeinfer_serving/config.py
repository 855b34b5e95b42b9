"""The settings table of the serving pod: every knob declared once, with its flag, variable, catalogue key, default, help.

Each field of :class:`ServerSettings` is one row (:func:`knob`): the flag is ``--`` + the field
name with dashes (plus vLLM's spelling where it differs, e.g. ``--api-key``), the environment
variable ``KUBEINFER_`` + the name in capitals, the help text is the field's description, and
pod-level knobs that the catalogue also carries name their catalogue key and the default the
catalogue (and the engine) take from here (:func:`fallback`). The CLI parser
(:mod:`kubeinfer_serving.cli`), the catalogue, the engine config and the README's flag table
(:mod:`kubeinfer_serving.settings_doc`) are all generated from or read this table.

Precedence: a flag given on the command line, else the environment variable, else the
catalogue's value (for knobs with a catalogue key), else the default. The class is a
pydantic-settings ``BaseSettings``: its sources are the constructor's arguments (the parsed
flags) over the environment (``KUBEINFER_*``; an empty variable counts as not set). Variables are
not JSON-decoded (``enable_decoding=False``): list knobs take comma-separated values and
``structured_outputs_config`` parses its JSON in its own validator, so a bad value is a
validation error naming the flag and the variable, never the value of a secret.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from kubeinfer_serving.api.tool_parsers import PARSERS as TOOL_PARSERS

ENV_PREFIX = "KUBEINFER_"

SchedulingPolicy = Literal["fcfs", "priority"]
Quantization = Literal["none", "int8", "fp8"]
LogLevel = Literal["critical", "error", "warning", "info", "debug", "trace"]
LogFormat = Literal["text", "json"]
MetricsNames = Literal["kubeinfer", "vllm", "both"]
#: Canonical weights/KV dtypes (the catalogue's ``dtype``); ``auto`` = bfloat16 on CUDA, float32 on CPU.
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
#: Every accepted dtype spelling (vLLM's short names too) -> its canonical name.
DTYPE_NAMES = {"auto": "auto", "float32": "float32", "fp32": "float32", "float": "float32",
               "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
               "half": "float16"}
#: KV block sizes (tokens) the attention kernels take: powers of two >= 16 (the Triton kernel's rule).
BLOCK_SIZES = (16, 32, 64, 128)


def canonical_dtype(name: str | None) -> str:
    """The canonical name of a dtype spelling (None -> ``auto``).

    Raises:
        ValueError: an unknown spelling (the message lists the accepted ones).
    """
    if name is None:
        return "auto"
    if name.lower() not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(sorted(DTYPE_NAMES))}")
    return DTYPE_NAMES[name.lower()]


def knob(default: Any, help: str, *, aliases: tuple[str, ...] = (), pod_key: str | None = None,
         fallback: Any = None, model_key: str | None = None, doc_default: str | None = None,
         metavar: str | None = None, negatable: bool = False, secret: bool = False, **constraints: Any) -> Any:
    """One row of the settings table (a pydantic ``Field`` carrying the CLI and docs metadata).

    Args:
        default: the value when neither the flag nor the variable is given (None: "not given").
        help: the flag's help, also the README's "meaning" column.
        aliases: further flag spellings (vLLM's names), e.g. ``("--api-key",)``.
        pod_key: the catalogue's pod-level key this knob overrides (``maxNumSeqs``); its default is
            then None (= the catalogue's) and ``fallback`` is the catalogue's and the engine's default.
        fallback: the default of a ``pod_key`` knob.
        model_key: the catalogue's per-model key a single-model-mode knob becomes (it needs ``--model``).
        doc_default: the README's default column, where the value alone does not say it.
        metavar: argparse's metavar.
        negatable: a boolean with a ``--no-`` form.
        secret: never shown (repr, error messages).
        constraints: pydantic constraints (``ge``, ``gt``, ``le``).
    """
    extra = {"aliases": list(aliases), "pod_key": pod_key, "fallback": fallback, "model_key": model_key,
             "doc_default": doc_default, "metavar": metavar, "negatable": negatable, "secret": secret}
    return Field(default, description=help, repr=not secret, json_schema_extra=extra, **constraints)


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


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' environment source reading ``env`` (a mapping given by the caller) instead of
    ``os.environ``; names match case-insensitively and empty values count as not set, as in the base class."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        self._env = env
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {k.lower(): v for k, v in self._env.items() if not (self.env_ignore_empty and v == "")}


class ServerSettings(BaseSettings):
    """Everything ``kubeinfer-serve`` is configured with: one field per knob (see the module docstring).

    Each field's description is its documentation (``kubeinfer-serve --help`` and the README
    table print it); :func:`meta` gives its flag names, catalogue key and fallback default.
    ``ServerSettings(**values)`` takes ``values`` over the ``KUBEINFER_*`` variables over the
    defaults; :meth:`from_sources` does the same for parsed flags and turns errors into messages.
    """

    model_config = SettingsConfigDict(extra="forbid", env_prefix=ENV_PREFIX, env_ignore_empty=True,
                                      enable_decoding=False)

    host: str = knob("0.0.0.0", "bind address (0.0.0.0 in a container; make serve passes 127.0.0.1)")
    port: int = knob(8000, "TCP port", ge=0, le=65535)
    models_config: Path | None = knob(None, "model catalogue YAML/JSON (what the operator mounts, e.g. "
                                      "/etc/kubeinfer/models.yaml); none with no --model: the default catalogue",
                                      doc_default="the default catalogue")
    model: str | None = knob(None, "serve this one model (single-model mode): hf://ORG/NAME, s3://BUCKET/PREFIX, "
                             "file:///DIR, pvc://CLAIM/PATH, builtin://NAME, a Hugging Face directory or a .gguf file",
                             doc_default="-")
    model_dir: Path | None = knob(None, "the older spelling of --model (a local directory); not both",
                                  doc_default="-")
    served_model_name: str | None = knob(
        None, "single-model mode: the OpenAI model name of --model", model_key="name",
        doc_default="the directory or file name without .gguf, ORG/NAME for hf://, NAME for builtin://")
    quantization: Quantization | None = knob(
        None, "single-model mode: weight-only quantization of the decoder projections (int8 per channel; "
        "fp8 needs CUDA)", model_key="quantization", doc_default="none")
    tensor_parallel_size: int | None = knob(
        None, "single-model mode: split the model over this many ranks (GPUs of the pod; processes on CPU), "
        "vLLM's flag", model_key="tensorParallelSize", doc_default="1", ge=1)
    max_num_seqs: int | None = knob(None, "most sequences in an engine's running batch", pod_key="maxNumSeqs",
                                    fallback=256, ge=1)
    max_num_batched_tokens: int | None = knob(None, "token budget of one engine step (prefill chunks + decodes)",
                                              pod_key="maxNumBatchedTokens", fallback=8192, ge=1)
    max_waiting_requests: int | None = knob(None, "waiting-queue cap per engine; beyond it 429 with Retry-After",
                                            pod_key="maxWaitingRequests", fallback=1024, ge=1)
    block_size: int | None = knob(None, f"tokens per KV-cache block (vLLM's flag; one of "
                                  f"{', '.join(map(str, BLOCK_SIZES))})", pod_key="blockSize", fallback=16)
    max_model_len: int | None = knob(None, "single-model mode: context length cap in tokens (prompt + output)",
                                     model_key="maxModelLen", doc_default="the model's", ge=2)
    device: str | None = knob(None, "cuda or cpu", doc_default="CUDA when available")
    dtype: str | None = knob(None, "single-model mode: weights/KV dtype: bfloat16/bf16, float16/fp16/half, "
                             "float32/fp32 or auto", model_key="dtype", doc_default="auto: bf16 on CUDA, fp32 on CPU")
    memory_budget_bytes: int | None = knob(
        None, "bytes for weights + activation peaks + KV pools of the loaded models, per GPU (on CPU: for the "
        "host)", pod_key="memoryBudgetBytes",
        doc_default="catalogue's, else --gpu-memory-utilization x device memory", ge=1)
    gpu_memory_utilization: float | None = knob(
        None, "memory budget as a fraction of device memory (physical/cgroup memory on CPU), vLLM's flag; "
        "not with --memory-budget-bytes", pod_key="gpuMemoryUtilization", fallback=0.9, gt=0.0, le=1.0)
    log_level: LogLevel = knob("info", "log level of the server and uvicorn; info logs one line per request, "
                               "debug also probes and uvicorn's access log")
    metrics_names: MetricsNames = knob("kubeinfer", "names of the engine metrics at /metrics: kubeinfer_* (ours), "
                                       "vllm (vLLM's vllm:* names and labels instead) or both")
    log_format: LogFormat = knob("text", "log lines as text or as one JSON object per line (json)")
    otlp_traces_endpoint: str | None = knob(
        None, "OTLP/HTTP URL that receives OpenTelemetry traces of requests, e.g. http://collector:4318/v1/traces "
        "(vLLM's flag); OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT also turn traces on",
        doc_default="the OTEL_EXPORTER_OTLP_* variables, else no traces")
    timeout_graceful_shutdown: float = knob(30.0, "seconds in-flight requests get after SIGTERM; then they end "
                                            "cleanly (503 body / SSE error event and [DONE])", ge=0)
    max_request_body_bytes: int = knob(16 * 1024 * 1024, "largest request body; a bigger one gets 413 before "
                                       "it is read", doc_default="16 MiB", ge=1024)
    timeout_request_headers: float = knob(30.0, "seconds to receive a request's headers; then the connection "
                                          "is closed", gt=0)
    timeout_request_body: float = knob(60.0, "seconds to receive a request's body; then 408", gt=0)
    timeout_keep_alive: int = knob(5, "seconds an idle keep-alive connection stays open", ge=1)
    timeout_stalled_response: float = knob(60.0, "seconds a stream may wait for a client that reads nothing; "
                                           "then it is closed", gt=0)
    limit_concurrency: int | None = knob(None, "most connections + requests at once; beyond it 503",
                                         doc_default="no cap", ge=1)
    max_jobs_per_request: int = knob(128, "most engine requests one HTTP request may become (prompts x n)", ge=1)
    max_embedding_inputs: int = knob(2048, "most inputs per embeddings request (OpenAI's limit)", ge=1)
    max_embedding_tokens: int = knob(300_000, "most tokens per embeddings request (OpenAI's limit)", ge=1)
    parse_special_tokens_in_chat: bool = knob(False, "let chat message text produce the model's control tokens "
                                              "(trusted clients only)")
    api_keys_file: Path | None = knob(None, "YAML file of API keys and tenants", doc_default="none")
    api_keys: list[str] | None = knob(
        None, "API keys as KEY or KEY=TENANT (vLLM's --api-key; the variable takes them comma-separated); "
        "with none of them, nor a keys file, nor KUBEINFER_ADMIN_API_KEYS: no auth",
        aliases=("--api-key",), metavar="KEY", doc_default="none", secret=True)
    fair_admission: bool | None = knob(None, "weighted fair admission across tenants", negatable=True,
                                       doc_default="on when API keys are configured")
    scheduling_policy: SchedulingPolicy | None = knob(
        None, "engine scheduling policy: fcfs or priority (requests' priority field), vLLM's policies",
        pod_key="schedulingPolicy", fallback="fcfs")
    idle_timeout_seconds: float | None = knob(None, "catalogue mode: unload a non-preloaded model idle this long",
                                              pod_key="idleTimeoutSeconds", doc_default="catalogue's, else never",
                                              ge=0)
    result_cache: bool | None = knob(None, "single-model mode: cache complete responses of greedy/seeded requests",
                                     model_key="resultCache", doc_default="off")
    enforce_eager: bool | None = knob(None, "never run decode steps as CUDA graphs (vLLM's flag); a catalogue "
                                      "entry's own enforceEager still wins", pod_key="enforceEager", fallback=False)
    enable_lora: bool | None = knob(None, "LoRA slots for every generate model, so adapters can be added at run "
                                    "time (vLLM's flag)", pod_key="enableLora", fallback=False)
    max_loras: int | None = knob(None, "LoRA adapters one step can mix per model (vLLM's flag)", pod_key="maxLoras",
                                 fallback=4, ge=1)
    max_lora_rank: int | None = knob(None, "highest LoRA adapter rank (vLLM's flag)", pod_key="maxLoraRank",
                                     fallback=16, ge=1)
    lora_modules: list[str] | None = knob(
        None, "single-model mode: LoRA adapters of the --model model as NAME=SOURCE (vLLM's flag; the variable "
        "takes them comma-separated)", model_key="adapters", metavar="NAME=SOURCE", doc_default="none")
    chat_template: str | None = knob(
        None, "single-model mode: the chat template (a Jinja file, or the template itself), replacing the "
        "tokenizer's (vLLM's flag)", model_key="chatTemplate", doc_default="the tokenizer's")
    tool_call_parser: str | None = knob(None, "how tool calls are read from generated text (vLLM's parser names: "
                                        f"{', '.join(sorted(TOOL_PARSERS))})",
                                        doc_default="chosen from the chat template")
    allowed_origins: tuple[str, ...] = knob(
        (), "comma-separated web origins (https://app.example) whose pages may call this server (CORS, vLLM's "
        "flag) and open its WebSockets; other sites' handshakes get 403", doc_default="none")
    structured_outputs_config: StructuredOutputsConfig = knob(
        StructuredOutputsConfig(), 'vLLM\'s structured-outputs options as JSON, e.g. \'{"disable_additional_properties": '
        'false}\' to let JSON schemas without additionalProperties admit undeclared keys', metavar="JSON",
        doc_default='{"disable_additional_properties": true}')

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

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        """``"https://a.example,https://b.example"`` (flag or environment) -> a tuple of origins."""
        if isinstance(value, str):
            return tuple(o.strip().rstrip("/") for o in value.split(",") if o.strip())
        return value

    @field_validator("block_size")
    @classmethod
    def _block_size(cls, value: int | None) -> int | None:
        if value is not None and value not in BLOCK_SIZES:
            raise ValueError(f"must be one of {', '.join(map(str, BLOCK_SIZES))}")
        return value

    def lora_adapters(self) -> list[dict[str, str]]:
        """``lora_modules`` as catalogue adapter entries ``{name, source}`` (plain paths made absolute)."""
        out = []
        for item in self.lora_modules or []:
            name, source = item.split("=", 1)
            out.append({"name": name, "source": source if "://" in source else str(Path(source).expanduser().resolve())})
        return out

    def given(self, name: str) -> bool:
        """Whether ``name`` was set (by a flag, a variable or the constructor) rather than left at its default."""
        return name in self.model_fields_set and getattr(self, name) is not None

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        """The constructor's values over the environment; no ``.env`` file, no secrets directory."""
        return init_settings, env_settings

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
            ValueError: a value is invalid (the message names the flag/variable, never a secret's value).
        """
        values = {name: cli[name] for name in cls.model_fields if cli.get(name) is not None}
        sources = (InitSettingsSource(cls, values), _MappingEnvSource(cls, os.environ if env is None else env))
        try:
            return cls(_build_sources=(sources, values))
        except ValidationError as exc:
            msgs = [f"{flag_names(str(e['loc'][0]))[0]} / {cls.env_name(str(e['loc'][0]))}: "
                    f"{'invalid value' if meta(str(e['loc'][0]))['secret'] else e['msg']}" for e in exc.errors()]
            raise ValueError("; ".join(msgs)) from exc


def meta(name: str) -> dict[str, Any]:
    """The table metadata of field ``name`` (see :func:`knob`).

    Raises:
        KeyError: no such field.
    """
    return dict(ServerSettings.model_fields[name].json_schema_extra or {})


def flag_names(name: str) -> list[str]:
    """The flags of field ``name``: ``--`` + the name with dashes, then its aliases."""
    return ["--" + name.replace("_", "-"), *meta(name)["aliases"]]


def fallback(name: str) -> Any:
    """The default of knob ``name`` when neither the flags nor the catalogue set it (the catalogue's and
    the engine's default; for a knob without a catalogue key: its own default)."""
    field = ServerSettings.model_fields[name]
    return meta(name)["fallback"] if meta(name)["pod_key"] else field.default


def pod_keys() -> dict[str, str]:
    """Fields that override a catalogue pod-level key -> that key."""
    return {n: meta(n)["pod_key"] for n in ServerSettings.model_fields if meta(n)["pod_key"]}


def single_model_fields() -> dict[str, str]:
    """Fields of single-model mode (refused with a catalogue) -> the catalogue's per-model key they become."""
    return {n: meta(n)["model_key"] for n in ServerSettings.model_fields if meta(n)["model_key"]}


def build_parser():  # noqa: ANN201 - re-exported from kubeinfer_serving.cli (lazy: argparse types there)
    """The ``kubeinfer-serve`` argument parser (:func:`kubeinfer_serving.cli.build_parser`)."""
    from kubeinfer_serving.cli import build_parser as build

    return build()


def parse_settings(argv=None, env: Mapping[str, str] | None = None) -> ServerSettings:  # noqa: ANN001
    """Settings from ``argv`` and ``env`` (:func:`kubeinfer_serving.cli.parse_settings`).

    Raises:
        SystemExit: invalid flags or values (usage and reason on stderr, exit code 2).
    """
    from kubeinfer_serving.cli import parse_settings as parse

    return parse(argv, env)
