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

The machine was shared with other jobs (load 2.4-4.8 on 2 cores during the run), so every
row ran with 1 thread: with 2 threads, torch's OpenMP and llama.cpp's thread pool spin at
barriers and a descheduled thread stalls the other (measured during this work: HF batch 8 at
~6 tok/s with 2 threads vs 9-17 with 1; llama.cpp 23 ms/token with 1 thread vs 0.1-5 s with
2). Row-to-row noise is about ±15% (hf_b8_prompt_logprobs, which does more work than hf_b8,
came out faster): single-row differences below that are not resolved by this run.

## The HF path: what was tried and what it gave

Kept (each can be switched off in `_disable`; the `_without_` rows):

- Transposed (column-major) linear weights, so the BLAS does not repack each weight on every
  small-batch product: 1.5-2x per product at batch 8 in a microbenchmark (576x1536: 38 -> 76
  GFLOP/s; the 576x49152 output head: 17 -> 28), ~1.1x end to end (row without_layout).
  Costs ~0.4 GB of extra peak RSS here (the safetensors pages stay mapped beside the copies).
- KV cache written in place into buffers sized for prompt + budget (the stock cache
  concatenates the whole cache at every step): ~1.04x at 128 tokens, growing with the length.
- Per-step statistics from one exponential pass, kept in preallocated tensors until the batch
  ends (no [B, V] log-softmax, no per-step `.tolist()`): ~1.02x (the full-vocabulary pass is
  ~1% of a step at batch 8).
- With prompt log-probs, the prefill projects onto the vocabulary only the question span and
  the last position, not the system turn and template (~35 of ~94 prompt positions here).
- Together: hf_b8 vs hf_b8_without_all, 1.27x. Already there before this work: decoding stops
  at the budget the methods read (TPD-only: M tokens, checked by
  tests/test_speed_contracts.py), batches of similar length, finished rows leave the batch.

Tried and not kept:

- bfloat16 weights (avx512_bf16; no AMX in this VM): in a paired run (same process,
  alternating) slower than float32 at batch 1 (10 vs 16.5 tok/s decoding), 8 (57 vs 65) and
  32 (124 vs 138), and outside the 1e-4 contract. The hf_b8_bf16 row above, faster, is within
  the noise. `--dtype bfloat16` stays available, not the default.
- Eager attention instead of SDPA: decoding at batch 32 fell from 150-175 to 78 tok/s.
- MKL packed weights (`torch.ops.mkl._mkl_linear`): 0-15% over the transposed layout in the
  microbenchmark, through an internal op; not adopted.
- torch.compile and transformers' StaticCache: not adopted, not timed. Shapes change every
  step (cache length) and whenever a row finishes; a static cache would attend over the whole
  budget at every step and keep finished rows, and compiling costs minutes on 2 shared cores.

## Against the targets

- HF >= 3x naive at equal batch: not reached; 1.1x at batch 1, 1.2-1.5x at 8, 1.5x at 32,
  with identical tokens and log-probs within 3e-5. Both paths spend most of a step in the
  same matrix products: at batch 1 a step reads all 540 MB of float32 weights (~10 GB/s copy
  bandwidth here, so >= 54 ms/token whoever calls it). The naive path also holds every
  step's scores (peak RSS 4.0 GB vs 2.1 GB at batch 32). The larger saving is in what is
  decoded, not how fast: TPD reads 300 tokens where the paper's code decodes 1000.
- >= 50% of the matmul peak at the best batch: not reached; ~25% counting generated tokens
  only, ~44% counting prompt tokens too (the prefill runs at 60-75% of peak). The rest of a
  decoding step goes to SDPA attention over padded batches (~14% of the time at batch 32),
  elementwise work (RMSNorm, rotary, SiLU: ~12%) and small-M products below peak.
- llama.cpp with log-probs >= 80% of its own greedy speed: yes (llamacpp_ours_b1 vs
  llamacpp_plain_b1; reading the log-prob costs nothing measurable: compare ours_nolp).
  llama-cpp-python's `logprobs` option needs `logits_all=True` and runs at a third.

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


