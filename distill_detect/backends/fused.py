"""A lean decoding forward for Llama-family checkpoints on CPU (llama, mistral, qwen2).

The HF backend decodes through transformers' modules by default on GPU; on CPU it uses this
forward instead when the architecture is one it knows, because a small model spends much of
each step outside the matrix products there (measured in benchmarks/speed.py). What differs
from the transformers forward, with the same arithmetic:

- q, k and v projections are one product on one fused weight, as are gate and up; the
  transformers modules keep working on views into those fused weights, so nothing is copied
  twice and ``score``/``score_prompts`` still run through them.
- Grouped-query attention reads the cache without repeating the key/value heads: the
  queries of a group are stacked and multiplied against their one key/value head.
- The KV cache is two preallocated tensors (layers x rows x heads x capacity x dim) written in
  place; rows that finish are compacted out in batches, not one copy per finished row.
- RMSNorm is torch's fused ``rms_norm`` (float32), no module or cache-object dispatch per layer.

Tokens and log-probabilities agree with ``model.generate`` within 1e-4 (float32): the
products sum in a different blocking, which moves values by ~1e-6
(tests/test_fused.py checks it against transformers on llama and qwen2 models).
"""

from __future__ import annotations

SUPPORTED = ("llama", "mistral", "qwen2")


def unsupported_reason(model) -> str | None:
    """Why this model cannot use the fused forward (None: it can)."""
    cfg = model.config
    kind = getattr(cfg, "model_type", None)
    if kind not in SUPPORTED:
        return f"model_type {kind!r} is not one of {', '.join(SUPPORTED)}"
    if model.device.type != "cpu":
        return "the fused forward is for CPU; on GPU transformers' kernels are used"
    if getattr(cfg, "use_sliding_window", False) or (kind == "mistral" and getattr(cfg, "sliding_window", None) not in (None, 0)):
        return "sliding-window attention is not implemented in the fused forward"
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return "layers other than full attention are not implemented in the fused forward"
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "layers") or not hasattr(base, "rotary_emb"):
        return "unexpected module layout"
    layer = base.layers[0]
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    need = [(attn, "q_proj"), (attn, "k_proj"), (attn, "v_proj"), (attn, "o_proj")]
    need += [(mlp, "gate_proj"), (mlp, "up_proj"), (mlp, "down_proj")]
    if any(m is None or not hasattr(m, n) for m, n in need):
        return "unexpected module layout"
    if getattr(attn, "q_norm", None) is not None or getattr(attn, "k_norm", None) is not None:
        return "query/key norms are not implemented in the fused forward"
    return None


def _fuse(linears, torch):
    """One [in, sum(out)] row-major weight for several nn.Linear sharing their input.

    Each module's weight becomes a transposed view of its columns (no second copy); returns
    (weight [in, out_total], bias [out_total] or None).
    """
    w = torch.cat([m.weight.detach().t() for m in linears], dim=1).contiguous()
    biases = [m.bias for m in linears]
    b = None
    if any(x is not None for x in biases):
        b = torch.cat(
            [x.detach() if x is not None else w.new_zeros(m.weight.shape[0]) for x, m in zip(biases, linears)]
        ).contiguous()
    start = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight.data = w[:, start : start + n].t()
        if m.bias is not None:
            m.bias.data = b[start : start + n]
        start += n
    return w, b


