"""Token strings for the report: decode each generated id on its own, or fall back to ids.

A tokenizer is taken, in order, from: the caller (an object with ``decode``, or a path
or hub id for ``transformers.AutoTokenizer``); the model location recorded with the
run (``config["model_location"]`` or ``fingerprint["model"]["location"]``); the embedded
default model when the fingerprint names it (only if its converted copy is already
cached); a hub id already in the local Hugging Face cache. Otherwise tokens show as
``#id``. Nothing here touches the network.
"""

from __future__ import annotations

import warnings
from pathlib import Path


def _auto(location: str, *, local_only: bool = True):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(location, local_files_only=local_only)


def _cached_default_dir() -> Path | None:
    """The converted default model's folder if it already exists (never converts here)."""
    try:
        from distill_detect.models import cache_dir, find_default_gguf

        gguf = find_default_gguf()
    except Exception:
        return None
    d = cache_dir() / "models" / f"smollm2-135m-instruct-{gguf.stat().st_size}"
    return d if (d / "tokenizer_config.json").exists() or (d / "tokenizer.json").exists() else None


def resolve_tokenizer(tokenizer=None, *, config: dict | None = None) -> tuple[object | None, str]:
    """(tokenizer or None, a short note on where it came from or why there is none)."""
    if tokenizer is not None and hasattr(tokenizer, "decode"):
        return tokenizer, "tokenizer given by the caller"
    candidates: list[tuple[str, str]] = []
    if tokenizer is not None:
        candidates.append((str(tokenizer), "tokenizer given by the caller"))
    config = config or {}
    fp = (config.get("source") or {}).get("fingerprint") or {}
    model = fp.get("model") or {}
    for loc in (config.get("model_location"), model.get("location")):
        if loc:
            candidates.append((str(loc), "the run's model location"))
    if model.get("gguf_sha256"):
        d = _cached_default_dir()
        if d is not None:
            candidates.append((str(d), "the embedded default model"))
    if model.get("hub_id"):
        candidates.append((str(model["hub_id"]), "the local Hugging Face cache"))
    if not candidates:
        return None, "no tokenizer: the run does not record where its model is (pass --tokenizer)"
    errors = []
    for loc, why in candidates:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return _auto(loc), f"{why} ({loc})"
        except Exception as exc:  # missing transformers, missing files: fall back to ids
            errors.append(f"{loc}: {type(exc).__name__}")
    return None, "no tokenizer could be loaded (" + "; ".join(errors) + "); pass --tokenizer"


def decode_each(tokenizer, ids) -> dict[int, str]:
    """{id: text of that id decoded alone} for the distinct ids given.

    Byte-level BPE pieces of a multi-byte character decode to U+FFFD on their own;
    that is what the token was, so it is shown as is.
    """
    out: dict[int, str] = {}
    for i in sorted({int(x) for x in ids}):
        try:
            out[i] = tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        except TypeError:  # tokenizers without those keywords
            out[i] = tokenizer.decode([i])
        except Exception:
            out[i] = f"#{i}"
    return out