def _disable(what) -> None:
    """Switch off single optimisations of the HF backend, to measure what each one buys."""
    import distill_detect.backends.hf as hfmod

    if "layout" in what:  # keep nn.Linear weights row-major
        hfmod._column_major_linears = lambda model: 0
    if "cache" in what:  # the stock concatenating DynamicCache
        hfmod._growing_cache = lambda model, capacity: None
    if "stats" in what:  # per-step statistics through a full [n, V] log-softmax, as before

        def emit(self, logits):
            logp, mean, std = self._stats(logits)
            tok = logits.argmax(-1)
            return tok, logp.gather(-1, tok[:, None])[:, 0], mean, std

        hfmod.HFBackend._emit = emit
    if "narrow" in what:  # project every prefill position onto the vocabulary
        hfmod.HFBackend._narrow_prefill = False


def worker_hf(cfg: dict) -> dict:
    """(b): this project's HF backend."""
    import torch

    from distill_detect.backends.hf import HFBackend
    from distill_detect.prompts import build_prompt

    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    _disable(cfg.get("disable", ()))
    be = HFBackend(
        cfg["model"], dtype=cfg.get("dtype", "float32"), device="cpu", prompt_logprobs=cfg.get("prompt_logprobs", False)
    )
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
    import numpy as np

    from distill_detect.backends.llamacpp import LlamaCppBackend

    th = cfg.get("threads")
    be = LlamaCppBackend(cfg.get("gguf") or "default", n_threads=th, prompt_logprobs=False)
    qs = _questions(cfg["n"])
    B, T = cfg.get("batch", 1), cfg["tokens"]
    mode = cfg["mode"]
    prompts = [be.prompt_ids(q.text) for q in qs]
    prompt_tokens = sum(len(p) for p in prompts)
    if mode in ("ours", "ours_nolp"):
        if mode == "ours_nolp":
            be._emit = lambda x: (x.argmax(axis=1),) + (np.zeros(x.shape[0], np.float32),) * 3
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
    n_for = (lambda b: max(b, 2)) if quick else (lambda b: {1: 8, 8: 16, 32: 32, 64: 64}[b])
    batches = [1, 8] if quick else [1, 8, 32]
    hf = {"tokens": T, "model": model_dir, "threads": threads}
    plan = []
    for b in batches:
        plan.append({"name": f"naive_b{b}", "kind": "naive", "batch": b, "n": n_for(b), **hf})
        plan.append({"name": f"hf_b{b}", "kind": "hf", "batch": b, "n": n_for(b), **hf})
    if not quick:
        plan.append({"name": "hf_b64", "kind": "hf", "batch": 64, "n": 64, **hf})
        plan.append({"name": "hf_b8_prompt_logprobs", "kind": "hf", "batch": 8, "n": 16, "prompt_logprobs": True, **hf})
        plan.append({"name": "hf_b8_bf16", "kind": "hf", "batch": 8, "n": 16, "dtype": "bfloat16", **hf})
        # What each optimisation buys: batch 8 with one of them switched off (and all of them).
        for off in ("layout", "cache", "stats"):
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
            {"name": "hf_b8_without_all", "kind": "hf", "batch": 8, "n": 16, "disable": ["layout", "cache", "stats"], **hf}
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
        "(the machine was shared: numbers move with the load; each row shows the 1-minute load before and after it).",
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
    base = results.get("hf_b8")
    for name, res in results.items():
        if "_without_" in name and "error" not in res and base and "error" not in base:
            ref = results.get("hf_b8_prompt_logprobs") if "prompt_logprobs" in name else base
            if ref and "error" not in ref:
                what = name.split("_without_")[1]
                notes.append(
                    f"{what}: hf_b8{'_prompt_logprobs' if 'prompt' in name else ''} runs {ref['tok_s'] / res['tok_s']:.2f}x as fast with it as without"
                )
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
