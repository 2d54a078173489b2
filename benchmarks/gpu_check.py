"""GPU check: the HF backend on CUDA (float32, bfloat16) against CPU float32, and vLLM when installed.

One prepared command for a bare CUDA machine with torch, transformers and accelerate (vLLM
optional); no download. It builds a byte-level BPE tokenizer (trained in about a second on
the bundled questions), a ChatML chat template and a randomly initialised Llama (hidden 512,
8 layers), then takes greedy traces of the same questions on each path and writes one JSON
(``$OUT/gpu_check.json``, or ``--out``) with what was compared and the numbers:

* CUDA float32 vs CPU float32 (gate): identical greedy tokens on every reference question,
  max |delta log p| <= 1e-3, per-question |delta TPD| <= 1e-3 (TPD with the paper's defaults,
  on the whole trace: the number the audit reads).
* CUDA bfloat16 vs CUDA float32 (stated, not a gate: a property of the precision): identical
  sequences, first divergence, max and median |delta log p| on the common prefix, and the
  per-question |delta TPD| on it, with the share of questions within ``BF16_TPD_TOL``.
* batch 1 vs batch 16 on CUDA in float32 (gate): identical tokens, max |delta log p| <= 1e-3.
* vLLM (float32 and bfloat16) vs the HF backend in the same precision on CUDA, when vLLM is
  importable: agreement, the fingerprint's stop ids and dtype against the HF backend's (gate:
  stop ids equal, float32 |delta TPD| <= ``VLLM_F32_TPD_TOL``). Skipped with the reason when
  vLLM is not importable. Every engine is closed after use (``close()`` shuts vLLM down).

Exit 0 when every gate passes, 1 when one fails, 2 when the check cannot run here (no CUDA)
or breaks. A deadline (``--deadline``, default 420 s) skips what is left (vLLM first) so the
command ends within 8 minutes.

    python benchmarks/gpu_check.py                 # on a CUDA machine (~1-3 min without vLLM)
    python benchmarks/gpu_check.py --cpu-smoke     # the same code path on CPU, tiny sizes (~1 min)
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
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

F32_LOGP_TOL = 1e-3  # CUDA float32 vs CPU float32, and batch 1 vs batch 16
F32_TPD_TOL = 1e-3  # per question, CUDA float32 vs CPU float32
BF16_TPD_TOL = 0.05  # per question, bfloat16 vs float32 on the common prefix (stated, not a gate)
VLLM_F32_TPD_TOL = 5e-3  # per question, vLLM float32 vs HF float32 on the common prefix (other kernels)


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


def build_tokenizer(out_dir: Path):
    """A small byte-level BPE trained here on the bundled questions, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

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
    """A random Llama saved in float32 (so 'auto' resolves to bfloat16 on a GPU, float32 on CPU)."""
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


def run_backend(make, questions, *, max_new: int, batch: int, label: str, sync=lambda: None) -> dict:
    """Greedy traces of ``questions`` in batches of ``batch`` from the backend ``make()`` builds; closes it."""
    be = make()
    try:
        be.generate(questions[: min(batch, 2)], max_new_tokens=2)  # warm-up (CUDA context, kernels)
        sync()
        t0 = time.perf_counter()
        traces = []
        for i in range(0, len(questions), batch):
            traces += be.generate(questions[i : i + batch], max_new_tokens=max_new)
        sync()
        secs = time.perf_counter() - t0
        fp = be.fingerprint()
    finally:
        be.close()
    n_tok = sum(t.num_tokens for t in traces)
    return {
        "label": label,
        "traces": traces,
        "fingerprint": {k: fp.get(k) for k in ("backend", "dtype", "device", "stop_ids", "versions")},
        "seconds": round(secs, 3),
        "tokens": n_tok,
        "tok_per_s": round(n_tok / max(secs, 1e-9), 1),
    }


