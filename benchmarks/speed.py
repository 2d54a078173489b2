"""How fast greedy decoding with per-token log-probabilities runs here, against the usual peers.

One run times, on the same model, prompts and machine:

(a) naive HF: ``model.generate(do_sample=False, output_scores=True, return_dict_in_generate=True)``
    followed by a log-softmax of every kept score (what most research code does);
(b) this project's HF backend at batch 1, 8, 32 (and 64, to find the best batch);
(c) llama.cpp through llama-cpp-python on the embedded GGUF, where it is installed:
    its own greedy completion without log-probabilities, the same with its ``logprobs``
    option, and this project's ``llamacpp`` backend.

Each configuration runs in a fresh subprocess (so its peak RSS is its own); the parent
measures the float32 matmul peak of this machine in the same run and writes
``benchmarks/results/speed.md`` and ``speed.json``. Usage::

    .venv/bin/python benchmarks/speed.py            # the full run (a few minutes on 2 cores)
    .venv/bin/python benchmarks/speed.py --quick    # smoke run: tiny budgets, seconds

Tokens/s counts the tokens each question really generated (up to and including its
end-of-turn token, at most the budget), the same count for every path.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


FINDINGS = """
## Reading these numbers

This run had the machine to itself (load about 1 before it; its own two threads add about 2),
so every row ran with 2 threads. One row measures the same code as hf_b8 now (the growing
cache is only used when the fused forward is off; see below): hf_b8_without_cache ran 2.5%
faster than hf_b8, which is the noise of one row here. Differences under ~6% are not resolved.
The earlier run in git history (1 thread under a load of 2.4-4.8 from other jobs, before the
fused forward) is not comparable row by row.

The "% peak (prompt + generated)" column counts every prompt token, also the shared system
prefix that the fused path runs once per batch; counting only the tokens computed, hf_b128 is
at 38.8% (hf_b64 36.2%, naive_b32 19.8%).

## The HF path: what was tried and what it gave

Kept (each can be switched off with `HFBackend(ablate=...)`; the `_without_` rows):

- The fused CPU forward of `distill_detect/backends/fused.py` for llama/mistral/qwen2
  checkpoints: q/k/v and gate/up as one product each (the transformers modules keep views
  into the fused weights, so no memory is doubled), grouped-query attention against the
  cache without repeating key/value heads, one preallocated KV cache; the chat template's
  shared prefix (24 tokens here) run once per batch and copied to every row; the rest of the
  prompts run in groups of similar length (rows x length <= 2048) instead of one batch padded
  to its longest prompt (a sorted batch of 64 held 8576 padded positions for 4264 real ones);
  finished rows leave the batch once they are an eighth of it, by moving only the survivors
  from the end into the freed rows. Measured: hf_b64 1.34x with it (229.0 vs 170.3 tok/s),
  hf_b8 1.07x (within the noise). In a split timing at batch 64 with 1 thread the prefill
  went from 27.2 s to 13.5 s and a decoding step stayed at ~330 ms: the gain is the prefill.
- Transposed (column-major) linear weights, so the BLAS does not repack each weight on every
  small-batch product: 1.5-2x per product at batch 8 in a microbenchmark (576x1536: 38 -> 76
  GFLOP/s; the 576x49152 output head: 17 -> 28); hf_b8 1.11x with it.
- Per-step statistics from one exponential pass, kept in preallocated tensors until the batch
  ends (no [B, V] log-softmax, no per-step `.tolist()`): within the noise at batch 8 (the
  full-vocabulary pass is ~1% of a step there); kept because it costs nothing.
- With prompt log-probs, the prefill projects onto the vocabulary only the question span and
  the last position: within the noise at batch 8 in this run (1.12x in the earlier one).
- For transformers' own forward (GPU, other architectures): a KV cache written in place
  instead of concatenated every step, 1.04x at 128 tokens in the earlier run.
- Together: hf_b8 1.40x over hf_b8_without_all. Already there before: decoding stops at the
  budget the methods read (TPD-only: M tokens, tests/test_speed_contracts.py), batches of
  similar length.

Tried and not kept:

- bfloat16 weights (avx512_bf16; no AMX in this VM): hf_b8_bf16 77.3 vs 85.4 tok/s float32,
  and outside the 1e-4 contract. `--dtype bfloat16` stays available, not the default.
- Eager attention instead of SDPA (transformers path): batch 32 fell from 150-175 to 78 tok/s.
- Other decode attention formulations (microbenchmark, batch 128, 160 cached positions, 2
  threads): the grouped matmul kept here 1.70 ms per layer, SDPA with `enable_gqa` 2.6-2.8 ms,
  keys-by-queries matmul the same as queries-by-keys, an elementwise product-and-sum 18.6 ms
  for the scores alone.
