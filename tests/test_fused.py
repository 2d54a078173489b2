"""The fused CPU forward (backends/fused.py) against transformers' own modules.

Both paths run the same checkpoint through HFBackend.generate; they must give identical tokens,
finish reasons, and log-probability fields within 1e-4 (float32), with rows of different prompt
lengths finishing at different steps, the prefill split into groups, and on llama (untied
head) and qwen2 (q/k/v biases, tied embeddings) checkpoints.
"""

from __future__ import annotations

import numpy as np
import pytest

from distill_detect.types import Question


def _questions():
    texts = [
        "What is 2 + 3?",
        "A farmer has 17 sheep and buys 5 more each week for 3 weeks. How many sheep does he have now?",
        "Name a prime.",
        "Tom reads 12 pages a day. His book has 300 pages and he has read 84. How many days until he finishes?",
        "Sum 1 to 10.",
    ]
    return [Question(id=f"q{i}", text=t) for i, t in enumerate(texts)]


def _pair(path):
    from distill_detect.backends.hf import HFBackend

    fused = HFBackend(str(path), dtype="float32", device="cpu", prompt_logprobs=True, fused=True)
    plain = HFBackend(str(path), dtype="float32", device="cpu", prompt_logprobs=True, fused=False)
    assert fused._fused is not None and plain._fused is None
    return fused, plain


def _same(a, b):
    assert [t.id for t in a] == [t.id for t in b]
    for x, y in zip(a, b):
        assert np.array_equal(x.output_ids, y.output_ids), x.id
        assert x.finish_reason == y.finish_reason
        for f in ("output_logprobs", "output_mean_logp", "output_std_logp", "prompt_logprobs", "prompt_mean_logp"):
            np.testing.assert_allclose(getattr(x, f), getattr(y, f), atol=1e-4, rtol=0, err_msg=f"{x.id} {f}")
        assert np.array_equal(x.prompt_ids, y.prompt_ids)


@pytest.mark.parametrize("which", ["llama", "qwen2"])
@pytest.mark.parametrize("compact_every", [1, 100])
def test_fused_matches_transformers(which, compact_every, tiny_dir, qwen2_dir, monkeypatch):
    from distill_detect.backends.hf import HFBackend

    monkeypatch.setattr(HFBackend, "_compact_every", compact_every)
    fused, plain = _pair(tiny_dir if which == "llama" else qwen2_dir)
    qs = _questions()
    T = 14
    ref = plain.generate(qs, max_new_tokens=T)
    # Make rows end at different steps: the tokens two rows emit at steps 3 and 8 become stops.
    extra = {int(ref[0].output_ids[3]), int(ref[2].output_ids[8])}
    for be in (fused, plain):
        be.stop_ids = set(be.stop_ids) | extra
    ref = plain.generate(qs, max_new_tokens=T)
    got = fused.generate(qs, max_new_tokens=T)
    lengths = sorted(len(t.output_ids) for t in ref)
    assert lengths[0] < T and lengths[0] < lengths[-1], "the test meant rows to finish at different steps"
    _same(got, ref)


def test_grouped_prefill_and_batch_invariance(tiny_dir, monkeypatch):
    """Prefill groups of a few rows give what one padded batch gives, and one question alone too."""
    import distill_detect.backends.hf as hfmod

    fused, plain = _pair(tiny_dir)
    qs = _questions()
    ref = plain.generate(qs, max_new_tokens=10)
    monkeypatch.setattr(hfmod, "_GROUP_TOKENS", 40)  # ~one row per group
    _same(fused.generate(qs, max_new_tokens=10), ref)
    for i in (0, 3):
        _same(fused.generate([qs[i]], max_new_tokens=10), [ref[i]])


def test_fused_weights_are_views_and_modules_still_agree(tiny_dir):
    """Fusing rewires the modules onto views of the fused weights: no copy kept, same logits."""
    import torch

    from distill_detect.backends.fused import FusedLlama
    from distill_detect.models import load_hf, resolve_model

    model, tok, _, _ = load_hf(resolve_model(str(tiny_dir)), dtype="float32", device="cpu")
    ids = torch.tensor([tok("Two plus two is four.")["input_ids"]])
    with torch.inference_mode():
        before = model(input_ids=ids).logits
    fz = FusedLlama(model)
    a = model.model.layers[0].self_attn
    qkv = fz.layers[0]["qkv"][0]
    assert a.q_proj.weight.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()
    assert a.v_proj.weight.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()
    with torch.inference_mode():
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


def test_unsupported_architectures_fall_back_or_refuse():
    from transformers import GPT2Config, GPT2LMHeadModel

    from distill_detect.backends.fused import FusedLlama, unsupported_reason

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=64))
    why = unsupported_reason(model)
    assert why and "gpt2" in why
    with pytest.raises(ValueError, match="gpt2"):
        FusedLlama(model)


def test_cli_no_fused_reaches_the_backend(tiny_dir, tmp_path, monkeypatch):
    """--no-fused is passed to HFBackend as fused=False; without it the backend decides (None)."""
    from distill_detect import cli
    from distill_detect.backends.hf import HFBackend

    seen = []
    real_init = HFBackend.__init__

    def init(self, *a, **kw):
        seen.append(kw.get("fused"))
        real_init(self, *a, **kw)
        seen.append(self._fused is not None)

    monkeypatch.setattr(HFBackend, "__init__", init)
    for flag, out in ((["--no-fused"], "a"), ([], "b")):
        rc = cli.main(
            ["generate", "--questions", "bundled:gsm8k_test", "--limit", "2", "--model", str(tiny_dir)]
            + ["--max-new-tokens", "3", "--out", str(tmp_path / out)]
            + flag
        )
        assert rc == 0
    assert seen == [False, False, None, True]