def agreement(a: list, b: list) -> dict:
    """Token agreement, log-prob gaps and per-question TPD gaps between traces of the same questions."""
    from distill_detect.detectors.tpd import tpd_score

    same, first_div, gaps, pgaps, dtpd_prefix, dtpd_whole = 0, [], [], [], [], []
    for x, y in zip(a, b):
        n = min(len(x.output_ids), len(y.output_ids))
        eq = np.r_[x.output_ids[:n] == y.output_ids[:n], False]
        k = int(np.argmin(eq))
        identical = k == n and len(x.output_ids) == len(y.output_ids)
        same += int(identical)
        first_div.append(None if identical else k)
        if k:
            gaps.append(float(np.max(np.abs(x.output_logprobs[:k] - y.output_logprobs[:k]))))
        if x.prompt_logprobs is not None and y.prompt_logprobs is not None and len(x.prompt_logprobs) == len(y.prompt_logprobs):
            if len(x.prompt_logprobs):
                pgaps.append(float(np.max(np.abs(x.prompt_logprobs - y.prompt_logprobs))))
        dtpd_prefix.append(abs(tpd_score(x.output_logprobs[:k]) - tpd_score(y.output_logprobs[:k])) if k else 0.0)
        dtpd_whole.append(abs(tpd_score(x.output_logprobs) - tpd_score(y.output_logprobs)))
    divs = [d for d in first_div if d is not None]
    return {
        "questions": len(a),
        "identical_sequences": same,
        "first_divergence": first_div,
        "min_first_divergence": min(divs) if divs else None,
        "max_abs_dlogprob_common_prefix": max(gaps) if gaps else 0.0,
        "median_abs_dlogprob_common_prefix": float(np.median(gaps)) if gaps else 0.0,
        "max_abs_dlogprob_prompt": max(pgaps) if pgaps else None,
        "abs_dtpd_common_prefix": [round(float(v), 6) for v in dtpd_prefix],
        "max_abs_dtpd_common_prefix": float(max(dtpd_prefix)) if dtpd_prefix else 0.0,
        "max_abs_dtpd_whole_trace": float(max(dtpd_whole)) if dtpd_whole else 0.0,
    }


