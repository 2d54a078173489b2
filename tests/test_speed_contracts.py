"""What the fast decoding path promises: it decodes no more than the detectors read, and it
gives the same tokens and log-probabilities as the textbook ``generate(output_scores=True)``."""

from __future__ import annotations

import numpy as np
import pytest

from distill_detect.data import load_questions


@pytest.fixture(scope="module")
def questions():
    return load_questions("bundled:gsm8k_test")[:6]


def test_tpd_only_audit_decodes_at_most_budget_plus_one_per_question(tiny_dir, tmp_path, monkeypatch):
    """A TPD-only run of N questions with --tpd-tokens M runs at most N x (M + 1) decoding rows."""
    from distill_detect import cli
    from distill_detect.backends.hf import HFBackend
    from distill_detect.pipeline import read_run

    decoded = {"rows": 0}

    real_emit = HFBackend._emit

    def counting_emit(self, logits):
        # One call per decoding step; each row of the batch it holds decodes one token there
        # (the prefill's step included), whichever forward (fused or transformers') made the logits.
        decoded["rows"] += logits.shape[0]
        return real_emit(self, logits)

    monkeypatch.setattr(HFBackend, "_emit", counting_emit)
    N, M = 6, 8
    out = tmp_path / "audit"
    rc = cli.main(
        [
            "run",
            "--members",
            "bundled:gsm8k_train_sample",
            "--nonmembers",
            "bundled:gsm8k_test",
            "--limit",
            str(N // 2),
            "--model",
            str(tiny_dir),
            "--tpd-tokens",
            str(M),
            "--batch-size",
            "4",
            "--bootstrap",
            "10",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    traces, _, _ = read_run(out / "run")
    assert len(traces) == N
    stored = sum(t.num_tokens for t in traces)
    assert stored <= N * M  # the budget, not the 1000-token default cap
    assert decoded["rows"] <= N * (M + 1)
    assert decoded["rows"] == stored  # every decoded row is a stored token: nothing is decoded past the budget


def _naive(model_dir, backend, qs, T):
    """The common research baseline, on a freshly loaded (unmodified) model."""
    import torch
    from transformers import AutoModelForCausalLM

    from distill_detect.prompts import build_prompt

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    stop = sorted(backend.stop_ids)
    enc = [build_prompt(backend.tok, q.text).ids for q in qs]
    L = max(len(e) for e in enc)
    ids = torch.full((len(enc), L), backend.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(enc):
        ids[i, L - len(e) :] = torch.tensor(e)
        mask[i, L - len(e) :] = 1
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=T,
            output_scores=True,
            return_dict_in_generate=True,
            eos_token_id=stop,
            pad_token_id=backend.pad_id,
        )
    gen = out.sequences[:, L:]
    lp = torch.log_softmax(torch.stack(out.scores, 1).float(), -1).gather(-1, gen[:, :, None])[:, :, 0]
    res = []
    for r in range(len(qs)):
        row = gen[r].tolist()
        n = next((j + 1 for j, t in enumerate(row) if t in stop), len(row))
        res.append((np.asarray(row[:n]), lp[r, :n].numpy()))
    return res


def test_fast_path_matches_naive_generate(tiny_dir, tiny_backend, questions):
    T = 12
    ref = _naive(tiny_dir, tiny_backend, questions, T)
    for batch in (questions, questions[:1]):
        got = tiny_backend.generate(batch, max_new_tokens=T)
        for t, (ids, lp) in zip(got, ref):
            assert np.array_equal(t.output_ids, ids)
            np.testing.assert_allclose(t.output_logprobs, lp, atol=1e-4, rtol=0)


def test_one_pass_step_statistics_match_log_softmax(tiny_backend):
    """The fused per-step statistics equal the textbook log-softmax ones."""
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3000, generator=g) * 4
    x[1, 7] = 40.0  # a confident row, like a memorised continuation
    tok, lp, mean, std = tiny_backend._emit(x)
    logp, mean_ref, std_ref = tiny_backend._stats(x)
    assert torch.equal(tok, x.argmax(-1))
    torch.testing.assert_close(lp, logp.gather(-1, tok[:, None])[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(mean, mean_ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(std, std_ref, atol=1e-4, rtol=1e-5)


def test_hf_ablations_are_public_and_change_speed_only(tiny_dir):
    """Every optimisation the speed benchmark switches off gives the same tokens (log-probs within 1e-4)."""
    import numpy as np
    import pytest

    from distill_detect.backends.hf import HFBackend
    from distill_detect.errors import ConfigError
    from distill_detect.types import Question

    qs = [Question(id=f"q{i}", text=f"What is {i} plus {i + 3}? Explain." * (1 + i % 2)) for i in range(4)]
    base = HFBackend(str(tiny_dir), dtype="float32", device="cpu").generate(qs, max_new_tokens=6)
    slow = HFBackend(str(tiny_dir), dtype="float32", device="cpu", ablate=set(HFBackend.ABLATIONS)).generate(qs, max_new_tokens=6)
    for a, b in zip(base, slow):
        assert a.output_ids.tolist() == b.output_ids.tolist()
        np.testing.assert_allclose(a.output_logprobs, b.output_logprobs, atol=1e-4)
        np.testing.assert_allclose(a.prompt_logprobs, b.prompt_logprobs, atol=1e-4)
    with pytest.raises(ConfigError, match="unknown optimisation"):
        HFBackend(str(tiny_dir), dtype="float32", device="cpu", ablate={"fast"})


def test_benchmarks_use_public_names_only():
    """No benchmark assigns to a private attribute or imports a private name of the package."""
    import ast
    from pathlib import Path

    for path in (Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                for t in node.targets:
                    assert not (isinstance(t, ast.Attribute) and t.attr.startswith("_")), f"{path.name}:{node.lineno}"
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("distill_detect"):
                assert not any(a.name.startswith("_") for a in node.names), f"{path.name}:{node.lineno}"
