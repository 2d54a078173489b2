"""Turn a question into the token ids a chat model sees, and find the question inside them.

The prompt is the model's own chat template with the question as the only user turn
(plus an optional system turn) and the generation prompt appended, as in the paper's
code. The template is rendered to text and tokenised without adding special tokens
again (the template already has them). ``question_span`` gives the half-open token
range that covers the question text, which the input-likelihood baselines score.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from distill_detect.errors import ConfigError


@dataclass(frozen=True)
class Prompt:
    text: str
    """The rendered prompt (template + question + generation prompt)."""
    ids: list[int]
    """Token ids of ``text``."""
    question_span: tuple[int, int]
    """[start, end) token indices that cover the question inside ``ids``."""


def messages_for(question: str, system_prompt: str | None = None) -> list[dict]:
    msgs = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    return msgs + [{"role": "user", "content": question}]


def render(tokenizer, question: str, system_prompt: str | None = None) -> str:
    """The prompt text: chat template with the question as the user turn and the assistant header."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "the tokenizer has no chat template; distill-detect audits chat (instruct) models. "
            "Use an instruct checkpoint or give the tokenizer a chat_template"
        )
    return tokenizer.apply_chat_template(messages_for(question, system_prompt), tokenize=False, add_generation_prompt=True)


def template_hash(tokenizer, system_prompt: str | None = None) -> str:
    """A short hash of the chat template as rendered (part of the run fingerprint)."""
    probe = render(tokenizer, "\x00QUESTION\x00", system_prompt)
    return hashlib.sha256((tokenizer.chat_template + "\n" + probe).encode()).hexdigest()[:16]


def build_prompt(tokenizer, question: str, system_prompt: str | None = None) -> Prompt:
    text = render(tokenizer, question, system_prompt)
    start_char = text.rfind(question)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if start_char < 0:  # a template that rewrites the content: score nothing rather than the wrong tokens
        return Prompt(text=text, ids=ids, question_span=(len(ids), len(ids)))
    end_char = start_char + len(question)
    offsets = enc["offset_mapping"]
    inside = [i for i, (a, b) in enumerate(offsets) if b > start_char and a < end_char]
    span = (inside[0], inside[-1] + 1) if inside else (len(ids), len(ids))
    # Token 0 has no left context, so it cannot be scored teacher-forced.
    return Prompt(text=text, ids=ids, question_span=(max(span[0], 1), span[1]))


def render_with_response(tokenizer, question: str, response: str, system_prompt: str | None = None) -> tuple[str, str]:
    """(prompt_text, full_text) for a training example; full_text = prompt + response + end-of-turn.

    The response part is ``full_text[len(prompt_text):]``; the loss is put on it only.
    """
    prompt = render(tokenizer, question, system_prompt)
    full = tokenizer.apply_chat_template(
        messages_for(question, system_prompt) + [{"role": "assistant", "content": response}], tokenize=False
    )
    if not full.startswith(prompt):
        # Templates that do not extend the generation prompt verbatim: fall back to prompt + response + eos.
        full = prompt + response + (tokenizer.eos_token or "")
    return prompt, full
