"""benchmarks/studies.py's sampled-decoding backend on the tiny random model (seconds, no cached student)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from distill_detect.types import Question  # noqa: E402

QS = [Question(id=f"q{i}", text=t) for i, t in enumerate(["What is 2 + 3?", "Name a colour.", "Count to five, slowly."])]


def test_sampled_trace_reads_the_drawn_tokens(tiny_dir):
    from studies import SampledHF

    be = SampledHF(str(tiny_dir), dtype="float32", device="cpu", temperature=1.0, seed=3)
    traces = be.generate(QS, max_new_tokens=12)
    # The log-probs are those of the drawn tokens under the unscaled model (teacher-forcing agrees).
    forced = be.score(QS, [t.output_ids for t in traces])
    for t, lp in zip(traces, forced):
        assert t.num_tokens == len(lp) > 0
        np.testing.assert_allclose(t.output_logprobs, lp, atol=2e-4)
        assert t.prompt_logprobs is not None and len(t.prompt_ids) > 0
    # The tokens are the backend's own sampled answer 0 (same seeded stream), not the greedy ones.
    sampled = be.sample([(q, 0) for q in QS], temperature=1.0, top_p=1.0, seed=3, max_new_tokens=12)
    assert [t.output_text for t in traces] == [s.text for s in sampled]
    greedy = be._decode(QS, 12)
    assert any(list(g.output_ids) != list(t.output_ids) for g, t in zip(greedy, traces))
    assert be.fingerprint()["decoding"]["temperature"] == 1.0
