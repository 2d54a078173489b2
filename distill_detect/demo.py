"""``make demo``: the paper's protocol in miniature, on the embedded default model, in minutes.

1. Split bundled GSM8K questions that come with a teacher's solution (GPT-3 175B, correct ones)
   with the paper's protocol: seed 42, 80% members / 20% non-members, balanced evaluation.
2. Distil a student: fine-tune SmolLM2-135M-Instruct on the evaluated members' (question,
   teacher solution) pairs, loss on the solution only.
3. Audit the student: greedy generation with per-token log-probs, TPD and the baselines
   (plus the blind text baseline), TPD's ablations, the metrics table and the HTML report.

Everything is cached and resumable under the cache directory; the results go to ``--out``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from distill_detect.detectors import REGISTRY  # every detector
    from distill_detect.experiment import say, student_experiment
    from distill_detect.models import cache_dir
    from distill_detect.scoring import format_table

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo-out", help="results directory (scores, metrics, report)")
    ap.add_argument("--pool", type=int, default=160, help="questions drawn before the 80/20 split (160 -> 32 + 32 evaluated)")
    ap.add_argument("--epochs", type=float, default=5)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=42)
    a = ap.parse_args(argv)

    t0 = time.time()
    cfg = dict(
        data="bundled:gsm8k_gpt3",
        epochs=a.epochs,
        learning_rate=a.lr,
        batch_size=4,  # 8 optimizer steps per epoch on 32 members: enough for the student to fit them
        max_seq_len=320,
        gen_batch=16,
        train_on="evaluated",
        base="default",
    )
    work = cache_dir() / "demo" / f"pool{a.pool}-e{a.epochs}-lr{a.lr}-t{a.max_new_tokens}-s{a.seed}"
    say(f"demo: distil SmolLM2-135M-Instruct on GSM8K members, then audit it (work dir {work})")
    res = student_experiment(
        cfg, seed=a.seed, work=work, methods=list(REGISTRY), pool_size=a.pool, max_new_tokens=a.max_new_tokens
    )
    out = Path(a.out)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(res["out"], out)
    sizes = res["sizes"]
    print(
        f"\nStudent: SmolLM2-135M-Instruct fine-tuned on {sizes['trained_on']} GSM8K members "
        f"({a.epochs:g} epochs, lr {a.lr:g}, final train loss {res['train'].get('final_train_loss', float('nan')):.3f}); "
        f"audited on {sizes['nonmembers']} members + {sizes['nonmembers']} non-members, {a.max_new_tokens} generated tokens each.\n"
    )
    print(format_table(res["metrics"]))
    print(f"\nscores:  {out / 'scores.jsonl'}\nmetrics: {out / 'metrics.json'}\nreport:  {out / 'report.html'}")
    print(f"\ndemo finished in {time.time() - t0:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
