"""End to end on the real embedded SmolLM2-135M-Instruct (small budget, still runs in CI)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from distill_detect.cli import main


@pytest.mark.slow
def test_demo_style_run_on_the_embedded_model(tmp_path, default_dir, capsys):
    out = tmp_path / "demo"
    argv = ["run", "--members", "bundled:gsm8k_train_sample", "--nonmembers", "bundled:gsm8k_test"]
    argv += ["--limit", "3", "--max-new-tokens", "16", "--batch-size", "6", "--out", str(out), "--bootstrap", "50", "--no-report"]
    assert main(argv) == 0
    assert "tpd" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    fp = metrics["config"]["source"]["fingerprint"]
    assert fp["model"]["name"].startswith("SmolLM2-135M-Instruct") and len(fp["model"]["gguf_sha256"]) == 64
    from distill_detect.pipeline import read_run

    traces, _, _ = read_run(out / "run")
    assert len(traces) == 6
    for t in traces:
        assert 1 <= t.num_tokens <= 16 and (t.output_logprobs <= 0).all()
        assert t.output_text.strip()  # a real model writes words
    # A trained instruct model is confident on many of its tokens: some p_t near 1.
    probs = np.concatenate([t.output_probs for t in traces])
    assert probs.max() > 0.9
