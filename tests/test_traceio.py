"""The trace interchange format: round trip and validation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from distill_detect.errors import InputError
from distill_detect.traceio import read_traces_jsonl, write_traces_jsonl
from distill_detect.types import Trace


def test_round_trip_keeps_every_field(tmp_path):
    t = Trace(
        id="a",
        label=1,
        question="Q?",
        output_text="hi",
        output_ids=[5, 6],
        output_logprobs=[-0.5, 0.0],
        output_mean_logp=[-1.0, -0.2],
        output_std_logp=[0.5, 0.1],
        prompt_ids=[1, 2, 3],
        prompt_logprobs=[-1.0, -2.0, -3.0],
        finish_reason="stop",
        max_new_tokens=10,
        extra={"reference_output_logprobs": np.array([-0.1, -0.2], np.float32)},
    )
    write_traces_jsonl(tmp_path / "t.jsonl", [t])
    (b,) = read_traces_jsonl(tmp_path / "t.jsonl")
    for f in ("id", "label", "question", "output_text", "finish_reason", "max_new_tokens"):
        assert getattr(b, f) == getattr(t, f)
    for f in ("output_ids", "output_logprobs", "output_mean_logp", "output_std_logp", "prompt_ids", "prompt_logprobs"):
        assert np.array_equal(getattr(b, f), getattr(t, f)), f
    assert np.allclose(b.extra["reference_output_logprobs"], [-0.1, -0.2])


def test_minimal_line_is_enough(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"id": 3, "output_logprobs": [-0.1, -2]}\n')
    (t,) = read_traces_jsonl(tmp_path / "t.jsonl")
    assert t.id == "3" and t.label is None and t.num_tokens == 2 and t.output_ids is None


def test_text_only_line_with_samples(tmp_path):
    line = {"id": "a", "output_text": "It is 4.", "text_tokens": 4, "solution": "4",
            "samples": {"texts": ["4", "5"], "temperature": 1.0, "top_p": 1.0, "seed": 0, "max_new_tokens": 8, "num_tokens": [1, 1]}}  # fmt: skip
    (tmp_path / "t.jsonl").write_text(json.dumps(line) + "\n")
    (t,) = read_traces_jsonl(tmp_path / "t.jsonl")
    assert t.output_logprobs is None and t.num_tokens == 4 and t.solution == "4" and t.samples.texts == ("4", "5")
    write_traces_jsonl(tmp_path / "again.jsonl", [t])
    assert json.loads((tmp_path / "again.jsonl").read_text()) == line


@pytest.mark.parametrize(
    "line, field, needle",
    [
        ('{"id": "a", "output_logprobs": [-0.1, NaN]}', "output_logprobs", "must be finite"),
        ('{"id": "a", "output_logprobs": [-0.1, Infinity]}', "output_logprobs", "must be finite"),
        ('{"id": "a", "output_logprobs": [-0.1, 0.5]}', "output_logprobs", "cannot be positive"),
        ('{"id": "a", "output_logprobs": "oops"}', "output_logprobs", "list of numbers"),
        ('{"id": "a", "output_logprobs": [-0.1, "x"]}', "output_logprobs", "expected numbers"),
        ('{"id": "a"}', "output_logprobs", "missing"),
        ('{"output_logprobs": []}', "id", "missing"),
        ('{"id": "a", "output_logprobs": [-1], "output_token_ids": [1, 2]}', "output_token_ids", "2 token ids but 1"),
        ('{"id": "a", "output_logprobs": [-1], "label": 3}', "label", "0 or 1"),
        ('{"id": "a", "output_text": "4", "samples": {"texts": "4"}}', "samples.texts", "list of strings"),
        (
            '{"id": "a", "output_text": "4", "samples": {"texts": ["4"], "temperature": 0, "top_p": 1, "seed": 0, '
            '"max_new_tokens": 8}}',
            "samples.temperature",
            "positive number",
        ),
        ('{"id": "a", "output_text": "4", "text_tokens": -1}', "text_tokens", "non-negative integer"),
    ],
)
def test_bad_traces_name_line_and_field(tmp_path, line, field, needle):
    p = tmp_path / "t.jsonl"
    p.write_text('{"id": "ok", "output_logprobs": [-0.2]}\n' + line + "\n")
    with pytest.raises(InputError) as ei:
        read_traces_jsonl(p)
    assert ei.value.line == 2 and ei.value.field == field and needle in str(ei.value)


def test_duplicate_ids_refused(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(json.dumps({"id": "a", "output_logprobs": [-1]}) for _ in range(2)))
    with pytest.raises(InputError, match="duplicate id 'a' \\(first on line 1\\)"):
        read_traces_jsonl(p)


def test_rounding_positive_logprob_is_clipped(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"id": "a", "output_logprobs": [1e-7, -1]}\n')
    (t,) = read_traces_jsonl(p)
    assert t.output_logprobs[0] == 0.0