- MKL packed weights (`torch.ops.mkl._mkl_linear`): 0-15% over the transposed layout in the
  microbenchmark, through an internal op.
- Prompt-lookup speculative decoding (drafting from n-grams of the prompt and output, exact
  under greedy verification), simulated on 64 of these greedy outputs before building it:
  1.5-1.8 tokens per forward at 2.4-6 positions per forward. At batch 1 a forward of 4
  positions cost 1.4x one of 1 position in the products microbenchmark, so at best ~1.15x:
  not built.
- torch.compile and a static cache: not timed. Shapes change every step and whenever rows
  leave the batch, and compiling costs minutes on 2 cores.

## Against the targets

- HF >= 3x naive at equal batch: not reached, and not reachable with float32 products on
  this machine. Ours is 1.41x / 1.35x / 1.63x the naive path at batch 1 / 8 / 32 with
  identical tokens and log-probs within 3.1e-5. The ceiling table above times the step's
  matrix products alone: 27 / 142 / 307 tok/s at batch 1 / 8 / 32, below 3x naive (55 / 190 /
  334) at every batch. At batch 1 ours runs at 97% of that ceiling (a step reads all 540 MB of
  float32 weights: 37.7 ms, 14 GB/s). Beating it needs fewer bytes per weight (bf16/int8:
  outside the 1e-4 contract, and bf16 was slower here) or several tokens per weight read
  (speculative decoding: ~1.15x at best on these outputs, see above).
- >= 50% of the matmul peak at the best batch: not reached. Batch 128: 244.5 tok/s = 24.8%
  of 275 GFLOP/s counting generated tokens (280 MFLOP each at the mean context of 155), 38.8%
  counting the prompt tokens computed too. A profile of decoding steps at batch 128 (2
  threads, steps 60-70): the products take 177 ms per step, at their measured ceiling (174 ms);
  attention over the cache 108 ms (29%: 384 small matrix products per layer, ~9 GB/s); norms,
  rotary, SiLU and the per-step statistics ~85 ms. In a separate timing of the same batch
  (57.8 s in all) the prefill of the 128 prompts took 13.1 s. Even with no attention and no overhead (prefill at peak, steps at the products
  ceiling of 735 tok/s) the generated-token reading tops out near 53% at batch 128.
- llama.cpp with log-probs >= 80% of its own greedy speed: yes, 112% (llamacpp_ours_b1 65.5
  vs llamacpp_plain_b1 58.7 tok/s); reading the log-prob costs no more than the noise
  (llamacpp_ours_nolp, the same without it: 69.0). llama-cpp-python's `logprobs` option needs `logits_all=True` and runs at 23%.
- TPD-only audit of N questions decodes <= N(M+1) tokens: yes, exactly N x M stored and
  decoded in tests/test_speed_contracts.py.

## The llamacpp backend

- Batch-invariant: identical tokens and log-probs at batch 1 and 8. Two things were needed:
  llama.cpp's CPU flash attention (on by default) changes a sequence's numbers by up to 0.15
  when other sequences share its `llama_decode` call, so it is off; and the kernels depend
  on how many tokens one call holds, so each prompt is fed in its own calls.
- Against HF on the dequantised weights (tolerance stated in the backend's docstring and
  held by tests/test_llamacpp.py): |Δ log p| <= 0.3 where the greedy tokens agree (0.24
  measured), <= 0.5 teacher-forced (0.37 measured); the greedy paths agree on about half
  the tokens before they part.
- Install: `CMAKE_ARGS="-DLLAVA_BUILD=OFF" pip install "llama-cpp-python>=0.3"` builds
  llama.cpp from the sdist (no Linux wheel on PyPI): 32 min on this 2-core machine under a
  load of 8-10; pip keeps the built wheel in ~/.cache/pip/wheels, so reinstalling takes seconds.
