"""Greedy decoding with per-token log-probabilities on transformers (CPU or one GPU).

Batches are left-padded with explicit position ids, so a question gets the same
tokens and log-probabilities (within 1e-4 in float32) whatever batch it is in. Each
step reads only what the detectors need from the last position's logits: the
emitted token's log-softmax, and the mean and standard deviation of log p over the
vocabulary (for Min-K%++ and entropy). Full-vocabulary scores are never kept.
Sequences that finish leave the batch (their KV-cache rows are dropped), so a long
straggler does not make the others pay.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from distill_detect.backends.base import Backend
from distill_detect.errors import DistillDetectError, InputError, require
from distill_detect.prompts import build_prompt, template_hash
from distill_detect.types import Question, Trace

_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


class HFBackend(Backend):
    name = "hf"
    capabilities = frozenset({"output_logprobs", "output_stats", "prompt_logprobs", "prompt_stats", "score"})

    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str = "auto",
        device: str = "auto",
        system_prompt: str | None = None,
        prompt_logprobs: bool = True,
        trust_remote_code: bool = False,
        loaded=None,
    ):
        """``model``: 'default'/None, a local checkpoint directory or a hub id.

        ``loaded=(model, tokenizer, identity)`` wraps objects already in memory (tests, notebooks).
        """
        self.torch = require("torch", "hf", "The HF backend")
        transformers = require("transformers", "hf", "The HF backend")
        if loaded is not None:
            self.model, self.tok, identity = loaded
            self.model.eval()
            self.dtype = str(self.model.dtype).replace("torch.", "")
            self.device = str(self.model.device)
            self.location = getattr(self.model, "name_or_path", None)
        else:
            from distill_detect.models import load_hf, resolve_model

            ref = resolve_model(model)
            self.model, self.tok, self.dtype, self.device = load_hf(
                ref, dtype=dtype, device=device, trust_remote_code=trust_remote_code
            )
            identity = ref.identity
            self.location = ref.location
        self.identity = identity
        self.system_prompt = system_prompt
        self.want_prompt_logprobs = prompt_logprobs
        self.stop_ids = self._stop_ids()
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else sorted(self.stop_ids)[0]
        self.context = int(getattr(self.model.config, "max_position_embeddings", 0) or 0) or None
        self._versions = {"torch": self.torch.__version__, "transformers": transformers.__version__}
        self._template = template_hash(self.tok, system_prompt)
        # transformers 5 renamed the KV-cache argument and output field from past_key_values to cache.
        import inspect

        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def _stop_ids(self) -> set[int]:
        ids: set[int] = set()
        for src in (self.tok.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            if isinstance(src, int):
                ids.add(src)
            elif src:
                ids.update(int(x) for x in src)
        vocab = self.tok.get_vocab()
        ids.update(vocab[t] for t in _END_OF_TURN if t in vocab)
        if not ids:
            raise DistillDetectError("the tokenizer defines no EOS or end-of-turn token; cannot tell when a turn ends")
        return ids

    def fingerprint(self) -> dict:
        return {
            "backend": self.name,
            "model": dict(self.identity),
            "dtype": self.dtype,
            "device": self.device.split(":")[0],
            "versions": dict(self._versions),
            "template": self._template,
            "system_prompt": self.system_prompt,
            "decoding": "greedy",
            "stop_ids": sorted(self.stop_ids),
        }

    # -- helpers ---------------------------------------------------------------------------------

    def _left_pad(self, seqs: list[list[int]]):
        torch = self.torch
        L = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), L), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, L - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, L - len(s) :] = 1
        # Positions count real tokens only, so padding never shifts a row's rotary phases.
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        dev = self.model.device
        return ids.to(dev), mask.to(dev), pos.to(dev)

    def _stats(self, logits):
        """log-softmax rows -> (logp [n, V], mean of log p under p [n], std of log p under p [n])."""
        torch = self.torch
        logp = torch.log_softmax(logits.float(), dim=-1)
        p = logp.exp()
        mean = (p * logp).sum(-1)
        var = (p * logp * logp).sum(-1) - mean * mean
        return logp, mean, var.clamp(min=0).sqrt()

    def _cache_of(self, out):
        return getattr(out, self._cache_kw)

    def _prompt_fields(self, logits, ids, prompts) -> list[dict]:
        """Teacher-forced log-probs of each question's tokens from a left-padded prefill's logits."""
        L = ids.shape[1]
        res = []
        for i, p in enumerate(prompts):
            s, e = p.question_span
            off = L - len(p.ids)
            if e <= s:
                res.append({"prompt_ids": np.zeros(0, np.int32), "prompt_logprobs": np.zeros(0, np.float32)})
                continue
            # Logits at position j predict token j + 1.
            logp, mean, std = self._stats(logits[i, off + s - 1 : off + e - 1])
            target = ids[i, off + s : off + e]
            lp = logp.gather(-1, target[:, None])[:, 0]
            res.append(
                {
                    "prompt_ids": target.cpu().numpy().astype(np.int32),
                    "prompt_logprobs": lp.cpu().numpy(),
                    "prompt_mean_logp": mean.cpu().numpy(),
                    "prompt_std_logp": std.cpu().numpy(),
                }
            )
        return res

    def _check_length(self, q: Question, n: int) -> None:
        if self.context and n >= self.context:
            raise InputError(
                q.id, f"prompt is {n} tokens, the model's context is {self.context}; shorten or drop this question", field="question"
            )

    # -- the interface ---------------------------------------------------------------------------

    def generate(self, questions: Sequence[Question], *, max_new_tokens: int) -> list[Trace]:
        torch = self.torch
        prompts = [build_prompt(self.tok, q.text, self.system_prompt) for q in questions]
        for q, p in zip(questions, prompts):
            self._check_length(q, len(p.ids))
        ids, mask, pos = self._left_pad([p.ids for p in prompts])
        B, L = ids.shape
        steps = max_new_tokens if not self.context else max(1, min(max_new_tokens, self.context - L))
        stop = torch.tensor(sorted(self.stop_ids), device=ids.device)

        with torch.inference_mode():
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos,
                use_cache=True,
                logits_to_keep=0 if self.want_prompt_logprobs else 1,
            )
            prompt_fields: list[dict] = [{} for _ in range(B)]
            if self.want_prompt_logprobs:
                prompt_fields = self._prompt_fields(out.logits, ids, prompts)
            last = out.logits[:, -1, :]
            cache = self._cache_of(out)
            del out

            rows = list(range(B))  # batch row -> question index, shrinks as questions finish
            toks: list[list[int]] = [[] for _ in range(B)]
            lps: list[list[float]] = [[] for _ in range(B)]
            means: list[list[float]] = [[] for _ in range(B)]
            stds: list[list[float]] = [[] for _ in range(B)]
            finish = ["length"] * B
            cur_mask, cur_pos = mask, pos[:, -1]
            for step in range(steps):
                logp, mean, std = self._stats(last)
                nxt = last.argmax(-1)  # greedy; logits and log-softmax have the same argmax
                lp = logp.gather(-1, nxt[:, None])[:, 0]
                nxt_l, lp_l, mean_l, std_l = nxt.tolist(), lp.tolist(), mean.tolist(), std.tolist()
                for r, qi in enumerate(rows):
                    toks[qi].append(nxt_l[r])
                    lps[qi].append(lp_l[r])
                    means[qi].append(mean_l[r])
                    stds[qi].append(std_l[r])
                done = torch.isin(nxt, stop)
                for r in done.nonzero()[:, 0].tolist():
                    finish[rows[r]] = "stop"
                if step == steps - 1 or bool(done.all()):
                    break
                if bool(done.any()):
                    keep = (~done).nonzero()[:, 0]
                    cache.batch_select_indices(keep)
                    nxt, cur_mask, cur_pos = nxt[keep], cur_mask[keep], cur_pos[keep]
                    rows = [rows[k] for k in keep.tolist()]
                cur_mask = torch.cat([cur_mask, cur_mask.new_ones((cur_mask.shape[0], 1))], dim=1)
                cur_pos = cur_pos + 1
                out = self.model(
                    input_ids=nxt[:, None],
                    attention_mask=cur_mask,
                    position_ids=cur_pos[:, None],
                    use_cache=True,
                    **{self._cache_kw: cache},
                )
                last = out.logits[:, -1, :]
                cache = self._cache_of(out)

        traces = []
        for i, q in enumerate(questions):
            traces.append(
                Trace(
                    id=q.id,
                    question=q.text,
                    label=q.label,
                    output_ids=np.asarray(toks[i], np.int32),
                    output_logprobs=np.asarray(lps[i], np.float32),
                    output_mean_logp=np.asarray(means[i], np.float32),
                    output_std_logp=np.asarray(stds[i], np.float32),
                    output_text=self.tok.decode(toks[i], skip_special_tokens=True),
                    finish_reason=finish[i],
                    max_new_tokens=max_new_tokens,
                    **prompt_fields[i],
                )
            )
        return traces

    def score_prompts(self, questions: Sequence[Question]) -> list[dict]:
        """Teacher-forced question-token fields (prompt_ids, prompt_logprobs, prompt_mean_logp, prompt_std_logp)."""
        torch = self.torch
        prompts = [build_prompt(self.tok, q.text, self.system_prompt) for q in questions]
        for q, p in zip(questions, prompts):
            self._check_length(q, len(p.ids))
        ids, mask, pos = self._left_pad([p.ids for p in prompts])
        with torch.inference_mode():
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
            return self._prompt_fields(logits, ids, prompts)

    def score(self, questions: Sequence[Question], continuations: Sequence[np.ndarray]) -> list[np.ndarray]:
        torch = self.torch
        prompts = [build_prompt(self.tok, q.text, self.system_prompt) for q in questions]
        seqs = [p.ids + [int(t) for t in c] for p, c in zip(prompts, continuations)]
        for q, s in zip(questions, seqs):
            self._check_length(q, len(s))
        ids, mask, pos = self._left_pad(seqs)
        L = ids.shape[1]
        res = []
        with torch.inference_mode():
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
            for i, c in enumerate(continuations):
                n = len(c)
                if n == 0:
                    res.append(np.zeros(0, np.float32))
                    continue
                start = L - n  # first continuation token's position
                logp = torch.log_softmax(logits[i, start - 1 : L - 1].float(), dim=-1)
                lp = logp.gather(-1, ids[i, start:L, None])[:, 0]
                res.append(lp.cpu().numpy().astype(np.float32))
        return res

    def close(self) -> None:
        self.model = None
