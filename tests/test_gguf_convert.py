"""Hugging Face checkpoint -> GGUF (distill_detect/gguf_convert.py): the pure pieces on small inputs, then the
embedded model's float32 checkpoint converted at f16 and q8_0 and run by the llamacpp backend.

The conversions are cached under the user's distill-detect cache (``gguf/``), like the embedded model's
safetensors copy, so only the first run pays the ~10 s per quantisation.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from distill_detect.errors import ConfigError

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")


def test_permute_rotary_interleaves_the_two_halves_of_each_head():
    from distill_detect.gguf_convert import permute_rotary

    n_head, d, cols = 3, 8, 2
    w = np.arange(n_head * d * cols, dtype=np.float32).reshape(n_head * d, cols)
    out = permute_rotary(w, n_head)
    for h in range(n_head):
        for i in range(d // 2):
            np.testing.assert_array_equal(out[h * d + 2 * i], w[h * d + i])  # first half -> even rows
            np.testing.assert_array_equal(out[h * d + 2 * i + 1], w[h * d + d // 2 + i])  # second half -> odd rows
    assert not np.array_equal(out, w)


def test_pre_tokenizer_names_and_refusal():
    from distill_detect.gguf_convert import _LLAMA3_REGEX, pre_tokenizer_name

    bl = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert pre_tokenizer_name({"pre_tokenizer": bl}) == "gpt-2"
    digits = {"type": "Digits", "individual_digits": True}
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [digits, bl]}}) == "smollm"
    split = {"type": "Split", "pattern": {"Regex": _LLAMA3_REGEX}, "behavior": "Isolated"}
    seq = {"type": "Sequence", "pretokenizers": [split, {**bl, "use_regex": False}]}
    assert pre_tokenizer_name({"pre_tokenizer": seq}) == "llama-bpe"
    for bad in ({"type": "Metaspace"}, {"type": "Sequence", "pretokenizers": [{**split, "pattern": {"Regex": "x"}}, bl]}, None):
        with pytest.raises(ConfigError, match="pre-tokenizer"):
            pre_tokenizer_name({"pre_tokenizer": bad})


def test_vocab_tokens_types_and_padding():
    from distill_detect.gguf_convert import vocab_tokens

    tj = {
        "model": {"vocab": {"a": 2, "b": 3, "Ġc": 4}},
        "added_tokens": [{"id": 0, "content": "<s>", "special": True}, {"id": 1, "content": "<tool>", "special": False}],
    }
    tokens, types = vocab_tokens(tj, 6)
    T = gguf.TokenType
    assert tokens == ["<s>", "<tool>", "a", "b", "Ġc", "[PAD5]"]
    assert types == [T.CONTROL, T.USER_DEFINED, T.NORMAL, T.NORMAL, T.NORMAL, T.USER_DEFINED]
    with pytest.raises(ConfigError, match="vocabulary"):
        vocab_tokens(tj, 4)


def test_tensor_mapping_tied_head_and_q8_blocks():
    from distill_detect.gguf_convert import hf_to_gguf_tensor

    cfg = {"num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 2, "tie_word_embeddings": True}
    assert hf_to_gguf_tensor("lm_head.weight", np.zeros((4, 32)), cfg, "f16") is None
    name, arr, raw = hf_to_gguf_tensor("model.layers.1.mlp.down_proj.weight", np.ones((4, 64)), cfg, "f16")
    assert name == "blk.1.ffn_down.weight" and arr.dtype == np.float16 and raw is None
    name, arr, raw = hf_to_gguf_tensor("model.norm.weight", np.ones(64), cfg, "q8_0")
    assert name == "output_norm.weight" and arr.dtype == np.float32
    name, arr, raw = hf_to_gguf_tensor("model.layers.0.self_attn.k_proj.weight", np.ones((8, 64)), cfg, "q8_0")
    assert name == "blk.0.attn_k.weight" and raw == gguf.GGMLQuantizationType.Q8_0
    assert arr.dtype == np.uint8 and arr.shape == (8, 2 * 34)  # two blocks of 32: f16 scale + 32 int8 each
    with pytest.raises(ConfigError, match="no place"):
        hf_to_gguf_tensor("model.layers.0.mystery.weight", np.ones((4, 32)), cfg, "f16")


def _light_copy(src, dst):
    """A checkpoint folder sharing ``src``'s weights by symlink (cheap to change its small files)."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            (dst / f.name).symlink_to(f)
        elif f.is_file():
            shutil.copy(f, dst / f.name)
    return dst