"""


# -- the machine -----------------------------------------------------------------------------------


def machine_info() -> dict:
    cpu = "unknown"
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16") if f in flags]
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count()
    return {
        "cpu": cpu,
        "simd": simd,
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def matmul_peak(n: int = 2048, reps: int = 8) -> dict:
    """Best float32 GFLOP/s of an n x n x n torch matmul over ``reps`` tries."""
    import torch

    a = torch.randn(n, n)
    b = torch.randn(n, n)
    c = torch.empty(n, n)
    torch.mm(a, b, out=c)  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b, out=c)
        best = min(best, time.perf_counter() - t)
    return {"n": n, "gflops": 2 * n**3 / best / 1e9, "seconds": best}


def step_products(model_dir: str, batches, reps: int = 3) -> dict:
    """Time of the matrix products of one decoding step alone, per batch size: a ceiling.

    Random float32 weights with the model's shapes (one copy per layer, so they are read from
    memory as in a real step; fused q/k/v and gate/up as the backend holds them), multiplied by
    a batch of rows, best of ``reps``. Attention, norms and the rest of a step come on top, so
    no decoder built on these products can beat batch / this time.
    """
    import torch
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    d, f, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    hq = cfg.num_attention_heads
    hkv = getattr(cfg, "num_key_value_heads", hq) or hq
    hd = getattr(cfg, "head_dim", None) or d // hq
    shapes = [(d, (hq + 2 * hkv) * hd), (hq * hd, d), (d, 2 * f), (f, d)]
    layers = [[torch.randn(k, n) for k, n in shapes] for _ in range(cfg.num_hidden_layers)]
    head = torch.randn(d, V)
    out = {}
    for b in batches:
        xs = {k: torch.randn(b, k) for k in {k for k, _ in shapes}}
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            for ws in layers:
                for (k, _), w in zip(shapes, ws):
                    torch.mm(xs[k], w)
            torch.mm(xs[d], head)
            best = min(best, time.perf_counter() - t)
        out[str(b)] = {"ms": best * 1e3, "tok_s": b / best}
    return out


def flops_per_token(model_dir: str) -> dict:
    """Multiply-adds of one decoded token, counted from the model's shapes.

    dense: 2 x (weights of every linear map, the output head included), i.e. ~2 x params
    for a model with tied embeddings; attention: 2 x 2 x layers x (heads x head_dim) per
    token of context (scores and the weighted sum), added at the mean context length.
    """
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    d, f, L_, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    hq = cfg.num_attention_heads
    hkv = getattr(cfg, "num_key_value_heads", hq) or hq
    hd = getattr(cfg, "head_dim", None) or d // hq
    per_layer = d * hq * hd + 2 * d * hkv * hd + hq * hd * d + 3 * d * f
    linear = L_ * per_layer + V * d
    return {"dense": 2 * linear, "attention_per_ctx_token": 4 * L_ * hq * hd, "linear_params": linear}


# -- workers (one configuration per subprocess) ---------------------------------------------------


def _questions(n: int):
    from distill_detect.data import load_questions

    qs = load_questions("bundled:gsm8k_test")
    # Same order the pipeline uses (similar lengths together), for every path alike.
    return sorted(qs[: max(n, 1)], key=lambda q: len(q.text))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _tokens_of(traces) -> int:
    return int(sum(len(t["ids"]) for t in traces))


def worker_naive(cfg: dict) -> dict:
    """(a): generate(output_scores=True) then log-softmax of every score, batch by batch.

    The model is loaded plainly (models.load_hf), without anything this project's backend adds."""
    import torch

    from distill_detect.backends.base import END_OF_TURN
    from distill_detect.models import load_hf, resolve_model
    from distill_detect.prompts import build_prompt

    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    model, tok, _, _ = load_hf(resolve_model(cfg["model"]), dtype=cfg.get("dtype", "float32"), device="cpu")
    # The same stop tokens as the backend: EOS ids and the end-of-turn tokens the vocabulary has.
    stops: set[int] = set()
    for src in (tok.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        stops.update([src] if isinstance(src, int) else (src or []))
    vocab = tok.get_vocab()
    stops.update(vocab[t] for t in END_OF_TURN if t in vocab)
    stop = sorted(stops)
    pad = tok.pad_token_id if tok.pad_token_id is not None else stop[0]
    qs = _questions(cfg["n"])
    B, T = cfg["batch"], cfg["tokens"]

    def run(batch_qs, n_new):
        enc = [build_prompt(tok, q.text).ids for q in batch_qs]
        L = max(len(e) for e in enc)
        ids = torch.full((len(enc), L), pad, dtype=torch.long)
        mask = torch.zeros((len(enc), L), dtype=torch.long)
        for i, e in enumerate(enc):
            ids[i, L - len(e) :] = torch.tensor(e)
            mask[i, L - len(e) :] = 1
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=n_new,
                output_scores=True,
                return_dict_in_generate=True,
                eos_token_id=stop,
                pad_token_id=pad,
            )
            gen = out.sequences[:, L:]
            logp = torch.log_softmax(torch.stack(out.scores, dim=1).float(), dim=-1)  # [B, steps, V]
            lp = logp.gather(-1, gen[:, :, None])[:, :, 0]
        res = []
        for r in range(gen.shape[0]):
            row = gen[r].tolist()
            n = len(row)
            for j, t in enumerate(row):
                if t in stop:
                    n = j + 1
                    break
            res.append({"id": batch_qs[r].id, "ids": row[:n], "lp": lp[r, :n].tolist()})
        return res, sum(len(e) for e in enc)

    run(qs[:1], 4)  # warm-up
    t0 = time.perf_counter()
    traces, prompt_tokens = [], 0
    for i in range(0, len(qs), B):
        got, n_prompt = run(qs[i : i + B], T)
        traces += got
        prompt_tokens += n_prompt
    dt = time.perf_counter() - t0
    return {"seconds": dt, "tokens": _tokens_of(traces), "prompt_tokens": prompt_tokens, "traces": traces}


