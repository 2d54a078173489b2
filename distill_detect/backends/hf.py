"""Greedy decoding with per-token log-probabilities on transformers (CPU or one GPU).

Batches are left-padded with explicit position ids, so a question gets the same
tokens and log-probabilities (within 1e-4 in float32) whatever batch it is in. Each
step reads only what the detectors need from the last position's logits: the
emitted token's log-softmax, and the mean and standard deviation of log p over the
vocabulary (for Min-K%++ and entropy). Full-vocabulary scores are never kept.
Sequences that finish leave the batch (their KV-cache rows are dropped once they are an
eighth of it), so a long straggler does not make the others pay.

What makes it fast (measured in benchmarks/speed.py, results in benchmarks/results/speed.md):
on CPU, Llama-family checkpoints (llama, mistral, qwen2) decode through the lean forward of
backends/fused.py (fused q/k/v and gate/up products, grouped-query attention without copying
the cache, one preallocated KV cache), the chat template's shared prefix is run once per batch
and the rest of the prompts in groups of similar length, and finished rows leave the batch in
bunches (the cache copy is paid per bunch, not per row). Elsewhere transformers' forward runs
with a KV cache written in place. Either way the per-step statistics come from one exponential
pass and stay in preallocated tensors until the batch ends, the linear weights are stored
transposed on CPU so the BLAS does not repack them on every small-batch product, and the prefill
projects onto the vocabulary only the positions that are read (the question span and the last
position). Tokens and log-probabilities match ``model.generate(output_scores=True)`` within 1e-4
(tests/test_speed_contracts.py, tests/test_fused.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from distill_detect.backends.base import Backend, Sampled, cpu_threads, require_stop_ids, sample_rng, stop_token_ids
from distill_detect.errors import ConfigError, DistillDetectError, require
from distill_detect.prompts import template_hash
from distill_detect.types import Question, Trace


def _column_major_linears(model) -> int:
    """Store every linear weight [out, in] transposed in memory (same values, same shape).

    ``F.linear`` computes x @ W.T; with W held as the transpose of a contiguous [in, out]
    array, W.T is contiguous and the CPU BLAS multiplies it without repacking the
    weight on every call. Measured on SmolLM2-135M (2-core Xeon, float32) this makes the
    small-batch products of decoding 1.2-2x faster. Returns the number of weights changed.
    """
    import torch

    seen: set[int] = set()
    n = 0
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if not isinstance(mod, torch.nn.Linear) or w is None or w.dim() != 2 or w.device.type != "cpu" or id(w) in seen:
            continue
        seen.add(id(w))
        if w.is_contiguous():
            w.data = w.data.t().contiguous().t()
            n += 1
    return n


def _growing_cache(model, capacity: int):
    """A transformers DynamicCache whose full-attention layers write into buffers sized once.

    The stock dynamic layer concatenates every new key/value onto the whole cache, so each
    decoding step copies the cache (quadratic in the length). Here each layer allocates
    ``capacity`` positions at its first update and afterwards writes in place, handing the
    attention a view of the filled part. Returns None (the model's own cache) where this
    transformers has no such layer API, or the model uses other layer kinds.
    """
    try:
        import torch
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:  # pragma: no cover - older transformers
        return None

    class GrowingLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            n_new = key_states.shape[-2]
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                b, h, _, d = key_states.shape
                cap = max(capacity, n_new)
                self._k = key_states.new_empty((b, h, cap, d))
                self._v = value_states.new_empty((b, h, cap, value_states.shape[-1]))
                self._n = 0
            end = self._n + n_new
            if end > self._k.shape[-2]:  # past the planned capacity: grow (not expected)
                grow = max(end, 2 * self._k.shape[-2])
                self._k = torch.cat(
                    [self._k[..., : self._n, :], self._k.new_empty(self._k.shape[:2] + (grow - self._n, self._k.shape[-1]))],
                    dim=-2,
                )
                self._v = torch.cat(
                    [self._v[..., : self._n, :], self._v.new_empty(self._v.shape[:2] + (grow - self._n, self._v.shape[-1]))],
                    dim=-2,
                )
            self._k[..., self._n : end, :] = key_states
            self._v[..., self._n : end, :] = value_states
            self._n = end
            self.keys, self.values = self._k[..., :end, :], self._v[..., :end, :]
            return self.keys, self.values

        def batch_select_indices(self, indices):
            if self.is_initialized:
                self._k, self._v = self._k[indices], self._v[indices]
                self.keys, self.values = self._k[..., : self._n, :], self._v[..., : self._n, :]

        def crop(self, tokens_to_remove):  # pragma: no cover - not used by greedy decoding
            raise NotImplementedError

    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # pragma: no cover - older signature
        return None
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None  # sliding-window or hybrid layers: keep the model's own cache
    cache.layers = [GrowingLayer() for _ in cache.layers]
    return cache


class _ModelRun:
    """Decoding through transformers' own forward (GPU, and architectures the fused forward lacks)."""

    def __init__(self, be, ids, mask, pos, capacity: int):
        self.be, self.ids, self.pos = be, ids, pos
        self.L = ids.shape[1]
        self.padded = bool((mask == 0).any())
        self.mask = mask
        self.cache = None if "cache" in be.ablate else _growing_cache(be.model, capacity)
        self.full_mask = None
        if self.padded:
            self.full_mask = be.torch.ones((ids.shape[0], capacity), dtype=mask.dtype, device=ids.device)
            self.full_mask[:, : self.L] = mask

    def prefill(self, keep: int):
        kw = {self.be._cache_kw: self.cache} if self.cache is not None else {}
        out = self.be.model(
            input_ids=self.ids,
            attention_mask=self.mask if self.padded else None,
            position_ids=self.pos,
            use_cache=True,
            logits_to_keep=keep,
            **kw,
        )
        self.cache = self.be._cache_of(out)
        return out.logits

    def select(self, keep):
        self.cache.batch_select_indices(keep)
        if self.full_mask is not None:
            self.full_mask = self.full_mask[keep]
        return keep

    def step(self, nxt, cur_pos, step: int):
        out = self.be.model(
            input_ids=nxt[:, None],
            attention_mask=None if self.full_mask is None else self.full_mask[:, : self.L + step + 1],
            position_ids=cur_pos[:, None],
            use_cache=True,
            **{self.be._cache_kw: self.cache},
        )
        self.cache = self.be._cache_of(out)
        return out.logits[:, -1, :]


_GROUP_TOKENS = 2048  # rows x length of one prefill group in the fused path


class _FusedRun:
    """Decoding through backends/fused.py, with additive masks for padding.

    The prompts of a batch usually share a prefix (the chat template's system turn). Its keys
    and values are computed once and copied to every row, and only the rest of each prompt is
    run as a batch. Cache slots are laid out [shared prefix | padding | rest of the prompt |
    generated], positions counting real tokens only, so the numbers are those of a plain
    left-padded batch (within float rounding).
    """

    def __init__(self, fz, seqs: list[list[int]], need: list[int], pad_id: int, capacity: int):
        import torch

        self.fz = fz
        inf = float("-inf")
        B = len(seqs)
        # The shared prefix stops before the first position whose logits are read.
        P = min(need)
        for s in seqs[1:]:
            n = 0
            while n < P and s[n] == seqs[0][n]:
                n += 1
            P = n
        self.P = P
        self.prefix = torch.tensor([seqs[0][:P]], dtype=torch.long)
        rest = [s[P:] for s in seqs]
        S = max(len(r) for r in rest)
        self.L = P + S
        ids = torch.full((B, S), pad_id, dtype=torch.long)
        pad = torch.tensor([S - len(r) for r in rest])
        for i, r in enumerate(rest):
            ids[i, S - len(r) :] = torch.tensor(r, dtype=torch.long)
        c = torch.arange(S)
        self.ids = ids
        self.pos = (P + (c[None, :] - pad[:, None])).clamp(min=0)
        self.pad = pad
        self.cache = fz.new_cache(B, capacity)
        slot = torch.arange(capacity)
        bad = (slot[None, :] >= P) & (slot[None, :] < P + pad[:, None])  # padding slots per row
        self.bias = torch.zeros((B, 1, 1, capacity), dtype=fz.dtype).masked_fill_(bad[:, None, None, :], inf)

    def prefill(self, keep: int):
        """Fill the cache; returns logits [B, keep, V] of the last ``keep`` positions (left-padded view).

        The rest of each prompt runs in groups of rows of similar length (rows x length up to
        ``_GROUP_TOKENS``), so a batch pays little for padding to its longest prompt.
        """
        fz, P = self.fz, self.P
        torch = fz.torch
        inf = float("-inf")
        B, S = self.ids.shape
        kc, vc = self.cache["k"], self.cache["v"]
        if P:
            one = fz.new_cache(1, P)
            r = torch.arange(P)
            causal = torch.zeros((1, 1, P, P), dtype=fz.dtype).masked_fill_(r[None, :] > r[:, None], inf)
            fz.forward(one, self.prefix, r[None, :], causal, keep_last=0)
            kc[:, :, :, :P] = one["k"]
            vc[:, :, :, :P] = one["v"]
        lens = [S - int(x) for x in self.pad]
        order = sorted(range(B), key=lambda i: -lens[i])
        logits = None
        i = 0
        while i < B:
            Sg = max(lens[order[i]], 1)
            j = i + 1
            while j < B and (j - i + 1) * Sg <= _GROUP_TOKENS:
                j += 1
            idx = torch.tensor(sorted(order[i:j]))
            i = j
            g = fz.new_cache(len(idx), P + Sg)
            g["k"][:, :, :, :P] = kc[:, idx, :, :P]
            g["v"][:, :, :, :P] = vc[:, idx, :, :P]
            g["n"] = P
            c = torch.arange(P + Sg)
            q = P + torch.arange(Sg)
            padg = self.pad[idx] - (S - Sg)  # padding inside the group's window
            bad = (c[None, :] >= P) & (c[None, :] < P + padg[:, None])
            ok = (c[None, None, :] <= q[None, :, None]) & ~bad[:, None, :]
            ok |= c[None, None, :] == q[None, :, None]
            bias = torch.zeros((len(idx), 1, Sg, P + Sg), dtype=fz.dtype).masked_fill_(~ok[:, None], inf)
            k = min(keep, Sg)
            out = fz.forward(g, self.ids[idx, S - Sg :], self.pos[idx, S - Sg :], bias, keep_last=k)
            # Into the batch cache: the group's window right-aligned, the slots before it zeroed
            # (they are masked, but must hold finite numbers).
            kc[:, idx, :, P + S - Sg : P + S] = g["k"][:, :, :, P:]
            vc[:, idx, :, P + S - Sg : P + S] = g["v"][:, :, :, P:]
            if S > Sg:
                kc[:, idx, :, P : P + S - Sg] = 0
                vc[:, idx, :, P : P + S - Sg] = 0
            if logits is None:
                logits = out.new_zeros((B, keep, out.shape[-1]))
            logits[idx, keep - k :] = out
        self.cache["n"] = P + S
        return logits

    def select(self, keep):
        order = self.fz.torch.tensor(self.fz.select(self.cache, keep))
        self.bias = self.bias[order]
        return order

    def step(self, nxt, cur_pos, step: int):
        T = self.L + step + 1
        return self.fz.forward(self.cache, nxt[:, None], cur_pos[:, None], self.bias[..., :T])[:, -1, :]


class HFBackend(Backend):
    name = "hf"
    capabilities = frozenset({"output_logprobs", "output_stats", "prompt_logprobs", "prompt_stats", "score", "samples"})
    cli_options = {"threads": "n_threads", "fused": "fused"}
    ABLATIONS = {
        "layout": "keep nn.Linear weights row-major (no column-major copy on CPU)",
        "cache": "transformers' concatenating DynamicCache instead of the preallocated one",
        "stats": "per-step statistics through a full [n, V] log-softmax instead of one exponential pass",
        "narrow": "project every prefill position onto the vocabulary, not only the read ones",
        "fused": "transformers' own modules instead of the fused Llama-family forward",
    }
    """Optimisations that ``ablate`` can switch off one by one (what ``benchmarks/speed.py`` measures)."""
    _compact_every = 8  # finished rows leave the batch once they are 1/8 of it (copying the cache costs)

    def __init__(
        self,
        model: str | None = None, *, dtype: str = "auto", device: str = "auto", system_prompt: str | None = None,
        prompt_logprobs: bool = True, trust_remote_code: bool = False,  # the options every backend takes (base.py)
        loaded=None,
        n_threads: int | None = None,
        fused: bool | None = None,
        ablate: frozenset[str] | set[str] = frozenset(),
    ):  # fmt: skip
        """``model``: 'default'/None, a local checkpoint directory or a hub id.

        ``loaded=(model, tokenizer, identity)`` wraps objects already in memory (tests, notebooks).
        ``n_threads`` sets torch's CPU thread count for the whole process (``torch.set_num_threads``).
        ``fused``: decode through the lean Llama-family forward of backends/fused.py (None: where the
        model supports it, which means a llama/mistral/qwen2 checkpoint on CPU; True: require it).
        ``ablate``: names of ``ABLATIONS`` to switch off, to measure what each buys (same tokens, slower).
        """
        unknown = set(ablate) - set(self.ABLATIONS)
        if unknown:
            raise ConfigError(f"ablate: unknown optimisation {sorted(unknown)[0]!r}; known: {', '.join(self.ABLATIONS)}")
        self.ablate = frozenset(ablate)
        self._narrow_prefill = "narrow" not in self.ablate
        self.torch = require("torch", "hf", "The HF backend")
        if n_threads is not None:
            self.torch.set_num_threads(cpu_threads(n_threads))
        transformers = require("transformers", "hf", "The HF backend")
        if loaded is not None:
            self.model, self.tok, identity = loaded
            self.model.eval()
            self.dtype = str(self.model.dtype).replace("torch.", "")
            self.device = str(self.model.device)
            location = getattr(self.model, "name_or_path", None)
        else:
            from distill_detect.models import load_hf, resolve_model

            ref = resolve_model(model)
            self.model, self.tok, self.dtype, self.device = load_hf(
                ref, dtype=dtype, device=device, trust_remote_code=trust_remote_code
            )
            identity, location = ref.identity, ref.location
        self.setup_common(identity=identity, location=location, system_prompt=system_prompt, prompt_logprobs=prompt_logprobs)
        if str(self.device).startswith("cpu") and "layout" not in self.ablate:
            _column_major_linears(self.model)
        self._fused = None
        if ("fused" not in self.ablate) if fused is None else fused:
            from distill_detect.backends.fused import FusedLlama, unsupported_reason

            why = unsupported_reason(self.model)  # the architecture, and CPU only
            if why is None:
                self._fused = FusedLlama(self.model)
            elif fused:
                raise DistillDetectError(f"fused decoding was asked for, but {why}")
        self.stop_ids = require_stop_ids(stop_token_ids(self.tok, getattr(self.model.generation_config, "eos_token_id", None)))
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else sorted(self.stop_ids)[0]
        self.context = int(getattr(self.model.config, "max_position_embeddings", 0) or 0) or None
        self._versions = {"torch": self.torch.__version__, "transformers": transformers.__version__}
        self._template = template_hash(self.tok, system_prompt)
        # transformers 5 renamed the KV-cache argument and output field from past_key_values to cache.
        import inspect

        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def fingerprint(self) -> dict:
        return self.base_fingerprint(
            dtype=self.dtype,
            device=self.device.split(":")[0],
            versions=self._versions,
            template=self._template,
            stop_ids=self.stop_ids,
        )

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

    def _emit(self, logits):
        """Greedy step on last-position logits [n, V] -> (token, its log p, mean and std of log p under p).

        One exponential pass: with z = x - max(x), e = exp(z) and S = sum(e), the emitted
        (argmax) token has z = 0 so log p = -log S; E_p[log p] = E_p[z] - log S and the
        variance of log p equals that of z, E_p[z^2] - E_p[z]^2. No [n, V] log-softmax is kept.
        """
        if "stats" in self.ablate:
            logp, mean, std = self._stats(logits)
            tok = logits.argmax(-1)
            return tok, logp.gather(-1, tok[:, None])[:, 0], mean, std
        x = logits.float()
        mx, tok = x.max(-1, keepdim=True)
        z = x - mx
        e = z.exp()
        s = e.sum(-1)
        ez = e * z
        a = ez.sum(-1) / s
        b = (ez * z).sum(-1) / s
        lse = s.log()
        return tok[:, 0], -lse, a - lse, (b - a * a).clamp(min=0).sqrt()

    def _cache_of(self, out):
        return getattr(out, self._cache_kw)

    def _prompt_fields(self, logits, ids, prompts, first: int = 0) -> list[dict]:
        """Teacher-forced log-probs of each question's tokens from a left-padded prefill's logits.

        ``logits`` covers positions ``first`` .. L-1 of ``ids`` (the prefill may skip the rest).
        """
        L = ids.shape[1]
        res = []
        for i, p in enumerate(prompts):
            s, e = p.question_span
            off = L - len(p.ids)
            if e <= s:
                res.append({"prompt_ids": np.zeros(0, np.int32), "prompt_logprobs": np.zeros(0, np.float32)})
                continue
            # Logits at position j predict token j + 1.
            logp, mean, std = self._stats(logits[i, off + s - 1 - first : off + e - 1 - first])
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

    # -- the interface ---------------------------------------------------------------------------

    def generate(self, questions: Sequence[Question], *, max_new_tokens: int) -> list[Trace]:
        return self._decode(questions, max_new_tokens)

    def sample(self, requests, *, temperature: float, top_p: float, seed: int, max_new_tokens: int) -> list[Sampled]:
        """Answers sampled by the same decoding loop as ``generate``, one row per (question, k).

        Each row draws one uniform number per step from its own stream (``sample_rng``), so an
        answer does not depend on the other rows of its batch."""
        rngs = [sample_rng(seed, q.id, k) for q, k in requests]
        pick = self._sampler(rngs, temperature, top_p)
        traces = self._decode([q for q, _ in requests], max_new_tokens, pick=pick)
        return [Sampled(t.output_text or "", t.num_tokens, t.finish_reason) for t in traces]

    def _sampler(self, rngs, temperature: float, top_p: float):
        torch = self.torch

        def pick(logits, rows):
            u = torch.tensor([rngs[int(r)].random() for r in rows.tolist()], dtype=torch.float64, device=logits.device)
            p = torch.softmax(logits.double() / temperature, dim=-1)
            ps, order = torch.sort(p, dim=-1, descending=True, stable=True)
            if top_p < 1.0:
                ps = torch.where(ps.cumsum(-1) - ps < top_p, ps, torch.zeros_like(ps))
            cdf = ps.cumsum(-1)
            idx = (cdf <= u[:, None] * cdf[:, -1:]).sum(-1).clamp(max=ps.shape[-1] - 1)
            return order.gather(-1, idx[:, None])[:, 0]

        return pick

    def _decode(self, questions: Sequence[Question], max_new_tokens: int, pick=None) -> list[Trace]:
        """The decoding loop: greedy, or with ``pick(last_logits [n, V], rows [n]) -> tokens`` choosing each token
        (``rows``: the question index of each batch row); prompt log-probs only when greedy."""
        torch = self.torch
        want_prompt = self.want_prompt_logprobs and pick is None
        prompts = self.build_prompts(questions)
        ids, mask, pos = self._left_pad([p.ids for p in prompts])
        B, L = ids.shape
        steps = max_new_tokens if not self.context else max(1, min(max_new_tokens, self.context - L))
        stop = torch.tensor(sorted(self.stop_ids), device=ids.device)
        # The prefill projects onto the vocabulary only the positions read later: the last one, and
        # with prompt log-probs the question spans (not the system turn and template before them).
        first = L - 1
        if want_prompt and not self._narrow_prefill:
            first = 0
        elif want_prompt:
            spans = [(L - len(p.ids) + p.question_span[0] - 1) for p in prompts if p.question_span[1] > p.question_span[0]]
            first = min([first, *spans])

        with torch.inference_mode():
            if self._fused is not None:
                # Prompt index of the first position whose logits are read, per question.
                need = [len(p.ids) - 1 for p in prompts]
                if want_prompt:
                    need = [
                        min(n, p.question_span[0] - 1) if p.question_span[1] > p.question_span[0] else n
                        for n, p in zip(need, prompts)
                    ]
                run = _FusedRun(self._fused, [p.ids for p in prompts], need, self.pad_id, L + steps)
            else:
                run = _ModelRun(self, ids, mask, pos, L + steps)
            logits = run.prefill(L - first)
            prompt_fields: list[dict] = [{} for _ in range(B)]
            if want_prompt:
                prompt_fields = self._prompt_fields(logits, ids, prompts, first)
            last = logits[:, -1, :]
            del logits

            # Per-step results stay in preallocated tensors (row = question) until the end.
            dev = ids.device
            out_tok = torch.zeros((B, steps), dtype=torch.long, device=dev)
            out_val = torch.zeros((3, B, steps), dtype=torch.float32, device=dev)  # log p, mean, std
            n_tok = [steps] * B
            rows = torch.arange(B, device=dev)  # batch row -> question index, shrinks as rows are compacted
            alive = torch.ones(B, dtype=torch.bool, device=dev)  # rows still decoding (finished ones wait)
            finish = ["length"] * B
            cur_pos = pos[:, -1]
            for step in range(steps):
                nxt, lp, mean, std = self._emit(last)
                if pick is not None:
                    nxt = pick(last, rows)
                # A finished row still in the batch writes past its end; those columns are never read.
                out_tok[rows, step] = nxt
                out_val[:, rows, step] = torch.stack([lp, mean, std])
                done = torch.isin(nxt, stop) & alive
                if step == steps - 1:
                    for r in done.nonzero()[:, 0].tolist():
                        finish[int(rows[r])] = "stop"
                    break
                if bool(done.any()):
                    for r in done.nonzero()[:, 0].tolist():
                        qi = int(rows[r])
                        finish[qi], n_tok[qi] = "stop", step + 1
                    alive &= ~done
                    n_alive = int(alive.sum())
                    if n_alive == 0:
                        break
                    if (len(alive) - n_alive) * self._compact_every >= len(alive):
                        keep = run.select(alive.nonzero()[:, 0])  # the surviving rows, in their new order
                        nxt, cur_pos, rows, alive = nxt[keep], cur_pos[keep], rows[keep], alive[keep]
                cur_pos = cur_pos + 1
                last = run.step(nxt, cur_pos, step)

        toks_np, vals_np = out_tok.cpu().numpy(), out_val.cpu().numpy()
        traces = []
        for i, q in enumerate(questions):
            n = n_tok[i]
            tk = toks_np[i, :n]
            traces.append(
                Trace(
                    id=q.id,
                    question=q.text,
                    label=q.label,
                    output_ids=tk.astype(np.int32),
                    output_logprobs=vals_np[0, i, :n],
                    output_mean_logp=vals_np[1, i, :n],
                    output_std_logp=vals_np[2, i, :n],
                    # The stop token is kept in the ids but not in the text (as vLLM does).
                    output_text=self.tok.decode(tk[: n - 1 if finish[i] == "stop" else n].tolist(), skip_special_tokens=True),
                    finish_reason=finish[i],
                    max_new_tokens=max_new_tokens,
                    **prompt_fields[i],
                )
            )
        return traces

    def score_prompts(self, questions: Sequence[Question]) -> list[dict]:
        """Teacher-forced question-token fields (prompt_ids, prompt_logprobs, prompt_mean_logp, prompt_std_logp)."""
        torch = self.torch
        prompts = self.build_prompts(questions)
        ids, mask, pos = self._left_pad([p.ids for p in prompts])
        with torch.inference_mode():
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
            return self._prompt_fields(logits, ids, prompts)

    def score(self, questions: Sequence[Question], continuations: Sequence[np.ndarray]) -> list[np.ndarray]:
        torch = self.torch
        prompts = self.build_prompts(questions, [len(c) for c in continuations])
        seqs = [p.ids + [int(t) for t in c] for p, c in zip(prompts, continuations)]
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
        """Drop the model and, on a GPU, hand its cached memory back (so the next model fits)."""
        self.model = self._fused = None
        import gc

        gc.collect()
        if str(getattr(self, "device", "")).startswith("cuda"):
            self.torch.cuda.empty_cache()