def test_checkpoint_hash_follows_config_tokenizer_and_weights(default_dir, tmp_path, monkeypatch):
    from distill_detect import gguf_convert

    monkeypatch.setenv("DISTILL_DETECT_CACHE", str(tmp_path / "cache"))
    a = _light_copy(default_dir, tmp_path / "a")
    h0 = gguf_convert.checkpoint_hash(a)
    assert gguf_convert.checkpoint_hash(a) == h0 and gguf_convert.gguf_path(a, "q8_0").name == f"{h0[:24]}-q8_0.gguf"
    cfg = json.loads((a / "config.json").read_text())
    (a / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-6}))
    h1 = gguf_convert.checkpoint_hash(a)
    (a / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    h2 = gguf_convert.checkpoint_hash(a)
    b = _light_copy(default_dir, tmp_path / "b")
    weights = next(b.glob("*.safetensors"))
    weights.unlink()
    shutil.copy(next(default_dir.glob("*.safetensors")), weights)
    with open(weights, "r+b") as fh:  # one byte of the weights changed
        fh.seek(-1, 2)
        last = fh.read(1)
        fh.seek(-1, 2)
        fh.write(bytes([last[0] ^ 1]))
    h3 = gguf_convert.checkpoint_hash(b)
    assert len({h0, h1, h2, h3}) == 4


def test_refuses_other_architectures_and_quants(default_dir, tmp_path):
    from distill_detect.gguf_convert import convert, ensure_gguf

    with pytest.raises(ConfigError, match="--gguf-quant"):
        ensure_gguf(default_dir, "q4_0")
    a = _light_copy(default_dir, tmp_path / "a")
    cfg = json.loads((a / "config.json").read_text())
    (a / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConfigError, match="GPT2LMHeadModel"):
        convert(a, tmp_path / "x.gguf", "f16")
    assert not (tmp_path / "x.gguf").exists()


# -- conversions of the embedded model's float32 checkpoint, run by llama.cpp -----------------------

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")


@pytest.fixture(scope="module")
def converted(default_dir):
    from distill_detect.gguf_convert import ensure_gguf

    return {q: ensure_gguf(default_dir, q, progress=False) for q in ("f16", "q8_0")}


def test_vocabulary_equals_the_embedded_gguf(converted):
    from distill_detect.models import find_default_gguf

    ref = gguf.GGUFReader(str(find_default_gguf()))
    for q, path in converted.items():
        r = gguf.GGUFReader(str(path))
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                    "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                    "tokenizer.ggml.padding_token_id", "tokenizer.chat_template", "llama.rope.freq_base",
                    "llama.attention.head_count_kv", "llama.rope.dimension_count"):  # fmt: skip
            assert r.fields[key].contents() == ref.fields[key].contents(), (q, key)
        types = {t.name: t.tensor_type.name for t in r.tensors}
        assert types["blk.0.attn_q.weight"] == {"f16": "F16", "q8_0": "Q8_0"}[q] and types["blk.0.attn_norm.weight"] == "F32"
        assert "output.weight" not in types  # tied head: llama.cpp reads token_embd


def test_cached_file_is_reused_without_converting(converted, default_dir, monkeypatch):
    from distill_detect import gguf_convert

    def boom(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_convert, "convert", boom)
    assert gguf_convert.ensure_gguf(default_dir, "f16", progress=False) == converted["f16"]


@pytest.fixture(scope="module")
def lc_f16(default_dir, converted):
    from distill_detect.backends.llamacpp import LlamaCppBackend

    be = LlamaCppBackend(str(default_dir), n_threads=1)  # a checkpoint folder: f16 by default
    yield be
    be.close()


@pytest.fixture(scope="module")
def hf(default_dir):
    from distill_detect.backends.hf import HFBackend

    return HFBackend(str(default_dir), dtype="float32", device="cpu")


def test_backend_takes_a_checkpoint_folder(lc_f16, converted, default_dir):
    from distill_detect.backends.llamacpp import LlamaCppBackend
    from distill_detect.gguf_convert import checkpoint_hash

    assert lc_f16.path == converted["f16"]
    fp = lc_f16.fingerprint()
    assert fp["dtype"] == "F16" and fp["model"]["gguf_quant"] == "f16"
    assert fp["model"]["checkpoint_sha256"] == checkpoint_hash(default_dir)[:24]
    with pytest.raises(ConfigError, match="--gguf-quant"):
        LlamaCppBackend(str(converted["q8_0"]), gguf_quant="q8_0")


def test_chat_prompt_ids_equal_the_hf_tokenizer(lc_f16, hf):
    from distill_detect.data import load_questions
    from distill_detect.prompts import build_prompt

    qs = load_questions("bundled:gsm8k_test")[:3] + load_questions("bundled:math_test")[:2]
    for sys_prompt in (None, "You are a careful solver. Answer with a number."):
        lc_f16.system_prompt = sys_prompt
        try:
            for q in qs:
                ids, span = lc_f16.build_prompt(q.text)
                ref = build_prompt(hf.tok, q.text, sys_prompt)
                assert ids == ref.ids and span == ref.question_span
        finally:
            lc_f16.system_prompt = None
    assert lc_f16.stop_ids == set(hf.fingerprint()["stop_ids"])


# Measured on the first 8 bundled:gsm8k_test questions x 64 tokens, 1 thread: all 8 greedy texts identical,
# max |Δ log p| 0.0103 on the generated tokens and 0.0151 on the question's tokens. Stated: 2x that.
F16_LOGPROB_TOL = 0.03