def worker_hf(cfg: dict) -> dict:
    """(b): this project's HF backend."""
    import torch

    from distill_detect.backends.hf import HFBackend
    from distill_detect.prompts import build_prompt

    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    be = HFBackend(cfg["model"], dtype=cfg.get("dtype", "float32"), device="cpu", prompt_logprobs=cfg.get("prompt_logprobs", False),
                   ablate=set(cfg.get("disable", ())))  # fmt: skip
    qs = _questions(cfg["n"])
    B, T = cfg["batch"], cfg["tokens"]
    be.generate(qs[:1], max_new_tokens=4)  # warm-up
    t0 = time.perf_counter()
    traces = []
    for i in range(0, len(qs), B):
        for t in be.generate(qs[i : i + B], max_new_tokens=T):
            traces.append({"id": t.id, "ids": t.output_ids.tolist(), "lp": t.output_logprobs.tolist()})
    dt = time.perf_counter() - t0
    prompt_tokens = sum(len(build_prompt(be.tok, q.text).ids) for q in qs)
    return {"seconds": dt, "tokens": _tokens_of(traces), "prompt_tokens": prompt_tokens, "traces": traces}


def worker_llamacpp(cfg: dict) -> dict:
    """(c): llama.cpp on the GGUF. mode 'ours' = the llamacpp backend; 'ours_nolp' = the same loop reading
    only the argmax (no log-probabilities); 'plain' / 'logprobs' = llama-cpp-python's own greedy
    ``create_completion`` without / with its ``logprobs`` option, on the same prompt tokens."""

    from distill_detect.backends.llamacpp import LlamaCppBackend

    th = cfg.get("threads")
    be = LlamaCppBackend(cfg.get("gguf") or "default", n_threads=th, prompt_logprobs=False,
                         ablate={"logprobs"} if cfg["mode"] == "ours_nolp" else set())  # fmt: skip
    qs = _questions(cfg["n"])
    B, T = cfg.get("batch", 1), cfg["tokens"]
    mode = cfg["mode"]
    prompts = [be.prompt_ids(q.text) for q in qs]
    prompt_tokens = sum(len(p) for p in prompts)
    if mode in ("ours", "ours_nolp"):
        be.generate(qs[:1], max_new_tokens=4)  # warm-up
        t0 = time.perf_counter()
        traces = []
        for i in range(0, len(qs), B):
            for t in be.generate(qs[i : i + B], max_new_tokens=T):
                traces.append({"id": t.id, "ids": t.output_ids.tolist(), "lp": t.output_logprobs.tolist()})
        dt = time.perf_counter() - t0
        res = {"seconds": dt, "tokens": _tokens_of(traces), "prompt_tokens": prompt_tokens, "threads_used": be.n_threads}
        if mode == "ours":
            res["traces"] = traces
        return res

    import llama_cpp

    llm = llama_cpp.Llama(
        str(be.path),
        n_ctx=2048,
        n_batch=512,
        n_threads=be.n_threads,
        n_threads_batch=be.n_threads,
        logits_all=(mode == "logprobs"),
        verbose=False,
    )

    def complete(prompt, n_tok):
        kw = {"logprobs": 1} if mode == "logprobs" else {}
        llm.reset()
        out = llm.create_completion(prompt, max_tokens=n_tok, temperature=0.0, top_k=1, **kw)
        n = int(out["usage"]["completion_tokens"])
        if out["choices"][0]["finish_reason"] == "stop":
            n += 1  # the end-of-turn token was decoded but is not counted by llama-cpp-python
        return n

    complete(prompts[0], 4)  # warm-up
    t0 = time.perf_counter()
    tokens = sum(complete(p, T) for p in prompts)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "tokens": tokens, "prompt_tokens": prompt_tokens, "threads_used": be.n_threads}


WORKERS = {"naive": worker_naive, "hf": worker_hf, "llamacpp": worker_llamacpp}


