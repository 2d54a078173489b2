"""Backend registry: a name maps to 'module:Class', imported only when used."""

from __future__ import annotations

import difflib
import importlib

from distill_detect.errors import ConfigError

BACKENDS = {
    "hf": "distill_detect.backends.hf:HFBackend",
    "llamacpp": "distill_detect.backends.llamacpp:LlamaCppBackend",
    "openai": "distill_detect.backends.openai:OpenAIBackend",
    "vllm": "distill_detect.backends.vllm:VLLMBackend",
}


def get_backend_class(name: str):
    try:
        target = BACKENDS[name]
    except KeyError:
        close = difflib.get_close_matches(name, BACKENDS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown backend {name!r}.{hint} Known: {', '.join(BACKENDS)}") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)


def make_backend(name: str, **kwargs):
    return get_backend_class(name)(**kwargs)
