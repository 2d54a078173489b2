"""GPU check: the HF backend on CUDA (float32, bfloat16) and vLLM when installed, against CPU float32.

Builds everything locally, with no download: a byte-level BPE tokenizer trained in about
a second on the bundled questions (or SmolLM2's, when its converted copy is already in
the cache), a ChatML chat template, and a randomly initialised Llama (hidden 512,
8 layers). Then greedy traces of the same questions from each path, and:

* agreement with CPU float32 (the reference) on a few questions: identical greedy tokens
  on a common prefix, max |delta log p| there;
* agreement of CUDA bfloat16 and vLLM with CUDA float32 on all questions;
* batch invariance on CUDA (batch 1 vs batch B);
* throughput (generated tokens per second) of each path.

Writes ``$OUT/gpu_check.json`` (or ``--out``) and prints a summary. Exit code 1 when a
check fails (CUDA float32 vs CPU float32 beyond 1e-3 on the common prefix, or batch 1 vs
B beyond 1e-3), 2 when the script itself breaks. Depends only on torch, transformers
(with its ``tokenizers``), numpy and distill_detect's backend modules.

    python benchmarks/gpu_check.py                  # on a GPU machine (< 3 min on one H100/H200)
    python benchmarks/gpu_check.py --device cpu --quick   # smoke test anywhere
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def bundled_texts(limit: int | None = None) -> list[str]:
    texts = []
    for f in sorted((ROOT / "distill_detect" / "datasets").glob("*.jsonl.gz")):
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    rec = json.loads(line)
                    texts.append(rec.get("question") or rec.get("problem") or "")
    texts = [t for t in texts if t]
    return texts[:limit] if limit else texts


def build_tokenizer(out_dir: Path, which: str):
    """SmolLM2's tokenizer from the local cache, or a small byte-level BPE trained here."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if which in ("auto", "smollm2"):
        cache = Path(os.environ.get("DISTILL_DETECT_CACHE") or Path.home() / ".cache" / "distill-detect") / "models"
        found = (
            sorted(p for p in cache.glob("smollm2-135m-instruct-*") if (p / "tokenizer.json").exists()) if cache.exists() else []
        )
        if found:
            tok = AutoTokenizer.from_pretrained(found[0])
            return tok, f"SmolLM2 ({found[0].name})"
        if which == "smollm2":
            raise SystemExit("--tokenizer smollm2: no converted SmolLM2 in the cache")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(bundled_texts(2000), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>", unk_token=None
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir), "byte-level BPE, 4096 entries, trained on the bundled questions"


def build_model(out_dir: Path, tok, *, hidden: int, layers: int, seed: int = 0) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=0.08,  # wider than 0.02: peaked next-token distributions, like a trained model's
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return {
        "hidden": hidden,
        "layers": layers,
        "vocab": len(tok),
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
    }


def run_hf(model_dir: Path, questions, *, device: str, dtype: str, max_new: int, batch: int) -> dict:
    import torch

    from distill_detect.backends.hf import HFBackend

    be = HFBackend(str(model_dir), dtype=dtype, device=device, prompt_logprobs=True)
    be.generate(questions[:batch], max_new_tokens=4)  # warm-up (CUDA context, kernels)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    traces = []
    for i in range(0, len(questions), batch):
        traces += be.generate(questions[i : i + batch], max_new_tokens=max_new)
    sync()
    secs = time.perf_counter() - t0
    be.close()
    return _result(traces, secs, f"hf {device} {dtype} batch {batch}")


def run_vllm(model_dir: Path, questions, *, dtype: str, max_new: int) -> dict:
    from distill_detect.backends.vllm import VLLMBackend

    be = VLLMBackend(str(model_dir), dtype=dtype, gpu_memory_utilization=0.5, max_model_len=2048, enforce_eager=False)
    be.generate(questions[:4], max_new_tokens=4)
    t0 = time.perf_counter()
    traces = be.generate(questions, max_new_tokens=max_new)  # vLLM batches internally
    secs = time.perf_counter() - t0
    return _result(traces, secs, f"vllm {dtype}")


def _result(traces, secs: float, label: str) -> dict:
    n_tok = sum(t.num_tokens for t in traces)
    return {
        "label": label,
        "traces": traces,
        "seconds": round(secs, 3),
        "tokens": n_tok,
        "tok_per_s": round(n_tok / max(secs, 1e-9), 1),
    }