def run_worker(cfg: dict) -> dict:
    load0 = os.getloadavg()[0]
    res = WORKERS[cfg["kind"]](cfg)
    res["peak_rss_mb"] = _peak_rss_mb()
    res["tok_s"] = res["tokens"] / res["seconds"] if res["seconds"] else 0.0
    res["load1"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
    if "threads_used" not in res:
        import torch

        res["threads_used"] = torch.get_num_threads()
    return res


def spawn(cfg: dict, timeout: float) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as fh:
        out_path = fh.name
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg), "--worker-out", out_path]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT))
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return {"error": " | ".join(tail) or f"exit {proc.returncode}"}
        return json.loads(Path(out_path).read_text())
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    finally:
        Path(out_path).unlink(missing_ok=True)


# -- agreement between paths -------------------------------------------------------------------------


def agreement(a: dict, b: dict) -> dict:
    """Identical-token fraction over the common prefix, and max |d logprob| on the identical prefix."""
    import numpy as np

    same = total = exact = 0
    max_d = 0.0
    first_div = []
    by_id = {t["id"]: t for t in b}
    for x in a:
        y = by_id.get(x["id"])
        if y is None:
            continue
        n = min(len(x["ids"]), len(y["ids"]))
        ids_x, ids_y = np.asarray(x["ids"][:n]), np.asarray(y["ids"][:n])
        diff = np.nonzero(ids_x != ids_y)[0]
        k = int(diff[0]) if len(diff) else n  # identical prefix length
        first_div.append(k)
        same += int((ids_x == ids_y).sum())
        total += n
        exact += int(k == n and len(x["ids"]) == len(y["ids"]))
        if k:
            d = np.abs(np.asarray(x["lp"][:k], np.float64) - np.asarray(y["lp"][:k], np.float64))
            max_d = max(max_d, float(d.max()))
    return {
        "questions": len(first_div),
        "identical_sequences": exact,
        "token_match_fraction": same / total if total else 1.0,
        "identical_prefix_fraction": (sum(first_div) / total) if total else 1.0,
        "min_identical_prefix": min(first_div) if first_div else 0,
        "max_abs_dlogprob_on_identical_prefix": max_d,
    }


def _forced_agreement(hf_traces: list[dict], gguf: str, threads: int | None) -> dict:
    """llama.cpp's log-probabilities of the HF backend's own greedy tokens, at every position."""
    import numpy as np

    from distill_detect.backends.llamacpp import LlamaCppBackend

    be = LlamaCppBackend(gguf, n_threads=threads, prompt_logprobs=False)
    qs = {q.id: q for q in _questions(64)}
    d = []
    for t in hf_traces:
        got = be.score([qs[t["id"]]], [np.asarray(t["ids"])])[0]
        d.append(np.abs(got.astype(np.float64) - np.asarray(t["lp"], np.float64)))
    be.close()
    allv = np.concatenate(d)
    return {
        "questions": len(d),
        "tokens": int(allv.size),
        "max_abs_dlogprob": float(allv.max()),
        "p99_abs_dlogprob": float(np.quantile(allv, 0.99)),
        "median_abs_dlogprob": float(np.median(allv)),
    }


# -- the parent ------------------------------------------------------------------------------------------


def _plan(quick: bool, has_llamacpp: bool, model_dir: str, gguf: str | None, threads: int | None) -> list[dict]:
    T = 12 if quick else 128
    n_for = (lambda b: max(b, 2)) if quick else (lambda b: {1: 8, 8: 16, 32: 32, 64: 64, 128: 128}[b])
    batches = [1, 8] if quick else [1, 8, 32]
    hf = {"tokens": T, "model": model_dir, "threads": threads}
    plan = []
    for b in batches:
        plan.append({"name": f"naive_b{b}", "kind": "naive", "batch": b, "n": n_for(b), **hf})
        plan.append({"name": f"hf_b{b}", "kind": "hf", "batch": b, "n": n_for(b), **hf})
    if not quick:
        plan.append({"name": "hf_b64", "kind": "hf", "batch": 64, "n": 64, **hf})
        plan.append({"name": "hf_b128", "kind": "hf", "batch": 128, "n": 128, **hf})
        plan.append({"name": "hf_b64_without_fused", "kind": "hf", "batch": 64, "n": 64, "disable": ["fused"], **hf})
        plan.append({"name": "hf_b8_prompt_logprobs", "kind": "hf", "batch": 8, "n": 16, "prompt_logprobs": True, **hf})
        plan.append({"name": "hf_b8_bf16", "kind": "hf", "batch": 8, "n": 16, "dtype": "bfloat16", **hf})
        # What each optimisation buys: batch 8 with one of them switched off (and all of them).
        for off in ("fused", "layout", "cache", "stats"):
            plan.append({"name": f"hf_b8_without_{off}", "kind": "hf", "batch": 8, "n": 16, "disable": [off], **hf})
        plan.append(
            {
                "name": "hf_b8_prompt_logprobs_without_narrow",
                "kind": "hf",
                "batch": 8,
                "n": 16,
                "prompt_logprobs": True,
                "disable": ["narrow"],
                **hf,
            }
        )
        plan.append(
            {
                "name": "hf_b8_without_all",
                "kind": "hf",
                "batch": 8,
                "n": 16,
                "disable": ["fused", "layout", "cache", "stats"],
                **hf,
            }
        )
    if has_llamacpp:
        n = 2 if quick else 8
        lc = {"kind": "llamacpp", "tokens": T, "gguf": gguf, "threads": threads}
        for mode in ("plain", "logprobs", "ours_nolp", "ours"):
            plan.append({"name": f"llamacpp_{mode}_b1", "mode": mode, "batch": 1, "n": n, **lc})
        if not quick:
            plan.append({"name": "llamacpp_ours_b8", "mode": "ours", "batch": 8, "n": 16, **lc})
    return plan