def test_f16_greedy_matches_the_float32_hf_backend(lc_f16, hf):
    from distill_detect.data import load_questions

    qs = load_questions("bundled:gsm8k_test")[:4]
    a = lc_f16.generate(qs, max_new_tokens=24)
    b = hf.generate(qs, max_new_tokens=24)
    for x, y in zip(a, b):
        assert x.output_text == y.output_text
        np.testing.assert_array_equal(x.output_ids, y.output_ids)
        assert np.abs(x.output_logprobs - y.output_logprobs).max() <= F16_LOGPROB_TOL
        assert np.abs(x.prompt_logprobs - y.prompt_logprobs).max() <= F16_LOGPROB_TOL


def test_settings_pass_gguf_quant_to_the_llamacpp_backend_only(monkeypatch):
    import distill_detect.backends as backends
    from distill_detect.settings import ModelSettings
    from distill_detect.types import GenConfig

    built = []
    monkeypatch.setattr(backends, "make_backend", lambda name, **kw: built.append((name, kw)) or object())
    ModelSettings(model="./student", backend="llamacpp", gguf_quant="q8_0", threads=1).factory(GenConfig())()
    ModelSettings(model="./student", backend="llamacpp").factory(GenConfig())()
    assert built[0][0] == "llamacpp" and built[0][1]["gguf_quant"] == "q8_0" and built[0][1]["n_threads"] == 1
    assert "gguf_quant" not in built[1][1]
    with pytest.raises(ConfigError, match="--gguf-quant"):
        ModelSettings(backend="hf", gguf_quant="q8_0")


def test_cli_audits_a_checkpoint_folder_on_llamacpp(default_dir, converted, tmp_path):
    from distill_detect import cli
    from distill_detect.pipeline import read_run

    out = tmp_path / "lc"
    rc = cli.main(["run", "--backend", "llamacpp", "--model", str(default_dir), "--threads", "1",
                   "--members", "bundled:gsm8k_train_sample", "--nonmembers", "bundled:gsm8k_test", "--limit", "1",
                   "--tpd-tokens", "3", "--bootstrap", "10", "--out", str(out)])  # fmt: skip
    assert rc == 0
    traces, fp, _ = read_run(out / "run")
    assert len(traces) == 2 and fp["backend"] == "llamacpp" and fp["dtype"] == "F16"
    assert fp["model"]["gguf_quant"] == "f16" and fp["model"]["gguf_sha256"]


# Random tiny models spread their mass thinly (the greedy token's log p is about -3 to -4), so greedy paths
# part at near-ties; the conversion is checked by teacher forcing the HF tokens instead. Measured at f16 on
# 3 questions x 12 tokens: |Δ log p| <= 0.031 (generated, forced) and <= 0.064 (question tokens). A missing
# rotary permutation or bias gives errors of whole nats.
TINY_TOL = 0.1


@pytest.mark.parametrize("fixture", ["tiny_dir", "qwen2_dir"])
def test_tiny_llama_and_qwen2_convert_and_score_like_hf(fixture, request, tmp_path, monkeypatch):
    """Random 2-layer checkpoints (Llama: untied head, 2 key/value heads, rotary permutation; Qwen2: tied head,
    q/k/v biases, no permutation) converted at f16 give HF's log-probabilities on HF's own greedy tokens."""
    from distill_detect.backends.hf import HFBackend
    from distill_detect.backends.llamacpp import LlamaCppBackend
    from distill_detect.data import load_questions

    monkeypatch.setenv("DISTILL_DETECT_CACHE", str(tmp_path / "cache"))
    folder = request.getfixturevalue(fixture)
    qs = load_questions("bundled:gsm8k_test")[:3]
    hf = HFBackend(str(folder), dtype="float32", device="cpu").generate(qs, max_new_tokens=12)
    be = LlamaCppBackend(str(folder), n_threads=1)
    try:
        assert be.file_type == "F16" and be.path.parent == tmp_path / "cache" / "gguf"
        lc = be.generate(qs, max_new_tokens=12)
        forced = be.score(qs, [y.output_ids for y in hf])
    finally:
        be.close()
    for x, y, f in zip(lc, hf, forced):
        assert x.output_ids[0] == y.output_ids[0]
        assert np.abs(f - y.output_logprobs).max() <= TINY_TOL
        assert np.abs(x.prompt_logprobs - y.prompt_logprobs).max() <= TINY_TOL


def test_gguf_quant_flag_reaches_the_settings_and_is_refused_off_llamacpp(tmp_path):
    from stand_ins import run_cli

    q = tmp_path / "q.jsonl"
    q.write_text('{"id": "a", "question": "What is 2+2?"}\n')
    rc, _, err = run_cli(["generate", "--questions", str(q), "--out", str(tmp_path / "r"), "--gguf-quant", "q8_0"])
    assert rc == 2 and "--gguf-quant q8_0: only for --backend llamacpp" in err
    with pytest.raises(SystemExit):  # argparse: not one of f16, q8_0
        run_cli(["generate", "--questions", str(q), "--out", str(tmp_path / "r"), "--gguf-quant", "q4"])
