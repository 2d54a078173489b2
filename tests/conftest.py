"""Shared fixtures.

* ``default_dir``: the embedded SmolLM2-135M-Instruct checkpoint (converted once into the cache).
* ``tiny_dir``: a randomly initialised 2-layer Llama with SmolLM2's tokenizer and chat template,
  saved as a normal HF checkpoint (no weights downloaded; builds in about a second).
* ``qwen2_dir``: the same as a 2-layer Qwen2 (tied embeddings, q/k/v biases).
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


def build_tiny_checkpoint(path, tokenizer_dir, *, seed: int = 0, layers: int = 2, hidden: int = 64, arch: str = "llama"):
    """A random checkpoint with SmolLM2's tokenizer: ``arch`` 'llama' (untied head) or 'qwen2'
    (tied embeddings, one key/value head, q/k/v biases drawn non-zero so they matter)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    cfg = config_cls(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2 if arch == "llama" else 1,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=arch != "llama",
        initializer_range=0.3,  # wide init: varied greedy tokens with clear margins
    )
    torch.manual_seed(seed)
    model = model_cls(cfg)
    if arch == "qwen2":
        with torch.no_grad():  # qwen2 initialises its q/k/v biases to zero
            for layer in model.model.layers:
                for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    m.bias.normal_(0, 0.5)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, default_dir):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-llama", default_dir)


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory, default_dir):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("qwen2") / "tiny-qwen2", default_dir, seed=1, arch="qwen2")


@pytest.fixture(scope="session")
def tiny_backend(tiny_dir):
    from distill_detect.backends.hf import HFBackend

    return HFBackend(str(tiny_dir), dtype="float32", device="cpu")