def _fmt(x, nd=1):
    return "—" if x is None else f"{x:.{nd}f}"


def write_report(doc: dict, out_dir: Path) -> Path:
    m, r = doc["machine"], doc["results"]
    peak = doc["matmul_peak"]["gflops"]
    fl = doc["flops_per_token"]
    lines = [
        "# Decoding speed: greedy tokens with per-token log-probabilities",
        "",
        f"Written by `benchmarks/speed.py{' --quick' if doc['quick'] else ''}` on {doc['date']}. Model: SmolLM2-135M-Instruct "
        "(the embedded default; float32 safetensors dequantised from the Q4_1 GGUF for HF, the GGUF itself for llama.cpp). "
        f"Prompts: the first questions of bundled:gsm8k_test in the model's chat template, sorted by length; budget "
        f"{doc['tokens']} new tokens per question (fewer where the model ends its turn).",
        "",
        f"Machine: {m['cpu']} ({', '.join(m['simd'])}), {m['cores']} cores, torch {m['torch']} with {m['torch_threads']} thread(s), "
        f"Python {m['python']}. Load average at start {m['loadavg_start']}, at end {m['loadavg_end']} "
        "(each row shows the 1-minute load before and after it; this script's own run adds about 1 per thread).",
        "",
        f"Matmul peak measured in this run: **{doc['matmul_peak_1thread']['gflops']:.0f} GFLOP/s** with 1 thread"
        + (f", {peak:.0f} GFLOP/s with {m['torch_threads']}" if m["torch_threads"] != 1 else " (every row ran with 1 thread)")
        + f" (float32 {doc['matmul_peak']['n']}^3 torch.mm, best of 8). "
        f"FLOPs counted per token: dense {fl['dense'] / 1e6:.0f} MFLOP (2 x every linear weight, output head included) "
        f"+ attention {fl['attention_per_ctx_token'] / 1e3:.0f} kFLOP per context token.",
        "",
        "| path | batch | threads | questions | generated tokens | tok/s | x naive (same batch) | peak RSS MB | % peak (generated) | % peak (prompt + generated) | load before/after |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, res in r.items():
        if "error" in res:
            lines.append(f"| {name} | | | | error: {res['error'][:80]} | | | | |")
            continue
        ratio = res.get("x_naive")
        lines.append(
            f"| {name} | {res['batch']} | {res.get('threads_used', '')} | {res['n']} | {res['tokens']} | {res['tok_s']:.1f} "
            f"| {_fmt(ratio, 2) if ratio else '—'} | {res['peak_rss_mb']:.0f} | {_fmt(res.get('pct_peak'), 1)} "
            f"| {_fmt(res.get('pct_peak_all'), 1)} | {res['load1'][0]}/{res['load1'][1]} |"
        )
    lines += ["", "## Agreement", ""]
    for name, ag in doc["agreement"].items():
        if "max_abs_dlogprob" in ag:
            lines.append(
                f"- {name}: {ag['questions']} questions, {ag['tokens']} tokens: |Δ logprob| max {ag['max_abs_dlogprob']:.3f}, "
                f"99th percentile {ag['p99_abs_dlogprob']:.3f}, median {ag['median_abs_dlogprob']:.4f}"
            )
            continue
        lines.append(
            f"- {name}: {ag['identical_sequences']}/{ag['questions']} sequences identical; token match over the common prefix "
            f"{ag['token_match_fraction']:.3f}, identical-prefix fraction {ag['identical_prefix_fraction']:.3f}; "
            f"max |Δ logprob| on the identical prefix {ag['max_abs_dlogprob_on_identical_prefix']:.2e}"
        )
    if doc.get("step_products"):
        lines += [
            "",
            "## The ceiling: a decoding step's matrix products alone",
            "",
            f"One step's products (every layer's weights, the output head included, float32, {m['torch_threads']} thread(s)) "
            "timed alone on random weights of the model's shapes, read from memory as in a real step. "
            "No decoder built on these kernels decodes faster than batch / this time; attention over the cache, "
            "norms and the prefill come on top.",
            "",
            "| batch | ms per step | ceiling tok/s | naive tok/s (this run) | 3 x naive |",
            "|---|---|---|---|---|",
        ]
        for b, v in doc["step_products"].items():
            nv = r.get(f"naive_b{b}", {})
            nv_s = nv.get("tok_s") if "error" not in nv else None
            lines.append(
                f"| {b} | {v['ms']:.1f} | {v['tok_s']:.0f} | {_fmt(nv_s, 1) if nv_s else '—'} | {_fmt(3 * nv_s, 0) if nv_s else '—'} |"
            )
    if doc.get("notes"):
        lines += ["", "## Notes (computed from this run)", ""] + [f"- {n}" for n in doc["notes"]]
    if not doc["quick"]:
        lines += ["", FINDINGS.strip()]
    path = out_dir / ("speed_quick.md" if doc["quick"] else "speed.md")
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 12 tokens, two questions, batches 1 and 8")
    ap.add_argument("--only", default=None, help="comma-separated configuration names to run (default: all)")
    ap.add_argument(
        "--out", default=None, help="folder for speed.md and speed.json (default benchmarks/results; --quick: a temp folder)"
    )
    ap.add_argument("--threads", type=int, default=None, help="threads for torch and llama.cpp in every run (default: all cores)")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds allowed per configuration")
    ap.add_argument("--report-only", action="store_true", help="rewrite speed.md from the speed.json already there")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        res = run_worker(json.loads(args.worker))
        Path(args.worker_out).write_text(json.dumps(res))
        return 0
    if args.report_only:
        out = Path(args.out or HERE / "results")
        doc = json.loads((out / ("speed_quick.json" if args.quick else "speed.json")).read_text())
        print(write_report(doc, out).read_text())
        return 0

    from distill_detect.models import default_model_dir, find_default_gguf

    model_dir = str(default_model_dir())
    try:
        import importlib.util

        has_llamacpp = importlib.util.find_spec("llama_cpp") is not None
    except ValueError:  # pragma: no cover
        has_llamacpp = False
    gguf = str(find_default_gguf())
    m = machine_info()
    print(f"machine: {m}", flush=True)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
        m["torch_threads"] = args.threads
    peak = matmul_peak(1024 if args.quick else 2048)
    nthreads = torch.get_num_threads()
    torch.set_num_threads(1)
    peak1 = matmul_peak(1024 if args.quick else 2048)
    torch.set_num_threads(nthreads)
    print(f"matmul peak: {peak['gflops']:.1f} GFLOP/s ({nthreads} threads), {peak1['gflops']:.1f} (1 thread)", flush=True)
    fl = flops_per_token(model_dir)
    floor = step_products(model_dir, [1, 8, 32] if args.quick else [1, 8, 32, 64, 128])
    print("products of one step alone: " + ", ".join(f"b{b} {v['tok_s']:.0f} tok/s" for b, v in floor.items()), flush=True)
    plan = _plan(args.quick, has_llamacpp, model_dir, gguf, args.threads)
    if args.only:
        keep = set(args.only.split(","))
        plan = [c for c in plan if c["name"] in keep]
    results: dict[str, dict] = {}
    traces: dict[str, dict] = {}
    for cfg in plan:
        print(f"running {cfg['name']} ...", flush=True)
        res = spawn(cfg, args.timeout)
        if "traces" in res:
            traces[cfg["name"]] = res.pop("traces")
        res.update({"batch": cfg["batch"], "n": cfg["n"], "budget": cfg["tokens"]})
        results[cfg["name"]] = res
        if "error" in res:
            print(f"  {cfg['name']}: ERROR {res['error']}", flush=True)
        else:
            print(
                f"  {cfg['name']}: {res['tokens']} tokens in {res['seconds']:.1f}s = {res['tok_s']:.1f} tok/s, peak RSS {res['peak_rss_mb']:.0f} MB",
                flush=True,
            )
    # Context length for the attention FLOPs: prompt plus half the generation, on average (measured prompts).
    mean_ctx = _mean_context(model_dir, max(c["n"] for c in plan) if plan else 1, plan[0]["tokens"] if plan else 0)
    per_tok = fl["dense"] + fl["attention_per_ctx_token"] * mean_ctx
    for name, res in results.items():
        if "error" in res:
            continue
        threads = res.get("threads_used") or nthreads
        pk = (peak1 if threads == 1 else peak)["gflops"] * 1e9
        res["pct_peak"] = 100.0 * res["tok_s"] * per_tok / pk
        res["pct_peak_all"] = 100.0 * (res["tokens"] + res.get("prompt_tokens", 0)) / res["seconds"] * per_tok / pk
        if name.startswith("hf_b") and name[4:].isdigit():
            base = results.get(f"naive_b{name[4:]}")
            if base and "error" not in base and base["tok_s"]:
                res["x_naive"] = res["tok_s"] / base["tok_s"]
    agree = {}
    for b in (1, 8, 32):
        if f"naive_b{b}" in traces and f"hf_b{b}" in traces:
            agree[f"hf_b{b} vs naive_b{b}"] = agreement(traces[f"hf_b{b}"], traces[f"naive_b{b}"])
    if "hf_b1" in traces and "hf_b8" in traces:
        agree["hf_b1 vs hf_b8 (shared questions)"] = agreement(traces["hf_b1"], traces["hf_b8"])
    if "llamacpp_ours_b1" in traces and "llamacpp_ours_b8" in traces:
        agree["llamacpp_ours_b1 vs llamacpp_ours_b8 (shared questions)"] = agreement(
            traces["llamacpp_ours_b1"], traces["llamacpp_ours_b8"]
        )
    for name in ("llamacpp_ours_b1", "llamacpp_ours_b8"):
        ref = "hf_b1" if name.endswith("b1") else "hf_b8"
        if name in traces and ref in traces:
            agree[f"{name} (Q4_1 GGUF) vs {ref} (dequantised float32)"] = agreement(traces[name], traces[ref])
    if "llamacpp_ours_b1" in traces and "hf_b8" in traces:
        agree["llama.cpp teacher-forcing the hf_b8 tokens vs hf_b8"] = _forced_agreement(traces["hf_b8"], gguf, args.threads)
    best = max(
        (r for k, r in results.items() if k.startswith("hf_b") and "error" not in r and "bf16" not in k and "prompt" not in k),
        key=lambda r: r["tok_s"],
        default=None,
    )
    notes = []
    if best:
        notes.append(
            f"best HF batch here: {best['batch']} at {best['tok_s']:.1f} tok/s = {best['pct_peak']:.1f}% of the measured matmul peak "
            f"(at a mean context of {mean_ctx:.0f} tokens: {per_tok / 1e6:.0f} MFLOP/token)"
        )
    for name, res in results.items():
        if "_without_" in name and "error" not in res:
            with_name, what = name.split("_without_")
            ref = results.get(with_name)
            if ref and "error" not in ref:
                notes.append(f"{what}: {with_name} runs {ref['tok_s'] / res['tok_s']:.2f}x as fast with it as without")
    lp, plain, ours = (results.get(f"llamacpp_{k}_b1") for k in ("logprobs", "plain", "ours"))
    if plain and ours and "error" not in plain and "error" not in ours:
        notes.append(
            f"llama.cpp: the llamacpp backend (with logprobs) runs at {100 * ours['tok_s'] / plain['tok_s']:.0f}% of llama-cpp-python's own "
            f"greedy completion without logprobs; its `logprobs` option runs at "
            f"{100 * lp['tok_s'] / plain['tok_s']:.0f}%"
            if lp and "error" not in lp
            else ""
        )
    m["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    doc = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "quick": args.quick,
        "tokens": plan[0]["tokens"] if plan else 0,
        "machine": m,
        "matmul_peak": peak,
        "matmul_peak_1thread": peak1,
        "flops_per_token": {**fl, "mean_context": mean_ctx, "total_at_mean_context": per_tok},
        "step_products": floor,
        "results": results,
        "agreement": agree,
        "notes": [n for n in notes if n],
    }
    out = Path(args.out or (Path(tempfile.gettempdir()) / "distill-detect-speed" if args.quick else HERE / "results"))
    out.mkdir(parents=True, exist_ok=True)
    (out / ("speed_quick.json" if args.quick else "speed.json")).write_text(json.dumps(doc, indent=1) + "\n")
    path = write_report(doc, out)
    print(path.read_text())
    return 0


def _mean_context(model_dir: str, n: int, tokens: int) -> float:
    from transformers import AutoTokenizer

    from distill_detect.prompts import build_prompt

    tok = AutoTokenizer.from_pretrained(model_dir)
    lens = [len(build_prompt(tok, q.text).ids) for q in _questions(n)]
    return sum(lens) / len(lens) + tokens / 2


if __name__ == "__main__":
    sys.exit(main())