def agreement(a: list, b: list) -> dict:
    """Token agreement and log-prob gaps between two lists of traces of the same questions."""
    from distill_detect.detectors.tpd import tpd_score

    same_all, prefix_frac, first_div, gaps, pgaps, tpd_a, tpd_b = 0, [], [], [], [], [], []
    for x, y in zip(a, b):
        n = min(len(x.output_ids), len(y.output_ids))
        eq = np.r_[x.output_ids[:n] == y.output_ids[:n], False]
        k = int(np.argmin(eq))
        same_all += int(k == n and len(x.output_ids) == len(y.output_ids))
        prefix_frac.append(k / max(1, max(len(x.output_ids), len(y.output_ids))))
        first_div.append(k)
        if k:
            gaps.append(float(np.max(np.abs(x.output_logprobs[:k] - y.output_logprobs[:k]))))
        if x.prompt_logprobs is not None and y.prompt_logprobs is not None and len(x.prompt_logprobs) == len(y.prompt_logprobs):
            if len(x.prompt_logprobs):
                pgaps.append(float(np.max(np.abs(x.prompt_logprobs - y.prompt_logprobs))))
        # TPD on the common prefix, the quantity the audit reads
        tpd_a.append(tpd_score(x.output_logprobs[:k]) if k else 0.0)
        tpd_b.append(tpd_score(y.output_logprobs[:k]) if k else 0.0)
    return {
        "questions": len(a),
        "identical_sequences": same_all,
        "mean_common_prefix_fraction": round(float(np.mean(prefix_frac)), 4),
        "min_first_divergence": int(min(first_div)) if first_div else None,
        "max_abs_dlogprob_common_prefix": max(gaps) if gaps else 0.0,
        "median_abs_dlogprob_common_prefix": float(np.median(gaps)) if gaps else 0.0,
        "max_abs_dlogprob_prompt": max(pgaps) if pgaps else None,
        "max_abs_dtpd_common_prefix": float(np.max(np.abs(np.array(tpd_a) - np.array(tpd_b)))) if tpd_a else 0.0,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke test)")
    ap.add_argument("--quick", action="store_true", help="few questions and tokens (CPU smoke test)")
    ap.add_argument("--questions", type=int, default=None, help="questions for the throughput runs (default 128; quick: 6)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 128; quick: 12")
    ap.add_argument("--batch-size", type=int, default=None, help="default 32; quick: 3")
    ap.add_argument("--tokenizer", choices=("auto", "trained", "smollm2"), default="trained")
    ap.add_argument("--no-vllm", action="store_true", help="skip vLLM even when installed")
    ap.add_argument("--out", default=None, help="JSON output (default: $OUT/gpu_check.json, else ./gpu_check.json)")
    args = ap.parse_args(argv)

    import torch
    import transformers

    n_q = args.questions or (6 if args.quick else 128)
    max_new = args.max_new_tokens or (12 if args.quick else 128)
    batch = args.batch_size or (3 if args.quick else 32)
    n_cpu = 3 if args.quick else 6  # CPU float32 reference: a few questions only
    out_path = Path(args.out or Path(os.environ.get("OUT") or ".") / "gpu_check.json")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch sees no GPU (use --device cpu for a smoke test)", file=sys.stderr)
        return 2
    t_start = time.time()
    report: dict = {
        "host": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu",
            "cuda": torch.version.cuda,
            "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        },
        "settings": {"questions": n_q, "max_new_tokens": max_new, "batch_size": batch, "cpu_reference_questions": n_cpu},
        "runs": {},
        "agreement": {},
        "checks": {},
    }
    from distill_detect.types import Question

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        tmp = Path(tmp)
        tok, tok_desc = build_tokenizer(tmp / "tok", args.tokenizer)
        report["tokenizer"] = tok_desc
        report["model"] = build_model(tmp / "model", tok, hidden=256 if args.quick else 512, layers=4 if args.quick else 8)
        texts = bundled_texts()
        questions = [Question(id=f"g{i}", text=t) for i, t in enumerate(texts[:n_q])]

        runs = {}
        runs["cpu_float32_ref"] = run_hf(
            tmp / "model", questions[:n_cpu], device="cpu", dtype="float32", max_new=max_new, batch=n_cpu
        )
        dev = args.device
        runs[f"{dev}_float32"] = run_hf(tmp / "model", questions, device=dev, dtype="float32", max_new=max_new, batch=batch)
        runs[f"{dev}_bfloat16"] = run_hf(tmp / "model", questions, device=dev, dtype="bfloat16", max_new=max_new, batch=batch)
        runs[f"{dev}_float32_batch1"] = run_hf(
            tmp / "model", questions[:n_cpu], device=dev, dtype="float32", max_new=max_new, batch=1
        )
        vllm_note = "not installed"
        if args.no_vllm:
            vllm_note = "skipped (--no-vllm)"
        elif dev.startswith("cuda"):
            import importlib.util

            if importlib.util.find_spec("vllm") is not None:
                try:
                    runs["vllm_bfloat16"] = run_vllm(tmp / "model", questions, dtype="bfloat16", max_new=max_new)
                    runs["vllm_float32"] = run_vllm(tmp / "model", questions, dtype="float32", max_new=max_new)
                    vllm_note = "ran"
                except Exception as exc:  # report and go on: the HF numbers still stand
                    vllm_note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        else:
            vllm_note = "skipped (no GPU)"
        report["vllm"] = vllm_note

        ref = runs[f"{dev}_float32"]["traces"]
        agr = report["agreement"]
        agr[f"{dev}_float32 vs cpu_float32_ref"] = agreement(ref[:n_cpu], runs["cpu_float32_ref"]["traces"])
        agr[f"{dev}_bfloat16 vs {dev}_float32"] = agreement(runs[f"{dev}_bfloat16"]["traces"], ref)
        agr[f"{dev}_float32 batch1 vs batch{batch}"] = agreement(runs[f"{dev}_float32_batch1"]["traces"], ref[:n_cpu])
        for k in ("vllm_bfloat16", "vllm_float32"):
            if k in runs:
                agr[f"{k} vs {dev}_float32"] = agreement(runs[k]["traces"], ref)
        for name, r in runs.items():
            report["runs"][name] = {k: v for k, v in r.items() if k != "traces"}

    # Pass/fail: float32 on the GPU must reproduce float32 on the CPU, and batching must not matter.
    c1 = agr[f"{dev}_float32 vs cpu_float32_ref"]
    c2 = agr[f"{dev}_float32 batch1 vs batch{batch}"]
    report["checks"] = {
        "float32 device vs cpu: max |dlogp| < 1e-3 on the common prefix": c1["max_abs_dlogprob_common_prefix"] < 1e-3,
        "float32 device vs cpu: first divergence after >= 1 token": (c1["min_first_divergence"] or 0) >= 1,
        "batch 1 vs batch B: max |dlogp| < 1e-3 on the common prefix": c2["max_abs_dlogprob_common_prefix"] < 1e-3,
    }
    report["seconds_total"] = round(time.time() - t_start, 1)
    report["ok"] = all(report["checks"].values())
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2))
    _print(report, out_path)
    return 0 if report["ok"] else 1