class FusedLlama:
    """The decoding forward. Build once per model (it rewires the model's weights into fused views)."""

    def __init__(self, model):
        import torch

        why = unsupported_reason(model)
        if why:
            raise ValueError(why)
        self.torch = torch
        self.F = torch.nn.functional
        cfg = model.config
        base = model.model
        self.base = base
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.group = self.n_heads // self.n_kv
        self.hidden = cfg.hidden_size
        self.scale = self.head_dim**-0.5
        self.dtype = next(model.parameters()).dtype
        self.layers = []
        with torch.no_grad():
            for layer in base.layers:
                a, m = layer.self_attn, layer.mlp
                qkv_w, qkv_b = _fuse([a.q_proj, a.k_proj, a.v_proj], torch)
                gu_w, gu_b = _fuse([m.gate_proj, m.up_proj], torch)
                o_w, o_b = _fuse([a.o_proj], torch)
                d_w, d_b = _fuse([m.down_proj], torch)
                self.layers.append(
                    {
                        "ln1": (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon),
                        "ln2": (layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon),
                        "qkv": (qkv_w, qkv_b),
                        "o": (o_w, o_b),
                        "gu": (gu_w, gu_b),
                        "down": (d_w, d_b),
                        "act": m.act_fn,
                        "inter": m.gate_proj.weight.shape[0],
                    }
                )
            head = model.get_output_embeddings()
            emb = base.embed_tokens
            tied = head.weight.data_ptr() == emb.weight.data_ptr() or head.weight is emb.weight
            hw = head.weight.detach().t().contiguous()  # [hidden, vocab]
            head.weight.data = hw.t()
            if tied:
                emb.weight.data = head.weight.data
            self.head_w = hw
            self.head_b = head.bias.detach() if getattr(head, "bias", None) is not None else None
        self.embed = emb
        self.norm = (base.norm.weight, base.norm.variance_epsilon)
        self.q_end = self.n_heads * self.head_dim
        self.k_end = self.q_end + self.n_kv * self.head_dim

    # -- pieces --------------------------------------------------------------------------------

    def _rms(self, x, w_eps):
        w, eps = w_eps
        if x.dtype == self.torch.float32:
            return self.F.rms_norm(x, (x.shape[-1],), w, eps)
        h = x.float()
        h = h * self.torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return w * h.to(x.dtype)

    def _lin(self, x, wb):
        w, b = wb
        x2 = x.reshape(-1, x.shape[-1])
        y = self.torch.mm(x2, w) if b is None else self.torch.addmm(b, x2, w)
        return y.view(*x.shape[:-1], w.shape[1])

    def _rotate(self, x, cos, sin):
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return x * cos + self.torch.cat((-x2, x1), dim=-1) * sin

    # -- the cache -----------------------------------------------------------------------------

    def new_cache(self, rows: int, capacity: int) -> dict:
        torch = self.torch
        shape = (len(self.layers), rows, self.n_kv, capacity, self.head_dim)
        return {"k": torch.empty(shape, dtype=self.dtype), "v": torch.empty(shape, dtype=self.dtype), "n": 0}

    def select(self, cache: dict, keep) -> list[int]:
        """Shrink the batch to the rows ``keep``; returns their new order (old row indices).

        Rows already inside the shrunk range stay where they are; only survivors from beyond
        it move into the freed rows, so the copy is proportional to the rows that finished,
        not to the batch.
        """
        torch = self.torch
        keep = sorted(int(i) for i in keep)
        m = len(keep)
        kept = set(keep)
        holes = [i for i in range(m) if i not in kept]
        movers = [i for i in keep if i >= m]
        order = list(range(m))
        for h, mv in zip(holes, movers):
            order[h] = mv
        n = cache["n"]
        if holes:
            h, mv = torch.tensor(holes), torch.tensor(movers)
            for name in ("k", "v"):
                c = cache[name]
                c[:, h, :, :n] = c[:, mv, :, :n]
        for name in ("k", "v"):
            cache[name] = cache[name][:, :m]
        return order

    # -- the forward ---------------------------------------------------------------------------

    def forward(self, cache: dict, ids, positions, bias, keep_last: int = 1):
        """Run ``ids`` [B, n] at ``positions`` [B, n] after the cached prefix; returns logits.

        ``bias`` is an additive float mask [B, 1, n, T] over cache slots 0..T-1 (T = cached +
        n), 0 where attended and -inf elsewhere. Logits cover the last ``keep_last`` positions.
        """
        torch = self.torch
        B, n = ids.shape
        H, KV, D, G = self.n_heads, self.n_kv, self.head_dim, self.group
        start = cache["n"]
        T = start + n
        x = self.embed(ids)
        cos, sin = self.base.rotary_emb(x, positions)  # [B, n, D]
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
        for li, p in enumerate(self.layers):
            h = self._rms(x, p["ln1"])
            qkv = self._lin(h, p["qkv"])  # [B, n, (H + 2 KV) D]
            q = qkv[..., : self.q_end].view(B, n, H, D)
            k = qkv[..., self.q_end : self.k_end].view(B, n, KV, D)
            v = qkv[..., self.k_end :].view(B, n, KV, D)
            q = self._rotate(q, cos, sin)
            k = self._rotate(k, cos, sin)
            kc, vc = cache["k"][li], cache["v"][li]  # [B, KV, cap, D]
            kc[:, :, start:T] = k.transpose(1, 2)
            vc[:, :, start:T] = v.transpose(1, 2)
            keys, vals = kc[:, :, :T], vc[:, :, :T]
            if n == 1:
                # Decoding: a group's queries side by side against their one key/value head.
                qg = q.view(B, KV, G, D)
                s = torch.matmul(qg, keys.transpose(-1, -2)) * self.scale  # [B, KV, G, T]
                s = s + bias[:, :, 0, None, :]
                att = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
                o = torch.matmul(att, vals).reshape(B, 1, H * D)
            else:
                o = self.F.scaled_dot_product_attention(
                    q.transpose(1, 2), keys, vals, attn_mask=bias, scale=self.scale, enable_gqa=G > 1
                )
                o = o.transpose(1, 2).reshape(B, n, H * D)
            x = x + self._lin(o, p["o"])
            h = self._rms(x, p["ln2"])
            gu = self._lin(h, p["gu"])
            inter = p["inter"]
            a = p["act"](gu[..., :inter]) * gu[..., inter:]
            x = x + self._lin(a, p["down"])
        cache["n"] = T
        if keep_last == 0:
            return None
        x = self._rms(x[:, n - keep_last :], self.norm)
        logits = self._lin(x, (self.head_w, self.head_b))
        return logits