def vllm_status(args) -> str | None:
    """None when vLLM can run here, else why it is skipped."""
    if args.no_vllm:
        return "skipped: --no-vllm"
    if args.cpu_smoke:
        return "skipped: --cpu-smoke (vLLM needs a GPU)"
    if importlib.util.find_spec("vllm") is None:
        return "skipped: vllm is not importable here (pip install 'distill-detect[vllm]')"
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="run the code path on CPU with tiny sizes (no GPU needed)")
    ap.add_argument("--questions", type=int, default=None, help="questions per run (default 64; smoke: 4)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 96; smoke: 8")
    ap.add_argument("--batch-size", type=int, default=None, help="default 16 (the batch of the batch-1 comparison); smoke: 2")
    ap.add_argument("--no-vllm", action="store_true", help="skip vLLM even when installed")
    ap.add_argument("--deadline", type=float, default=420.0, help="seconds after which what is left is skipped")
    ap.add_argument("--out", default=None, help="JSON output (default: $OUT/gpu_check.json, else ./gpu_check.json)")
    args = ap.parse_args(argv)
    out_path = Path(args.out or Path(os.environ.get("OUT") or ".") / "gpu_check.json")
    t_start = time.time()

    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()  # saving the random model: no bar in the log
    report: dict = {
        "host": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "transformers": transformers.__version__,
            "cuda_available": bool(torch.cuda.is_available()),
        },
        "mode": "cpu-smoke" if args.cpu_smoke else "cuda",
    }
    if not args.cpu_smoke and not torch.cuda.is_available():
        why = (
            f"CUDA is unavailable (torch {torch.__version__}, built with CUDA {torch.version.cuda}); nothing was checked. "
            "Run it on a CUDA machine, or --cpu-smoke to test the code path here"
        )
        report.update(ok=False, skipped=why)
        _write(report, out_path)
        print(f"gpu_check: {why}", file=sys.stderr)
        return 2
    dev = "cpu" if args.cpu_smoke else "cuda"
    smoke = args.cpu_smoke
    n_q = args.questions or (4 if smoke else 64)
    max_new = args.max_new_tokens or (8 if smoke else 96)
    batch = args.batch_size or (2 if smoke else 16)
    n_ref = min(n_q, 4 if smoke else 16)  # CPU float32 reference and the batch-1 run: the first questions only
    report["host"]["device"] = torch.cuda.get_device_name(0) if dev == "cuda" else platform.processor() or "cpu"
    if dev == "cuda":
        report["host"]["tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
    report["settings"] = {"questions": n_q, "max_new_tokens": max_new, "batch_size": batch, "reference_questions": n_ref}
    report["tolerances"] = {
        "float32 |dlogp| (device vs cpu, batch 1 vs B)": F32_LOGP_TOL,
        "float32 |dTPD| per question (device vs cpu)": F32_TPD_TOL,
        "bfloat16 |dTPD| per question on the common prefix (stated)": BF16_TPD_TOL,
        "vLLM float32 |dTPD| per question on the common prefix": VLLM_F32_TPD_TOL,
    }
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    from distill_detect.backends.hf import HFBackend
    from distill_detect.types import Question

    runs: dict = {}
    agr: dict = {}
    checks: dict = {}
    stated: dict = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        tmp = Path(tmp)
        tok, report["tokenizer"] = build_tokenizer(tmp / "tok")
        mdir = tmp / "model"
        report["model"] = build_model(mdir, tok, hidden=128 if smoke else 512, layers=2 if smoke else 8)
        questions = [Question(id=f"g{i}", text=t) for i, t in enumerate(bundled_texts()[:n_q])]

        def hf(device, dtype):
            return lambda: HFBackend(str(mdir), dtype=dtype, device=device, prompt_logprobs=True)

        runs["cpu_float32_ref"] = run_backend(
            hf("cpu", "float32"), questions[:n_ref], max_new=max_new, batch=batch, label="hf cpu float32"
        )
        runs["float32"] = run_backend(
            hf(dev, "float32"), questions, max_new=max_new, batch=batch, label=f"hf {dev} float32", sync=sync
        )
        runs["bfloat16"] = run_backend(
            hf(dev, "bfloat16"), questions, max_new=max_new, batch=batch, label=f"hf {dev} bfloat16", sync=sync
        )
        runs["float32_batch1"] = run_backend(
            hf(dev, "float32"), questions[:batch], max_new=max_new, batch=1, label=f"hf {dev} float32 batch 1", sync=sync
        )
        f32 = runs["float32"]["traces"]

        a = agr["hf float32 device vs cpu float32"] = agreement(f32[:n_ref], runs["cpu_float32_ref"]["traces"])
        checks["float32 device vs cpu: identical tokens on every question"] = a["identical_sequences"] == a["questions"]
        checks[f"float32 device vs cpu: max |dlogp| <= {F32_LOGP_TOL}"] = a["max_abs_dlogprob_common_prefix"] <= F32_LOGP_TOL
        checks[f"float32 device vs cpu: |dTPD| <= {F32_TPD_TOL} per question"] = a["max_abs_dtpd_whole_trace"] <= F32_TPD_TOL
        a = agr[f"hf float32 batch 1 vs batch {batch}"] = agreement(runs["float32_batch1"]["traces"], f32[:batch])
        checks[f"batch 1 vs {batch}: identical tokens"] = a["identical_sequences"] == a["questions"]
        checks[f"batch 1 vs {batch}: max |dlogp| <= {F32_LOGP_TOL}"] = a["max_abs_dlogprob_common_prefix"] <= F32_LOGP_TOL
        a = agr["hf bfloat16 vs hf float32"] = agreement(runs["bfloat16"]["traces"], f32)
        within = sum(v <= BF16_TPD_TOL for v in a["abs_dtpd_common_prefix"])
        stated["bfloat16 vs float32"] = {
            "identical_sequences": f"{a['identical_sequences']}/{a['questions']}",
            "max_abs_dlogprob_common_prefix": a["max_abs_dlogprob_common_prefix"],
            "median_abs_dlogprob_common_prefix": a["median_abs_dlogprob_common_prefix"],
            f"questions with |dTPD| <= {BF16_TPD_TOL} on the common prefix": f"{within}/{a['questions']}",
        }

        why = vllm_status(args)
        if why is None and time.time() - t_start > args.deadline:
            why = f"skipped: past the {args.deadline:.0f} s deadline"
        report["vllm"] = why or "ran"
        if why is None:
            from distill_detect.backends.vllm import VLLMBackend

            hf_stops = runs["float32"]["fingerprint"]["stop_ids"]
            for dtype in ("float32", "bfloat16"):
                if time.time() - t_start > args.deadline:
                    report["vllm"] = f"partly skipped: past the {args.deadline:.0f} s deadline before {dtype}"
                    break
                key = f"vllm_{dtype}"
                try:
                    runs[key] = run_backend(
                        lambda d=dtype: VLLMBackend(
                            str(mdir), dtype=d, gpu_memory_utilization=0.3, max_model_len=2048, enforce_eager=True
                        ),
                        questions,
                        max_new=max_new,
                        batch=len(questions),  # vLLM schedules the batch itself
                        label=f"vllm {dtype}",
                        sync=sync,
                    )
                except Exception as exc:  # report and go on: the HF numbers still stand
                    report["vllm"] = (
                        f"failed at {dtype}: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                    )
                    checks[f"vllm {dtype} ran"] = False
                    break
                a = agr[f"vllm {dtype} vs hf {dtype}"] = agreement(runs[key]["traces"], runs[dtype]["traces"])
                fp = runs[key]["fingerprint"]
                checks[f"vllm {dtype}: stop ids equal the HF backend's"] = fp["stop_ids"] == hf_stops
                checks[f"vllm {dtype}: fingerprint dtype is {dtype}"] = fp["dtype"] == dtype
                if dtype == "float32":
                    checks[f"vllm float32 vs hf float32: |dTPD| <= {VLLM_F32_TPD_TOL} per question"] = (
                        a["max_abs_dtpd_common_prefix"] <= VLLM_F32_TPD_TOL
                    )
                stated[f"vllm {dtype} vs hf {dtype}"] = {
                    "identical_sequences": f"{a['identical_sequences']}/{a['questions']}",
                    "max_abs_dlogprob_common_prefix": a["max_abs_dlogprob_common_prefix"],
                    "max_abs_dlogprob_prompt": a["max_abs_dlogprob_prompt"],
                }

    report["runs"] = {k: {kk: vv for kk, vv in r.items() if kk != "traces"} for k, r in runs.items()}
    report["agreement"] = agr
    report["stated"] = stated
    report["checks"] = checks
    report["seconds_total"] = round(time.time() - t_start, 1)
    report["ok"] = all(checks.values())
    _write(report, out_path)
    _print(report, out_path)
    return 0 if report["ok"] else 1


def _write(report: dict, out_path: Path) -> None:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2, default=str))


def _print(report: dict, out_path: Path) -> None:
    h = report["host"]
    print(
        f"gpu_check ({report['mode']}) on {h['device']} (torch {h['torch']}, transformers {h['transformers']}, CUDA {h['torch_cuda']})"
    )
    print(f"model: random Llama {report['model']}; vLLM: {report['vllm']}")
    print(f"\n{'run':<22}{'dtype':>10}{'tokens':>8}{'seconds':>10}{'tok/s':>10}")
    for name, r in report["runs"].items():
        print(f"{name:<22}{r['fingerprint']['dtype']:>10}{r['tokens']:>8}{r['seconds']:>10.2f}{r['tok_per_s']:>10.1f}")
    print(f"\n{'agreement':<36}{'same seq':>9}{'max|dlp|':>11}{'med|dlp|':>11}{'max|dTPD|':>11}")
    for name, a in report["agreement"].items():
        print(
            f"{name:<36}{a['identical_sequences']:>4}/{a['questions']:<4}{a['max_abs_dlogprob_common_prefix']:>11.2e}"
            f"{a['median_abs_dlogprob_common_prefix']:>11.2e}{a['max_abs_dtpd_common_prefix']:>11.2e}"
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