def _print(report: dict, out_path: Path) -> None:
    h = report["host"]
    print(f"gpu_check on {h['device']} (torch {h['torch']}, transformers {h['transformers']}, CUDA {h['cuda']})")
    print(f"model: random Llama {report['model']}; tokenizer: {report['tokenizer']}; vLLM: {report['vllm']}")
    print(f"\n{'run':<28}{'tokens':>8}{'seconds':>10}{'tok/s':>10}")
    for name, r in report["runs"].items():
        print(f"{name:<28}{r['tokens']:>8}{r['seconds']:>10.2f}{r['tok_per_s']:>10.1f}")
    print(f"\n{'agreement':<40}{'same seq':>9}{'prefix':>8}{'max|dlp|':>11}{'med|dlp|':>11}{'max|dTPD|':>11}")
    for name, a in report["agreement"].items():
        print(
            f"{name:<40}{a['identical_sequences']:>4}/{a['questions']:<4}{a['mean_common_prefix_fraction']:>8.3f}"
            f"{a['max_abs_dlogprob_common_prefix']:>11.2e}{a['median_abs_dlogprob_common_prefix']:>11.2e}{a['max_abs_dtpd_common_prefix']:>11.2e}"
        )
    print()
    for k, v in report["checks"].items():
        print(f"{'PASS' if v else 'FAIL'}  {k}")
    print(f"\n{'OK' if report['ok'] else 'FAILED'} in {report['seconds_total']} s; wrote {out_path}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        print("gpu_check: FAILED with an exception (above)", file=sys.stderr)
        sys.exit(2)
