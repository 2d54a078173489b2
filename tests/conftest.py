"""Shared fixtures.

* ``default_dir``: the embedded SmolLM2-135M-Instruct checkpoint (converted once into the cache).
* ``tiny_dir``: a randomly initialised 2-layer Llama with SmolLM2's tokenizer and chat template,
  saved as a normal HF checkpoint (no weights downloaded; builds in about a second).
* ``tiny_backend``: an HFBackend over ``tiny_dir`` (float32, CPU).
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def default_dir():
    from distill_detect.models import default_model_dir

    return default_model_dir()


def build_tiny_checkpoint(path, tokenizer_dir, *, seed: int = 0, layers: int = 2, hidden: int = 64):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=0.3,  # wide init: varied greedy tokens with clear margins
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, default_dir):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-llama", default_dir)


@pytest.fixture(scope="session")
def tiny_backend(tiny_dir):
    from distill_detect.backends.hf import HFBackend

    return HFBackend(str(tiny_dir), dtype="float32", device="cpu")
