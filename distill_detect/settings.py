"""Typed settings: which model, on which engine, decoded how (``GenConfig``), scored by what.

The CLI fills these from its flags and the Python API takes them directly; nothing below the
CLI reads an argparse namespace. ``ModelSettings.factory`` builds the backend lazily (a
finished run never loads a model) and ``ModelSettings.identity`` is the cheap part of the run
fingerprint that can be checked before any model is loaded.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, fields

from distill_detect.errors import ConfigError
from distill_detect.types import GenConfig


@dataclass(frozen=True)
class ModelSettings:
    """The model to audit and the engine that runs it (``distill-detect backends`` lists the engines)."""

    model: str = "default"
    """A local checkpoint directory, a GGUF file (llamacpp), a hub id, a served model name (openai), or 'default'."""
    backend: str = "hf"
    dtype: str = "auto"
    """float32, bfloat16, float16, or auto (float32 on CPU; see docs/gpu.md for GPUs)."""
    device: str = "auto"
    trust_remote_code: bool = False
    threads: int | None = None
    """CPU threads of the hf and llamacpp backends (None: the library's default)."""
    fused: bool | None = None
    """hf on CPU: the fused Llama-family forward (None: where supported)."""
    gguf_quant: str | None = None
    """llamacpp with a Hugging Face checkpoint folder: the GGUF it is converted to, 'f16' (None) or 'q8_0'."""
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    endpoint: str = "completions"
    tokenizer: str | None = None
    concurrency: int = 4
    extra_body: str | dict | None = None
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    workers: int | None = None
    """Generate with this many Ray actors (None: in this process)."""
    ray_address: str | None = None
    shard: str | None = None
    """'I/N': only the questions of shard I of N (by id hash)."""

    @classmethod
    def of(cls, model: str | ModelSettings | None = None, **overrides) -> ModelSettings:
        """A ``ModelSettings`` from a model name or path (or an existing one), with ``overrides``."""
        if isinstance(model, ModelSettings):
            base = model
        else:
            base = cls(model=model or "default")
        known = {f.name for f in fields(cls)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise ConfigError(f"unknown model setting {bad[0]!r}; known: {', '.join(sorted(known))}")
        return cls(**{**{f.name: getattr(base, f.name) for f in fields(cls)}, **overrides})

    def __post_init__(self) -> None:
        if isinstance(self.extra_body, str):
            try:
                body = json.loads(self.extra_body)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"--extra-body {self.extra_body!r}: not valid JSON ({exc.msg})") from None
            object.__setattr__(self, "extra_body", body)
        if self.extra_body is not None and not isinstance(self.extra_body, dict):
            raise ConfigError("--extra-body must be a JSON object, e.g. '{\"repeat_penalty\": 1.0}'")
        if self.gguf_quant is not None and self.backend != "llamacpp":
            raise ConfigError(f"--gguf-quant {self.gguf_quant}: only for --backend llamacpp (it converts the checkpoint to GGUF)")
        for name in ("threads", "workers"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"--{name} {v}: give a positive integer")

    def factory(self, gen: GenConfig, methods=()):
        """A function that builds the backend; methods it cannot run are refused now and once it is up.

        ``gen.logprobs=False`` (``--no-logprobs``) builds the backend text only from the start (the
        openai backend's ``logprobs=False``: no log-probability is ever asked for, not even to probe the
        server); a backend that cannot run so is refused here, before anything is loaded.
        """
        from distill_detect.backends import get_backend_class
        from distill_detect.backends.capabilities import backend_kwargs, checked_factory

        cls = get_backend_class(self.backend)  # an unknown name fails before anything is loaded
        if not gen.logprobs and "logprobs" not in inspect.signature(cls.__init__).parameters:
            raise ConfigError(
                f"--no-logprobs is for servers that return text only (--backend openai); the {self.backend} backend always "
                "records log-probabilities, so leave --no-logprobs out"
            )

        def make():
            from distill_detect.backends import make_backend

            common = dict(
                model=self.model,
                dtype=self.dtype,
                device=self.device,
                system_prompt=gen.system_prompt,
                prompt_logprobs=gen.prompt_logprobs and gen.logprobs,
                trust_remote_code=self.trust_remote_code,
            )
            kwargs = backend_kwargs(self.backend, self, common)
            if self.gguf_quant is not None:  # llamacpp only (checked above)
                kwargs["gguf_quant"] = self.gguf_quant
            if not gen.logprobs:  # built text only: it never asks the server for a log-probability
                kwargs["logprobs"] = False
            return make_backend(self.backend, **kwargs)

        return checked_factory(make, self, list(methods) or None)

    def identity(self, gen: GenConfig) -> dict:
        """The part of the run fingerprint known without loading the model (checked against a run first).

        The model's identity (file hashes of a local checkpoint, the hub id, the served name),
        the backend, the system prompt, and dtype/device when given explicitly. The rest
        (library versions, template, stop tokens) is checked once the backend is up.
        """
        ident: dict = {"backend": self.backend, "system_prompt": gen.system_prompt, "decoding": "greedy"}
        if not gen.logprobs:  # a run made with log-probabilities is refused before the server is asked anything
            ident["logprobs"] = False
        if self.backend in ("hf", "vllm"):
            from distill_detect.models import resolve_model

            ident["model"] = resolve_model(self.model).identity
        elif self.backend == "openai":
            ident["model"] = {"served": self.model}
        if self.backend in ("hf", "vllm") and self.dtype in ("float32", "bfloat16", "float16"):
            ident["dtype"] = self.dtype
        if self.backend == "hf" and self.device != "auto":
            ident["device"] = str(self.device).split(":")[0]
        return ident
